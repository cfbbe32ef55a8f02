"""Silences warnings that dependencies raise about each other, which a user can do nothing about.

Why: every run printed, once per process, Lightning's (2.6) use of torch's deprecated `LeafSpec` class when it
flattens a batch (`lightning/pytorch/utilities/_pytree.py`: "`isinstance(treespec, LeafSpec)` is deprecated",
a FutureWarning from torch 2.13). It is about Lightning's code, not the run's; warnings like it teach users to
skip the warnings that matter. Each filter matches one message exactly, so anything else still shows.
"""

from __future__ import annotations

import re
import warnings

# (message, category) of each silenced warning: the message as the dependency words it, matched from its start
DEPENDENCY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead.",
     FutureWarning),
)


def quiet_dependency_warnings() -> None:
    """Install the filters (idempotent: `warnings.filterwarnings` drops an identical filter before adding it)."""
    for message, category in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
