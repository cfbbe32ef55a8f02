"""lmforge.kernels.cpu_malloc: with `cpu_malloc=keep` a freed activation-sized block stays in the process for the
next step instead of going back to the OS (measured by resident memory in a fresh process), and bad values
of the key are one clear error."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lmforge.config_schema import check_schema
from lmforge.errors import ConfigError

PROBE = """
import sys, torch
from lmforge.kernels.cpu_malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
torch.ones(8).sum()  # torch's lazy start-up allocations happen before the measurement
xs = [torch.ones(6 << 20) for _ in range(4)]  # a step's worth of 24 MB activations, touched
peak = rss_mb()
del xs
print(peak - rss_mb())  # MB handed back to the OS by the frees
"""


def _released_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_holds_freed_blocks_that_glibc_would_return():
    assert _released_mb("keep") < 10  # the 96 MB the "step" used stay mapped for the next one
    assert _released_mb("system") > 60  # glibc's defaults return them (mmapped blocks, a trimmed heap top)


def test_bad_values_are_one_clear_error():
    with pytest.raises(ConfigError, match=r"cpu_malloc: 'jemalloc' is not one of 'keep', 'system'"):
        check_schema({"cpu_malloc": "jemalloc"})
    from lmforge.run import _configure_cpu_malloc

    with pytest.raises(ConfigError, match="cpu_malloc: unknown value 'tcmalloc'"):
        _configure_cpu_malloc(OmegaConf.create({"cpu_malloc": "tcmalloc", "trainer": {}}))
