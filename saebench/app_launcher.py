"""`saebench app RUN ...`: checks the runs, then serves app/Home.py with streamlit on host:port."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from saebench.errors import DataError

APP_DIR = Path(__file__).resolve().parent.parent / "app"
RUNS_ENV = "SAEBENCH_APP_RUNS"


def check_runs(runs: list[str]) -> list[Path]:
    paths = [Path(r).resolve() for r in runs]
    for path in paths:
        if not (path / "config.yaml").exists():
            raise DataError(f"{path} is not a run directory (no config.yaml): train one with `saebench train CONFIG`")
    return paths


def launch(runs: list[str], host: str = "127.0.0.1", port: int = 8501) -> None:
    paths = check_runs(runs)
    if not (APP_DIR / "Home.py").exists():
        raise DataError(
            f"the app is not installed at {APP_DIR}: install saebench from its source folder (pip install -e .)"
        )
    env = {**os.environ, RUNS_ENV: os.pathsep.join(str(p) for p in paths)}
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_DIR / "Home.py"),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]
    print(f"saebench app: http://{host}:{port}  ({len(paths)} run{'s' * (len(paths) > 1)})", flush=True)
    os.execve(sys.executable, cmd, env)  # become the server, so a signal to `saebench app` reaches it (no orphan)
