"""Sample text: `python generate.py ckpt_path=... prompt="ROMEO:" temperature=0.8 top_p=0.9` (also hf_dir=, prompts_file=, chat=true)."""

import os

os.environ.setdefault("LMFORGE_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from lmforge.cli import run_entry
    from lmforge.generation.cli import generate  # not via lmforge.run: no Lightning import to start up

    run_entry(generate, cfg)


if __name__ == "__main__":
    main()
