"""A built wheel carries the app and the kernel sources: installed outside the checkout, `saebench app`
serves and the kernels find their sources."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_analysis import make_run

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """saebench's wheel, built from this checkout and installed (no dependencies) into a bare folder."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(root / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("saebench-*.whl")
    target = root / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return target


def outside(target: Path) -> dict:
    """An environment whose `import saebench` finds the installed wheel, not the checkout."""
    return {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_the_wheel_holds_the_app_and_the_kernel_sources(installed, tmp_path):
    check = (
        "import saebench, saebench.app_launcher as app, saebench.kernels as k, saebench.models as m\n"
        "print(saebench.__file__)\n"
        "assert (app.APP_DIR / 'Home.py').exists() and len(list((app.APP_DIR / 'pages').glob('*.py'))) >= 4\n"
        "assert all((k.KERNEL_DIR / f).exists() for f in (*k.SOURCES, 'sparse_decoder.cuh'))\n"
        "assert (m.TINY_DIR / 'model.safetensors').exists()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=outside(installed)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).is_relative_to(installed)


@pytest.mark.slow
def test_saebench_app_from_the_wheel_answers_its_health_endpoint(installed, tmp_path):
    run, _ = make_run(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "saebench.cli", "app", str(run), "--port", str(port)],
        cwd=tmp_path,
        env=outside(installed),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert server.stdout is not None
    try:
        deadline, answer = time.time() + 120, None
        while time.time() < deadline and server.poll() is None:
            try:
                answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert answer == b"ok", server.stdout.read() if server.poll() is not None else "no answer"
    finally:
        server.terminate()
        server.wait(timeout=30)
