"""Reading artifacts: a damaged or half-written file (an interrupted copy, a full disk) is one
DataError naming the file and the fix, never a parser's traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from saebench.errors import DataError


def damaged(path: Path, fix: str, why: str = "") -> DataError:
    return DataError(f"{path} is damaged or half-written{f' ({why})' if why else ''}: {fix}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path: str | Path, fix: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, fix, _first_line(e)) from None


def read_jsonl(path: str | Path, fix: str) -> list[dict]:
    """One JSON object per line; a half-written last line (a killed writer) is dropped, any other bad line is
    an error."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise damaged(path, fix, _first_line(e)) from None
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not path.read_text().endswith("\n"):
                break
            raise damaged(path, fix, f"line {i + 1}: {_first_line(e)}") from None
    return rows


def read_yaml(path: str | Path, fix: str) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise damaged(path, fix, _first_line(e)) from None


def read_safetensors(path: str | Path, device: str | torch.device, fix: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise damaged(path, fix, _first_line(e)) from None


def read_safetensors_metadata(path: str | Path, fix: str) -> dict[str, str]:
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise damaged(path, fix, _first_line(e)) from None
