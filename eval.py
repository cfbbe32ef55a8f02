"""Evaluate a checkpoint: `python eval.py ckpt_path=logs/train/runs/<ts>/checkpoints/last.ckpt` (loss / ppl / bpb
on the whole val split; `split=train` for the train split, `data=...` for another dataset), or
task=mc tasks_file=<jsonl> | task=bleu pairs_file=<tsv> | task=lm_eval lm_eval.tasks=[...]."""

import os

os.environ.setdefault("LMFORGE_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from lmforge.cli import run_entry
    from lmforge.run import evaluate

    run_entry(evaluate, cfg)


if __name__ == "__main__":
    main()
