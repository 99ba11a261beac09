from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saebench.atomic import atomic_save_file, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_safetensors_write_leaves_only_the_target(tmp_path):
    atomic_save_file({"w": torch.arange(6.0)}, tmp_path / "w.safetensors", metadata={"k": "v"})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], torch.arange(6.0))


def test_a_writer_whose_staging_folder_another_writer_just_removed_still_writes(tmp_path, monkeypatch):
    # two ranks write into one folder: B finishes and removes the empty .partial/ between A's mkdir and mkstemp
    import tempfile

    real, calls = tempfile.mkstemp, []

    def racing_mkstemp(*args, dir, **kwargs):
        calls.append(dir)
        if len(calls) == 1:
            Path(dir).rmdir()
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", racing_mkstemp)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
