"""Train a language model: `python train.py model=gpt-nano data=shakespeare trainer.max_steps=1000`."""

import os

os.environ.setdefault("LMFORGE_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lmforge.cli import run_entry

    def checked_train(cfg: DictConfig) -> dict[str, float]:
        from lmforge.preflight import preflight

        preflight(cfg)  # a bad config fails here in seconds, before Lightning is imported or data is read
        from lmforge.run import train

        return train(cfg)

    metrics = run_entry(checked_train, cfg)
    from lmforge.sweeps import trial_score  # a diverged run or a missing/NaN metric: a bad score, not a crash

    return trial_score(metrics, cfg) if cfg.get("optimized_metric") else None  # what Hydra sweepers optimise


if __name__ == "__main__":
    main()
