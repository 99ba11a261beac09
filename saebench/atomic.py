"""Atomic file writes: each file is written under <folder>/.partial/ and renamed into place.

A run killed mid-write leaves only .partial/ behind (safetensors' own temp files included, since
it creates them beside its target), never a half-written file under a real name;
`clean_partial(folder)` removes what such a run left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

PARTIAL = ".partial"


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """`write(tmp_path)` writes the file; it appears at `path` whole or not at all."""
    path = Path(path)
    staging = path.parent / PARTIAL
    while True:
        staging.mkdir(exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=staging, prefix=f"{path.name}.")
            break
        except FileNotFoundError:  # another writer (a rank, a thread) removed the empty folder in between
            continue
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        try:
            staging.rmdir()
        except OSError:
            pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def clean_partial(folder: str | Path) -> None:
    shutil.rmtree(Path(folder) / PARTIAL, ignore_errors=True)
