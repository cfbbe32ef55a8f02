"""Every lmforge module imports on its own, as the first lmforge import of a process: no import cycles
(`lmforge.losses.linear_cross_entropy` imported first once failed on one through `lmforge.models`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# In one subprocess (torch loaded once): for each module, forget every lmforge module, then import it first.
PROBE = r"""
import importlib, pkgutil, sys
import torch  # noqa: F401  (loaded once; only lmforge's modules are forgotten between imports)
import lmforge
names = sorted(m.name for m in pkgutil.walk_packages(lmforge.__path__, "lmforge."))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "lmforge" or m.startswith("lmforge.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as err:
        if "lmforge" in str(err) or "circular" in str(err) or "partially initialized" in str(err):
            failed.append(f"{name}: {err}")
print(len(names), "modules")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_without_a_cycle():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) > 50
