"""Sample text from a checkpoint: `python generate.py ckpt_path=... prompt="ROMEO:" temperature=0.8 top_p=0.9`."""

import os

os.environ.setdefault("LMFORGE_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from lmforge.cli import run_entry
    from lmforge.run import generate

    run_entry(generate, cfg)


if __name__ == "__main__":
    main()
