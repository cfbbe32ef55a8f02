"""MuonAdamW equals torch's Muon and AdamW stepped separately on the same parameter split."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from lmforge.models import build
from lmforge.optim.muon import MuonAdamW
from lmforge.optim.param_groups import muon_param_groups

SMALL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 8}


def loss_of(model, x):
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def test_groups_split_matrices_tables_vectors():
    model = build(SMALL, vocab_size=32)
    matrices, tables, vectors = muon_param_groups(model, 0.1)
    assert matrices["use_muon"] and not tables["use_muon"] and vectors["weight_decay"] == 0.0
    assert {id(p) for p in tables["params"]} == {id(model.wte.weight), id(model.wpe.weight)}  # head is tied to wte
    assert all(p.ndim == 2 for p in matrices["params"]) and all(p.ndim == 1 for p in vectors["params"])
    assert len(matrices["params"]) + len(tables["params"]) + len(vectors["params"]) == len(list(model.parameters()))


def test_matches_separate_torch_optimizers_and_follows_scheduler():
    torch.manual_seed(0)
    ours = build(SMALL, vocab_size=32)
    ref = copy.deepcopy(ours)
    x = torch.randint(0, 32, (4, 9))
    opt = MuonAdamW(muon_param_groups(ours, 0.1), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    g = muon_param_groups(ref, 0.1)
    muon = torch.optim.Muon([{"params": g[0]["params"]}], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": g[1]["params"]}, {"params": g[2]["params"], "weight_decay": 0.0}],
                              lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        loss_of(ours, x).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        loss_of(ref, x).backward()
        muon.step()
        adamw.step()
        for o in (muon, adamw):
            for group in o.param_groups:
                group["lr"] = 1e-2 / (step + 2)
            o.zero_grad()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    model = build(SMALL, vocab_size=32)
    x = torch.randint(0, 32, (4, 9))
    make = partial(MuonAdamW, lr=1e-2, weight_decay=0.1)
    opt = make(muon_param_groups(model, 0.1))
    loss_of(model, x).backward()
    opt.step()
    twin = copy.deepcopy(model)
    opt2 = make(muon_param_groups(twin, 0.1))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: no shared tensors
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        loss_of(m, x).backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_rejects_non_matrix_in_muon_group():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_muon": True}])
