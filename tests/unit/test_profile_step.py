"""scripts/gpu/profile_step.py (a GPU diagnostic, checked here on CPU): variant specs parse, the step runs and its
time is split into forward / backward / optimizer, and the profiled kernel time is grouped by kind."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
from profile_step import CATEGORIES, parse, run  # noqa: E402


def test_variant_specs_parse_with_defaults() -> None:
    v = parse("llama-1b:b=8,t=2048,v=32000,full=1")
    assert v == {"model": "llama-1b", "b": 8, "t": 2048, "v": 32000, "compile": True, "full": True, "prof": True,
                 "mode": None, "attn": None}
    assert parse("gpt2:mode=max-autotune-no-cudagraphs,attn=flash")["mode"] == "max-autotune-no-cudagraphs"
    assert parse("gpt2")["b"] == 16 and parse("gpt2:compile=0")["compile"] is False


def test_a_profiled_step_reports_its_parts_and_kernel_kinds() -> None:
    res = run(parse("gpt-nano:b=2,t=32,v=128,compile=0,attn=math"), steps=2, top=5)
    assert res["tokens_per_sec"] > 0 and res["step_ms"] > 0 and res["graph_breaks"] == 0
    assert 0 < res["fwd_ms"] + res["bwd_ms"] + res["opt_ms"] <= 1.5 * res["step_ms"]
    assert len(res["top_kernels"]) == 5 and res["gpu_busy_ms"] > 0
    assert set(res["categories_ms"]) <= {name for name, _ in CATEGORIES} | {"other"}
    assert abs(sum(res["categories_ms"].values()) - res["gpu_busy_ms"]) < 0.05 * res["gpu_busy_ms"] + 0.1
