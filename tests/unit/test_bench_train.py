"""The train-vs-hf harness's step timer: what it counts per step (times and page faults) and its alternation."""

from __future__ import annotations

import mmap
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_train  # noqa: E402


def test_timed_rounds_counts_each_steps_fresh_pages_and_alternates() -> None:
    calls: list[str] = []

    def touch_fresh_memory() -> None:
        """64 MB of fresh pages each call: an anonymous mapping of its own, one byte written per 4-KiB page (a
        malloc'd tensor was not always fresh: in a long test process glibc sometimes served it from memory it kept)."""
        calls.append("fresh")
        with mmap.mmap(-1, 64 << 20) as region:
            region[::4096] = b"\1" * ((64 << 20) // 4096)

    def nothing() -> None:
        calls.append("idle")

    times, faults = bench_train.timed_rounds({"fresh": touch_fresh_memory, "idle": nothing}, rounds=2, steps=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"fresh": 6, "idle": 6} and all(t >= 0 for v in times.values() for t in v)
    assert min(faults["fresh"]) >= (64 << 20) // (2 << 20)  # 16K 4-KiB pages here; at least 32 were they 2-MiB huge pages
    assert max(faults["idle"]) < 16
    # warm-up once each, then fresh first in round 0 and last in round 1
    assert calls == ["fresh", "idle"] + ["fresh"] * 3 + ["idle"] * 3 + ["idle"] * 3 + ["fresh"] * 3
