import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import saebench as sb

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "saebench.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def one_error_line(result):
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("saebench: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "name: t\nmodel: tiny\nruns_dir: runs\ndata:\n  split: test\n  max_documents: 100\n  context_size: 32\n"
        "harvest:\n  hooks: [blocks.0.hook_resid_post]\n  n_tokens: 2000\n  batch_size: 16\n  shard_contexts: 16\n"
    )
    return path


def test_harvest_writes_cache(config, tmp_path):
    result = run_cli("harvest", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"cache_dir": "runs/t/activations", "tokens": 2000, "shards": summary["shards"], "complete": True}
    manifest = json.loads((tmp_path / "runs/t/activations/manifest.json").read_text())
    assert manifest["n_tokens"] == 2000 and manifest["model"] == "tiny"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "harvest.hooks=[blocks.0.hook_resid_pots]",
            "no hook 'blocks.0.hook_resid_pots'; closest: blocks.0.hook_resid_post",
        ),
        ("harvest.n_tokns=5", "unknown config key 'harvest.n_tokns'; did you mean 'n_tokens'?"),
        ("data.path=./missing.txt", "dataset file not found: ./missing.txt"),
        ("dtype=float8", "unknown dtype 'float8'"),
        ("model=./nowhere", "model folder not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(config, tmp_path, override, message):
    line = one_error_line(run_cli("harvest", str(config), "--set", override, cwd=tmp_path))
    assert message in line


def test_error_keeps_existing_cache(config, tmp_path):
    assert run_cli("harvest", str(config), cwd=tmp_path).returncode == 0
    cache = tmp_path / "runs/t/activations"
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    line = one_error_line(run_cli("harvest", str(config), "--set", "harvest.n_tokens=4000", cwd=tmp_path))
    assert "other settings" in line
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before


def test_missing_config_file(tmp_path):
    assert "config file not found" in one_error_line(run_cli("harvest", "nope.yaml", cwd=tmp_path))


@pytest.mark.slow
def test_killed_harvest_resumes_to_the_same_files(config, tmp_path):
    """SIGKILL a real harvest after its first shards, rerun it, compare with an uninterrupted run."""
    import signal
    import time

    big = ["--set", "harvest.n_tokens=20000", "--set", "data.max_documents=400"]
    ref = run_cli("harvest", str(config), *big, "--set", "name=ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saebench.cli", "harvest", str(config), *big, "--set", "name=killed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = tmp_path / "runs/killed/activations/manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads(manifest.read_text())["complete"]
    again = run_cli("harvest", str(config), *big, "--set", "name=killed", cwd=tmp_path)
    assert again.returncode == 0, again.stderr

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(tmp_path / "runs/killed/activations") == files(tmp_path / "runs/ref/activations")


TRAIN = [
    "--set",
    "sae.expansion=2",
    "--set",
    "sae.k=8",
    "--set",
    "train.n_tokens=6144",
    "--set",
    "train.batch_size=512",
    "--set",
    "train.checkpoint_every=4",
    "--set",
    "train.log_every=2",
    "--set",
    "harvest.buffer_tokens=2048",
    "--set",
    "eval.n_tokens=2000",
    "--set",
    "eval.n_contexts=4",
]


def test_train_eval_and_exact_resume_from_the_cli(config, tmp_path):
    whole = run_cli("train", str(config), *TRAIN, "--set", "name=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    part = run_cli("train", str(config), *TRAIN, "--set", "name=part", "--stop-after-steps", "5", cwd=tmp_path)
    assert part.returncode == 0, part.stderr
    assert not (tmp_path / "runs/part/sae").exists()
    again = run_cli("train", str(config), *TRAIN, "--set", "name=part", cwd=tmp_path)
    assert "already holds a training run: pass --resume" in one_error_line(again)
    resumed = run_cli("train", str(config), *TRAIN, "--set", "name=part", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = (tmp_path / "runs/whole/sae/sae.safetensors").read_bytes()
    assert a == (tmp_path / "runs/part/sae/sae.safetensors").read_bytes()

    result = run_cli("eval", "runs/whole", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "runs/whole/eval.json").read_text())
    for side in ("sae", "random_baseline"):
        assert {"fvu", "l0", "ce_recovered", "kl_score", "dead_fraction", "shrinkage"} <= report[side].keys()
    assert report["sae"]["fvu"] < report["random_baseline"]["fvu"]


def test_train_d_in_mismatch_names_both_numbers(config, tmp_path):
    line = one_error_line(run_cli("train", str(config), "--set", "sae.d_in=100", cwd=tmp_path))
    assert "sae.d_in is 100 but blocks.0.hook_resid_post of tiny has width" in line and "set sae.d_in=" in line


def test_eval_of_a_missing_run(tmp_path):
    assert "is not a finished training run" in one_error_line(run_cli("eval", "runs/nothing", cwd=tmp_path))


@pytest.mark.slow
def test_eval_and_analyze_at_k_prime_from_the_cli(tmp_path):
    from test_analysis import make_run

    run, _ = make_run(tmp_path, activation="hierarchical_topk", k=6)
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(
        cfg.replace("n_tokens: 100000", "n_tokens: 2000").replace("n_contexts: 64", "n_contexts: 4")
    )
    result = run_cli("eval", str(run), "--k", "2,6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval.json").read_text())
    assert list(report["by_k"]) == ["2", "6"] and report["by_k"]["6"]["sae"] == report["sae"]
    assert report["by_k"]["2"]["sae"]["l0"] <= 2 and report["by_k"]["2"]["random_baseline"]["l0"] <= 2
    assert report["by_k"]["2"]["sae"]["fvu"] != report["sae"]["fvu"]
    assert {"ce_recovered", "kl_score"} <= report["by_k"]["2"]["sae"].keys() & report["by_k"]["2"][
        "random_baseline"
    ].keys()
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("at k'"))
    assert header.split()[2:] == ["sae@2", "random@2", "sae@6", "random@6"]
    fvu = [line for line in table if line.startswith("fvu ")][1].split()
    assert float(fvu[1]) == pytest.approx(report["by_k"]["2"]["sae"]["fvu"], abs=1e-4)
    assert run_cli("analyze", str(run), "--k", "2", "--tokens", "300", cwd=tmp_path).returncode == 0
    assert sb.FeatureStore(run).meta["inference_k"] == 2
    batch, _ = make_run(tmp_path, activation="batchtopk", name="batch")
    assert "learned threshold" in one_error_line(run_cli("eval", str(batch), "--k", "4", cwd=tmp_path))
    bad = run_cli("eval", str(run), "--k", "2,x", cwd=tmp_path)
    assert bad.returncode == 2 and "integers separated by commas" in bad.stderr


def test_two_hooks_train_in_one_pass_and_evaluate(config, tmp_path):
    hooks = ["--set", "harvest.hooks=[blocks.0.hook_resid_post, blocks.1.hook_mlp_out]"]
    result = run_cli("train", str(config), *TRAIN, *hooks, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"):
        assert json.loads((tmp_path / f"runs/t/{hook}/sae/cfg.json").read_text())["hook"] == hook
    result = run_cli("eval", "runs/t", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs/t/blocks.1.hook_mlp_out/eval.json").exists()


def test_steer_from_the_cli(config, tmp_path):
    assert run_cli("train", str(config), *TRAIN, cwd=tmp_path).returncode == 0
    result = run_cli(
        "steer", "runs/t", "--feature", "3=30", "--prompt", "And God", "--max-new-tokens", "6", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["features"] == {"3": 30.0} and out["steered"] != out["unsteered"]
    sweep = run_cli("steer", "runs/t", "--feature", "3", "--sweep", "0,10", "--max-new-tokens", "4", cwd=tmp_path)
    assert [json.loads(ln)["scale"] for ln in sweep.stdout.strip().splitlines()] == [0.0, 10.0]
    line = one_error_line(run_cli("steer", "runs/t", "--feature", "99999=1", cwd=tmp_path))
    assert "feature index 99999 is out of range" in line


def test_trace_from_the_cli(config, tmp_path):
    assert run_cli("train", str(config), *TRAIN, cwd=tmp_path).returncode == 0  # an SAE on blocks.0.hook_resid_post
    result = run_cli(
        "trace",
        "runs/t",
        "--prompt",
        "And God said, Let there be light",
        "--layer",
        "1",
        "--head",
        "2",
        "--logit",
        "5,9",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "layer 1 head 2" in result.stdout and "blocks.0.hook_resid_post:f" in result.stdout
    assert "head 7 is out of range" in one_error_line(
        run_cli("trace", "--prompt", "x", "--layer", "1", "--head", "7", cwd=tmp_path)
    )


def test_output_cut_short_by_its_reader_is_no_traceback(tmp_path):
    r = subprocess.run(
        f"{sys.executable} -m saebench.cli hooks tiny | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.stdout.count("\n") == 1 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_an_unknown_hub_name_fails_at_once_when_offline(tmp_path, env):
    import time

    start = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "saebench.cli", "hooks", "no-such-org/no-such-model"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=300,
    )
    line = one_error_line(r)
    assert "the hub is not reachable from here" in line and "hf download no-such-org/no-such-model" in line
    assert time.time() - start < 15  # no network retries (they took ~23 s)
