"""Attention capture equals the softmax written out by hand; the callback draws PNGs in a tiny in-process run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import train_in_process

from lmforge.callbacks.attention_maps import attention_modules, capture_attention
from lmforge.models import build

GPT = {"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 16, "vocab_size": 50}
LLAMA = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 64,
         "max_seq_len": 16, "vocab_size": 50}


def test_captured_weights_are_causal_softmax_of_qk():
    torch.manual_seed(0)
    model = build(GPT).eval()
    ids = torch.randint(0, 50, (1, 10))
    inputs: list[torch.Tensor] = []
    attn = model.blocks[1].attn
    handle = attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    weights = capture_attention(model, ids, [-1])
    handle.remove()
    B, T, C = inputs[0].shape
    q, k, _ = attn.qkv(inputs[0]).view(B, T, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // 2)
    expected = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    assert list(weights) == [1] and weights[1].shape == (1, 2, T, T)
    torch.testing.assert_close(weights[1], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(1, 2, T), atol=1e-6, rtol=0)
    assert not attn.capture_weights and attn.last_weights is None  # switched back off


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama-gqa"])
def test_capture_leaves_outputs_unchanged(cfg: dict):
    torch.manual_seed(0)
    model = build(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(ids)
    weights = capture_attention(model, ids, [0, -1, 7])  # 7: out of range, left out
    assert sorted(weights) == [0, 1] and weights[0].shape == (2, cfg["n_head"], 12, 12)
    assert torch.triu(weights[0], diagonal=1).abs().max() == 0  # causal
    for m in attention_modules(model):
        m.capture_weights = True
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)  # eager math == sdpa


def test_callback_writes_pngs_in_a_tiny_run(cache_dir: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    corpus = tmp_path / "corpus"  # a few KB instead of Shakespeare: nothing to tokenize for seconds
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_text(f"Document {i}. " + "To be, or not to be, that is the question. " * 6)
    overrides = ["debug=fast", "tokenizer=byte", "data=text_files", f"data.corpus.train_glob={corpus}/*.txt", "data.clean=null",
                 "callbacks.progress_bar=null", "callbacks.samples=null",
                 "callbacks.model_summary=null", "callbacks.checkpoint=null", "callbacks.throughput=null",
                 "model=gpt-nano", "model.n_layer=2", "model.n_embd=32", "data.block_size=16", "data.batch_size=4",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                 f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path / 'logs'}",
                 "callbacks.attention_maps.enabled=true", "callbacks.attention_maps.heads=[0,-1]",
                 "callbacks.attention_maps.layers=[-1]"]
    train_in_process(overrides, tmp_path / "run")
    pngs = sorted(p.name for p in (tmp_path / "run" / "attention").glob("*.png"))
    assert pngs == ["step_2_layer1_head0.png", "step_2_layer1_head3.png"]
    meta = json.loads((tmp_path / "run" / "run_meta.json").read_text())
    assert meta["params_total"] > 0 and meta["tokenizer_fingerprint"] and meta["data_fingerprint"]
    hparams = (tmp_path / "run" / "csv" / "hparams.yaml").read_text()
    assert "model.n_layer: 2" in hparams and "meta/git_commit" in hparams


def test_callback_logs_its_pngs_to_an_offline_wandb_run(monkeypatch, tmp_path: Path):
    """The W&B path: a real offline run (no server) receives the heatmaps as images under the `attention` key
    with their captions; the PNGs in the run's media folder are the ones written to <run dir>/attention."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("wandb")
    import hashlib
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from lmforge.callbacks.attention_maps import AttentionMaps
    from lmforge.data.tokenizer import ByteTokenizerSpec

    for key in ("WANDB_API_KEY", "WANDB_DISABLED", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    tok = ByteTokenizerSpec().train([])
    torch.manual_seed(0)
    model = build({**GPT, "vocab_size": tok.vocab_size}).eval()
    logger = WandbLogger(project="lmforge-test", save_dir=str(tmp_path), offline=True)
    run_dir = Path(logger.experiment.dir).parent  # <tmp>/wandb/offline-run-<ts>-<id>
    trainer = SimpleNamespace(sanity_checking=False, global_step=5, default_root_dir=str(tmp_path / "run"),
                              loggers=[logger], strategy=SimpleNamespace(), datamodule=SimpleNamespace(tokenizer=tok))
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    callback = AttentionMaps(enabled=True, layers=[-1], heads=[0, 1])
    try:
        callback.on_validation_batch_start(trainer, module, {"input_ids": torch.tensor([tok.encode("to be or not")])}, 0)
        callback.on_validation_epoch_end(trainer, module)
    finally:
        logger.experiment.finish()

    def digests(paths) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    pngs = sorted((tmp_path / "run" / "attention").glob("*.png"))
    assert [p.name for p in pngs] == ["step_5_layer1_head0.png", "step_5_layer1_head1.png"]
    media = sorted((run_dir / "files" / "media" / "images").glob("attention_*.png"))
    assert len(media) == 2 and digests(media) == digests(pngs)
    names = [*(f"media/images/{p.name}" for p in media), "layer 1 head 0", "layer 1 head 1"]
    record = _wandb_record(run_dir, names)  # the run's log: history rows as protobuf
    for name in names:
        assert name.encode() in record, name


def _wandb_record(run_dir: Path, names: list[str], timeout: float = 30.0) -> bytes:
    """The run's .wandb log once it holds `names` (or after `timeout` s): wandb's service process can still be
    writing it after `finish()` returns (seen in CI: only the file header had been written)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        record = next(run_dir.glob("run-*.wandb")).read_bytes()
        if all(n.encode() in record for n in names) or time.monotonic() > deadline:
            return record
        time.sleep(0.2)
