"""lmforge: train language models end to end with PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
