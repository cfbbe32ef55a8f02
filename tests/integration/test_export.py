"""scripts/export.py: an lmforge checkpoint -> an HF directory that transformers loads offline with the family's
Auto class, giving the same logits, with the special ids and dtype where HF tools and vLLM read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.data.chat import render_chatml
from lmforge.data.tokenizer import BPETokenizerSpec, Tokenizer
from lmforge.interop.export import export_checkpoint
from lmforge.models import build

pytestmark = pytest.mark.slow

MODELS = {
    "gpt": ({"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 64}, "AutoModelForCausalLM", "GPT2LMHeadModel"),
    "llama": ({"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 64, "max_seq_len": 64},
              "AutoModelForCausalLM", "LlamaForCausalLM"),
    "bert": ({"family": "bert", "n_layer": 1, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "max_seq_len": 64},
             "AutoModelForMaskedLM", "BertForMaskedLM"),
    "t5": ({"family": "t5", "n_layer": 1, "n_head": 2, "n_embd": 32, "head_dim": 16, "intermediate_size": 64, "max_seq_len": 64},
           "AutoModelForSeq2SeqLM", "T5ForConditionalGeneration"),
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return BPETokenizerSpec(vocab_size=300).train(["What light through yonder window breaks? " * 40, "It is the east. " * 40])


def write_ckpt(family: str, tokenizer: Tokenizer, path: Path) -> torch.nn.Module:
    """A checkpoint as train.py writes it (weights under `model.`, config and tokenizer in `lmforge`)."""
    torch.manual_seed(0)
    cfg = {**MODELS[family][0], "vocab_size": tokenizer.vocab_size}
    model = build(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped one would show in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lmforge": {"schema_version": 1, "config": {"model": cfg}, "tokenizer": tokenizer.to_json()}}, path)
    return model.eval()


def hf_logits(hf: torch.nn.Module, family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if family == "t5":
            return hf(input_ids=ids, decoder_input_ids=ids).logits
        return hf(input_ids=ids).logits


def our_logits(model: torch.nn.Module, family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, ids) if family == "t5" else model(ids)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_export_gives_identical_logits(family, tokenizer, root, tmp_path):
    import transformers

    ours = write_ckpt(family, tokenizer, tmp_path / "model.ckpt")
    out = tmp_path / "hf"
    if family == "gpt":  # the script once, as a user runs it; the same function in-process for the rest
        proc = subprocess.run([sys.executable, str(root / "scripts" / "export.py"), "--ckpt", str(tmp_path / "model.ckpt"), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0 and proc.stdout.startswith("wrote "), proc.stderr[-2000:]
    else:
        export_checkpoint(tmp_path / "model.ckpt", out)
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    hf = getattr(transformers, MODELS[family][1]).from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == MODELS[family][2]
    ids = torch.tensor([tokenizer.encode("What light through yonder window breaks?")])
    torch.testing.assert_close(hf_logits(hf, family, ids), our_logits(ours, family, ids), atol=1e-5, rtol=0)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [MODELS[family][2]] and config["torch_dtype"] == "float32"
    assert (config["eos_token_id"], config["pad_token_id"]) == (tokenizer.eos_id, tokenizer.pad_id)
    assert (hf.generation_config.eos_token_id, hf.generation_config.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok("It is the east.")["input_ids"] == tokenizer.encode("It is the east.")
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.model_max_length) == ("<|eos|>", "<|pad|>", 64)
    messages = [{"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chatml(messages)


def test_bf16_export_loads_as_bf16(tokenizer, tmp_path):
    import transformers

    ours = write_ckpt("llama", tokenizer, tmp_path / "model.ckpt")
    out = export_checkpoint(tmp_path / "model.ckpt", tmp_path / "hf", dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    ids = torch.tensor([tokenizer.encode("It is the east.")])
    torch.testing.assert_close(hf_logits(hf, "llama", ids).float(), our_logits(ours.to(torch.bfloat16), "llama", ids).float(), atol=0.05, rtol=0)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_other_families_load_with_their_auto_class(family, tokenizer, tmp_path):
    import transformers

    ours = write_ckpt(family, tokenizer, tmp_path / "model.ckpt")
    out = export_checkpoint(tmp_path / "model.ckpt", tmp_path / "hf")
    hf = getattr(transformers, MODELS[family][1]).from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == MODELS[family][2]
    ids = torch.tensor([tokenizer.encode("It is the east.")])
    torch.testing.assert_close(hf_logits(hf, family, ids), our_logits(ours, family, ids), atol=1e-5, rtol=0)
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())  # ChatML is for decoders


def test_export_refuses_bad_input_in_one_line(root, tmp_path):
    proc = subprocess.run([sys.executable, str(root / "scripts" / "export.py"), "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
