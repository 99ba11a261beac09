"""Reading artifacts: a damaged or half-written file (an interrupted copy, a full disk) is one
DataError naming the file and the fix, never a parser's traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from saebench.errors import DataError

SAFETENSORS_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


def damaged(path: Path, fix: str, why: str = "") -> DataError:
    return DataError(f"{path} is damaged or half-written{f' ({why})' if why else ''}: {fix}")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read(path: str | Path, fix: str, parse: Callable[[Path], Any], errors: tuple[type[Exception], ...]) -> Any:
    """parse(path), with any of `errors` turned into one DataError naming the file and the fix."""
    path = Path(path)
    try:
        return parse(path)
    except errors as e:
        raise damaged(path, fix, first_line(e)) from None


def read_json(path: str | Path, fix: str) -> Any:
    return _read(path, fix, lambda p: json.loads(p.read_text()), (json.JSONDecodeError, UnicodeDecodeError))


def read_jsonl(path: str | Path, fix: str) -> list[dict]:
    """One JSON object per line; a half-written last line (a killed writer) is dropped, any other bad line is
    an error."""
    path = Path(path)
    text = _read(path, fix, Path.read_text, (UnicodeDecodeError,))
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break
            raise damaged(path, fix, f"line {i + 1}: {first_line(e)}") from None
    return rows


def read_yaml(path: str | Path, fix: str) -> Any:
    return _read(path, fix, lambda p: yaml.safe_load(p.read_text()), (yaml.YAMLError, UnicodeDecodeError))


def read_safetensors(path: str | Path, device: str | torch.device, fix: str) -> dict[str, torch.Tensor]:
    return _read(path, fix, lambda p: load_file(str(p), device=str(device)), SAFETENSORS_ERRORS)


def read_safetensors_metadata(path: str | Path, fix: str) -> dict[str, str]:
    def metadata(p: Path) -> dict[str, str]:
        with safe_open(str(p), "pt") as f:
            return f.metadata() or {}

    return _read(path, fix, metadata, SAFETENSORS_ERRORS)
