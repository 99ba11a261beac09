"""`saebench analyze` from the command line: kill -9 and resume, user errors."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from test_analysis import make_run
from test_cli import one_error_line, run_cli

import saebench as sb
from saebench.errors import DataError

ARGS = ["--tokens", "6000", "--batch-size", "4", "--examples", "5", "--checkpoint-tokens", "200"]
VOLATILE_META = ("written", "seconds", "run", "sae")


def dump(path):
    """Every row of every table, the meta rows that name paths or times left out."""
    with sqlite3.connect(path) as con:
        tables = [
            t
            for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'search_%'")
        ]
        out = {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    out["meta"] = [row for row in out["meta"] if row[0] not in VOLATILE_META]
    return out


@pytest.mark.slow
def test_killed_analysis_resumes_to_the_same_store(tmp_path):
    whole, _ = make_run(tmp_path, name="whole")
    killed, _ = make_run(tmp_path, name="killed")
    assert run_cli("analyze", str(whole), *ARGS, cwd=tmp_path).returncode == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saebench.cli", "analyze", str(killed), *ARGS],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / ".analysis" / "state.safetensors"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the analysis finished before it could be killed"

    assert not (killed / "features.sqlite").exists()
    with pytest.raises(DataError, match="run `saebench analyze"):
        sb.FeatureStore(killed)  # the partial state is never readable as a store
    line = one_error_line(run_cli("analyze", str(killed), *ARGS, cwd=tmp_path))
    assert "pass --resume to continue it or --restart to start over" in line
    assert run_cli("analyze", str(killed), *ARGS, "--resume", cwd=tmp_path).returncode == 0
    assert not (killed / ".analysis").exists()
    assert dump(killed / "features.sqlite") == dump(whole / "features.sqlite")


def test_user_errors_exit_2_and_keep_the_store(tmp_path):
    run, _ = make_run(tmp_path)
    assert run_cli("analyze", str(run), "--tokens", "300", cwd=tmp_path).returncode == 0
    before = (run / "features.sqlite").read_bytes()
    line = one_error_line(run_cli("analyze", str(run), "--tokens", "10000000", cwd=tmp_path))
    assert "--tokens 10000000 is more than the 'test' split holds" in line
    assert "lower --tokens or pick a larger --split" in line
    assert (run / "features.sqlite").read_bytes() == before
    line = one_error_line(run_cli("analyze", str(tmp_path / "nowhere"), cwd=tmp_path))
    assert "holds no trained SAE" in line and "saebench train" in line
    line = one_error_line(run_cli("analyze", str(run), "--examples", "0", cwd=tmp_path))
    assert "n_examples must be at least 1" in line
