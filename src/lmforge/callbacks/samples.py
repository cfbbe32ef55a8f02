"""Sample generations at each validation: the quickest sanity check a loss curve can't give.

Logged as a table on W&B, as text on TensorBoard, and always appended to `<run dir>/samples.jsonl`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lmforge.generation import generate
from lmforge.parallel.plan import model_is_sharded


class SampleGeneration(L.Callback):
    def __init__(
        self,
        prompts: Sequence[str] = ("ROMEO:",),
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int = 0,
    ) -> None:
        self.prompts = list(prompts)
        self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed = max_new_tokens, temperature, top_k, top_p, seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.prompts or trainer.datamodule is None:
            return
        if not trainer.is_global_zero and not model_is_sharded(trainer):
            return  # a sharded model (FSDP/TP) needs every rank in each forward; only rank 0 logs
        if getattr(pl_module.model.config, "kind", "decoder") != "decoder" or not hasattr(pl_module.model, "lm_head"):
            return  # left-to-right sampling needs a decoder LM; encoders (BERT), T5 and reward models are skipped
        tokenizer = trainer.datamodule.tokenizer
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        rows = []
        for prompt in self.prompts:
            ids = torch.tensor([tokenizer.encode(prompt) or [tokenizer.eos_id]], device=pl_module.device)
            # eager even when the stage compiled the model: a few short decodes, where every new KV-cache length
            # would be a compile of seconds (and, with graph breaks at FSDP units, can exhaust dynamo's recompile limit)
            with torch.compiler.set_stance("force_eager"):
                out = generate(
                    pl_module.model, ids, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, eos_token_id=tokenizer.eos_id, generator=gen,
                )
            rows.append([trainer.global_step, prompt, tokenizer.decode(out[0, ids.size(1):].tolist())])
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["step", "prompt", "completion"], data=rows, step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                text = "\n\n".join(f"**{p}**{c}" for _, p, c in rows)
                logger.experiment.add_text("samples", text, trainer.global_step)
        path = Path(trainer.default_root_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            for step, prompt, completion in rows:
                fh.write(json.dumps({"step": step, "prompt": prompt, "completion": completion}) + "\n")
