"""Directory checkpoints (FSDP's DCP shards, DeepSpeed's ZeRO partitions) written so a kill never leaves a half one.

Every rank writes its part into `<name>.partial`; after a barrier rank 0 moves the old directory aside, renames
`.partial` into place and deletes the old one. A crash mid-write leaves the previous checkpoint whole, and
`ckpt_path=last` never picks a `.partial` (it is not named `*.ckpt`). Assumes what multi-node checkpointing
needs anyway: one filesystem every rank sees.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def swap_into_place(partial: Path, path: Path) -> None:
    """Replace `path` (a directory, a file, or nothing) by the complete `partial` directory; rank 0 only."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.is_dir() and not path.is_symlink():
        path.rename(old)
    elif path.exists() or path.is_symlink():
        path.unlink()
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def prepare_partial(strategy: Any, filepath: Any) -> tuple[Path, Path]:
    """(final path, empty `.partial` beside it), the same on every rank; collective."""
    path = Path(strategy.broadcast(str(filepath)))
    partial = path.with_name(path.name + ".partial")
    if strategy.global_rank == 0 and partial.exists():
        shutil.rmtree(partial)
    strategy.barrier("lmforge_ckpt_clean")
    return path, partial


def save_directory_atomically(strategy: Any, filepath: Any, write: Callable[[Path], None]) -> None:
    """`write(partial_dir)` runs on every rank; `strategy` provides broadcast, barrier and global_rank."""
    path, partial = prepare_partial(strategy, filepath)
    write(partial)
    strategy.barrier("lmforge_ckpt_written")
    if strategy.global_rank == 0:
        swap_into_place(partial, path)
    strategy.barrier("lmforge_ckpt_swapped")


def remove_checkpoint_path(path: Any) -> None:
    """A checkpoint may be a file or a directory of shards."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
