"""Attention heatmaps of a fixed sample at each validation: see what heads learn (previous-token, induction,
attention sinks on the first token) long before the loss curve says anything.

The sample is the first sequence of the first validation batch (cached, so every map shows the same tokens)
or `text` encoded with the run's tokenizer. The chosen layers' attention modules switch to the eager math
for that one forward (`capture_weights`, models/layers/attention.py) and keep their softmax weights.
PNGs go to `<run dir>/attention/step_<n>_layer<l>_head<h>.png` and to W&B / TensorBoard when active.
Decoders (gpt, llama, mixtral) only; encoders and T5 are skipped with one info line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lmforge.models.layers.attention import CausalSelfAttention
from lmforge.models.layers.gqa import GroupedQueryAttention

log = logging.getLogger("lmforge")

ATTENTION_TYPES = (CausalSelfAttention, GroupedQueryAttention)
LABEL_MAX_TOKENS = 32  # token labels on the axes up to this length; beyond, they are unreadable


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's self-attention modules in layer order (PEFT / reward wrappers keep that order)."""
    return [m for m in model.modules() if isinstance(m, ATTENTION_TYPES)]


@torch.no_grad()
def capture_attention(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """{layer: (B, H, T, T_k) float32 softmax weights} of one eval-mode forward of `model` on `input_ids`.
    `model.forward` is called directly: a compiled model (`model.compile()`) is not recompiled for it."""
    modules = attention_modules(model)
    n = len(modules)
    chosen = {i % n: modules[i] for i in layers if -n <= i < n}  # out-of-range layers are left out
    was_training = model.training
    model.eval()
    try:
        for m in chosen.values():
            m.capture_weights = True
        model.forward(input_ids)
        return {i: m.last_weights.float().cpu() for i, m in chosen.items() if m.last_weights is not None}
    finally:
        for m in chosen.values():
            m.capture_weights, m.last_weights = False, None
        model.train(was_training)


def _token_label(tokenizer: Any, token_id: int) -> str:
    try:
        text = tokenizer.decode([token_id])
    except Exception:
        return str(token_id)
    return repr(text)[1:-1].replace(" ", "␣")[:8] or "·"


class AttentionMaps(L.Callback):
    """Enable with `callbacks.attention_maps.enabled=true`; `layers` / `heads` accept negative indices."""

    def __init__(
        self,
        enabled: bool = False,
        layers: Sequence[int] = (0, -1),
        heads: Sequence[int] = (0,),
        every_n_validations: int = 1,
        max_tokens: int = 64,
        text: str | None = None,
        cmap: str = "viridis",
    ) -> None:
        self.enabled = enabled
        self.layers, self.heads = [int(i) for i in layers], [int(h) for h in heads]
        self.every_n_validations, self.max_tokens, self.text, self.cmap = max(1, int(every_n_validations)), int(max_tokens), text, cmap
        self._sample: torch.Tensor | None = None
        self._validations = 0
        self._said: set[str] = set()

    def _once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)

    # --- the sample ------------------------------------------------------------------------------------
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.enabled or self.text is not None or self._sample is not None:
            return
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.size(0) > 0:
            self._sample = ids[:1, : self.max_tokens].detach().cpu()

    def _input_ids(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor | None:
        if self.text is not None and self._sample is None:
            tokenizer = self._tokenizer(trainer, pl_module)
            ids = tokenizer.encode(self.text) if tokenizer is not None else []
            if not ids:
                self._once("text", logging.WARNING, "attention maps: callbacks.attention_maps.text encodes to no tokens; skipped")
                return None
            self._sample = torch.tensor([ids[: self.max_tokens]])
        if self._sample is None:
            self._once("sample", logging.INFO, "attention maps: the validation batches carry no input_ids; skipped")
            return None
        max_len = getattr(getattr(pl_module.model, "config", None), "max_seq_len", None)
        ids = self._sample if not max_len else self._sample[:, :max_len]
        return ids.to(pl_module.device)

    @staticmethod
    def _tokenizer(trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        dm = trainer.datamodule
        return getattr(dm, "tokenizer", None) if dm is not None else getattr(pl_module, "tokenizer", None)

    # --- the maps --------------------------------------------------------------------------------------
    def _skip(self, trainer: L.Trainer, model: nn.Module | None) -> bool:
        if model is None:
            return True
        if getattr(getattr(model, "config", None), "kind", "decoder") != "decoder" or not attention_modules(model):
            self._once("family", logging.INFO, "attention maps: decoder families (gpt, llama, mixtral) only; skipped for %s",
                       type(model).__name__)
            return True
        strategy = type(trainer.strategy).__name__
        from lmforge.parallel.plan import model_is_sharded

        if "FSDP" in strategy or "DeepSpeed" in strategy or model_is_sharded(trainer):  # rank 0 alone would hang the others
            self._once("strategy", logging.WARNING, "attention maps: not supported with %s; skipped", strategy)
            return True
        return False

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        model = getattr(pl_module, "model", None)
        if self._skip(trainer, model):
            return
        try:
            from matplotlib.figure import Figure  # lazily: plotting is optional
        except ImportError:
            self._once("mpl", logging.WARNING, "attention maps need matplotlib (pip install matplotlib); skipped")
            return
        ids = self._input_ids(trainer, pl_module)
        if ids is None:
            return
        try:
            weights = capture_attention(model, ids, self.layers)
        except Exception as err:  # a diagnostic must not end a training run
            self._once("forward", logging.WARNING, "attention maps: capture failed (%s); disabled", err)
            self.enabled = False
            return
        tokenizer = self._tokenizer(trainer, pl_module)
        labels = [_token_label(tokenizer, int(t)) for t in ids[0].tolist()] if tokenizer is not None and ids.size(1) <= LABEL_MAX_TOKENS else None
        self._write_and_log(trainer, weights, labels, Figure)

    def _write_and_log(self, trainer: L.Trainer, weights: dict[int, torch.Tensor], labels: list[str] | None, figure_cls: Any) -> None:
        step = trainer.global_step
        out_dir = Path(trainer.default_root_dir) / "attention"
        out_dir.mkdir(parents=True, exist_ok=True)
        paths, captions = [], []
        for layer, w in sorted(weights.items()):
            for head in self.heads:
                if not -w.size(1) <= head < w.size(1):
                    self._once(f"head{head}", logging.WARNING, "attention maps: head %d out of range (%d heads); skipped", head, w.size(1))
                    continue
                h = head % w.size(1)
                path = out_dir / f"step_{step}_layer{layer}_head{h}.png"
                self._draw(figure_cls, w[0, h].numpy(), f"step {step} · layer {layer} · head {h}", labels, path)
                paths.append(path)
                captions.append(f"layer {layer} head {h}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and paths:
                logger.log_image(key="attention", images=[str(p) for p in paths], step=step, caption=captions)
            elif isinstance(logger, TensorBoardLogger):
                from matplotlib.image import imread

                for path, caption in zip(paths, captions):
                    image = imread(path)[..., :3]
                    logger.experiment.add_image(f"attention/{caption.replace(' ', '_')}", image, step, dataformats="HWC")

    def _draw(self, figure_cls: Any, w: Any, title: str, labels: list[str] | None, path: Path) -> None:
        """A (query × key) heatmap; pyplot-free (a Figure of its own) so no GUI backend or global state is touched."""
        fig = figure_cls(figsize=(5, 4.5), dpi=100)
        ax = fig.add_subplot()
        im = ax.imshow(w, cmap=self.cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if labels is not None and len(labels) == w.shape[-1] == w.shape[-2]:
            ticks = range(len(labels))
            ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
            ax.set_yticks(ticks, labels, fontsize=6)
        fig.subplots_adjust(left=0.14, right=0.9, bottom=0.14, top=0.93)  # fixed: tight_layout draws twice
        fig.savefig(path)
