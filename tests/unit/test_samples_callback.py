"""The sample-generation callback: what it writes, and that it decodes eagerly when the stage compiled the model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from lmforge.callbacks.samples import SampleGeneration
from lmforge.data.tokenizer import ByteTokenizerSpec
from lmforge.generation import generate
from lmforge.models import build


def test_samples_of_a_compiled_model_decode_eagerly_and_match_the_plain_model(tmp_path: Path) -> None:
    # each new KV-cache length of a compiled model would be another compile (seconds; under FSDP/TP's graph breaks
    # it exhausted dynamo's recompile limit): the callback runs generation with the compiler stood down
    tok = ByteTokenizerSpec().train([])
    torch.manual_seed(0)
    config = {"family": "gpt", "vocab_size": tok.vocab_size, "n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 32}
    model = build(config)
    plain = build(config)
    plain.load_state_dict(model.state_dict())
    model.compile(backend="eager")  # in place, as the stage does
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=7, loggers=[], strategy=SimpleNamespace(),
                              default_root_dir=str(tmp_path), datamodule=SimpleNamespace(tokenizer=tok))
    callback = SampleGeneration(prompts=["ab"], max_new_tokens=5, temperature=0.0, top_k=None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    callback.on_validation_epoch_end(trainer, SimpleNamespace(model=model, device=torch.device("cpu")))
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == 0  # nothing traced
    row = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[-1])
    ids = torch.tensor([tok.encode("ab")])
    expected = tok.decode(generate(plain, ids, max_new_tokens=5)[0, ids.size(1):].tolist())
    assert row == {"step": 7, "prompt": "ab", "completion": expected}
