"""The classic SFT failure is a model that never stops. Trained on response-only targets that end with the
end-of-turn token, a tiny model learns to answer a prompt and then emit `<|im_end|>`, where generation stops."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.data.chat import CHATML_SPECIALS, encode_chatml, im_end_id
from lmforge.data.sft import SFTDataModule
from lmforge.data.tokenizer import ByteTokenizerSpec
from lmforge.generation import generate
from lmforge.models import build
from lmforge.objectives.clm import CausalLM

PAIRS = [("Who is there?", "Nay, answer me."), ("Long live the king!", "Bernardo?"), ("He.", "You come most carefully.")]


def test_a_tiny_sft_model_answers_and_stops(tmp_path: Path):
    torch.manual_seed(0)
    tok = ByteTokenizerSpec().train(iter([""]))
    tok.add_special_tokens(CHATML_SPECIALS)
    rows = [json.dumps({"prompt": p, "response": r}) for p, r in PAIRS]
    (tmp_path / "train.jsonl").write_text("\n".join(rows * 4) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(rows) + "\n")
    dm = SFTDataModule(source={"kind": "jsonl", "train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "val.jsonl")},
                       max_length=64, batch_size=12)
    dm.set_tokenizer(tok)
    dm.setup()
    model = build({"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "intermediate_size": 128,
                   "vocab_size": tok.vocab_size, "max_seq_len": 128})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    objective = CausalLM()
    batch = next(iter(dm.train_dataloader()))
    for _ in range(150):
        loss = objective(model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    stop = im_end_id(tok)
    for prompt, response in PAIRS:
        ids = torch.tensor([encode_chatml(tok, [{"role": "user", "content": prompt}])])
        out = generate(model, ids, max_new_tokens=40, eos_token_id=[stop, tok.eos_id])[0, ids.size(1):].tolist()
        assert stop in out, f"never ended its turn: {tok.decode(out)!r}"  # stopped well before the 40-token limit
        assert tok.decode(out[: out.index(stop)]) == response
