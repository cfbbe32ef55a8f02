"""`read_hf_weights`: an HF directory's safetensors read straight through the family's key map (neither HF's model
nor ours built), for init_from of large checkpoints. Checked against the `from_pretrained` path (`load_hf`) on
random HF models of every family saved with `save_pretrained`: the same keys and values, bit for bit. Mixtral's
files hold its experts one by one (transformers fuses them on load): read as they are. A sharded (index + several
files) directory reads the same; one without safetensors goes through `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_bert import hf_bert
from test_hf_gpt2 import hf_gpt2
from test_llama import hf_model as hf_llama
from test_mixtral import hf_mixtral
from test_t5 import hf_t5

from lmforge.interop.hf import load_hf, load_hf_weights, read_hf_weights

MODELS = {
    "gpt2": lambda: hf_gpt2(),
    "llama_untied": lambda: hf_llama(),
    "llama_tied": lambda: hf_llama(tie_word_embeddings=True),
    "mistral": lambda: hf_llama("MistralForCausalLM", sliding_window=None),
    "mixtral": lambda: hf_mixtral(),
    "bert": lambda: hf_bert(),
    "t5": lambda: hf_t5(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_direct_read_equals_the_from_pretrained_path(name: str, tmp_path: Path) -> None:
    MODELS[name]().save_pretrained(tmp_path)
    got = read_hf_weights(tmp_path)  # Mixtral's files hold its experts one by one: transformers fuses them on load
    assert got is not None, "fell back to from_pretrained"
    expected = {k: v.float() for k, v in load_hf(tmp_path).state_dict().items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], value), key


def test_sharded_safetensors_and_bin_checkpoints(tmp_path: Path) -> None:
    model = hf_llama()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")  # an index and several files
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    expected = {k: v.float() for k, v in load_hf(tmp_path / "sharded").state_dict().items()}
    direct = read_hf_weights(tmp_path / "sharded")
    assert direct is not None and all(torch.equal(direct[k], v) for k, v in expected.items())
    model.config.save_pretrained(tmp_path / "bin")  # an older checkpoint: pytorch_model.bin, which transformers loads
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert read_hf_weights(tmp_path / "bin") is None
    fallback = load_hf_weights(tmp_path / "bin")
    assert fallback.keys() == expected.keys() and all(torch.equal(fallback[k], v) for k, v in expected.items())
