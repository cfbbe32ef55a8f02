"""Converters between lmforge models and other ecosystems (Hugging Face transformers)."""
