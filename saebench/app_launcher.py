"""`saebench app RUN ...`: checks the runs, then serves saebench/app/Home.py with streamlit on host:port."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from saebench.errors import DataError
from saebench.runs import Run

APP_DIR = Path(__file__).resolve().parent / "app"  # package data: Home.py, pages/, state.py
RUNS_ENV = "SAEBENCH_APP_RUNS"


def launch(runs: list[str], host: str = "127.0.0.1", port: int = 8501) -> None:
    paths = [Run.open(Path(r).resolve()).path for r in runs]
    if not (APP_DIR / "Home.py").exists():
        raise DataError(
            f"the app is missing from {APP_DIR}: "
            "reinstall saebench (pip install saebench, or pip install -e . in a checkout)"
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
