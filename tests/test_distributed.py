"""Distributed training and harvesting under torchrun with 2 CPU processes (gloo), against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dist_job
import pytest
import torch
from safetensors.torch import load_file

from saebench import distributed as dist
from saebench.distributed import LOCAL, Reducer, global_kth_largest
from saebench.train import train_sae

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    # a rank's own traceback comes first, torchrun's summary last
    assert r.returncode == 0, r.stderr if len(r.stderr) < 8000 else r.stderr[:5000] + "\n...\n" + r.stderr[-3000:]
    return r


def job(*args: str, restarts: int = 0) -> subprocess.CompletedProcess:
    return torchrun(f"--max-restarts={restarts}", str(ROOT / "tests" / "dist_job.py"), *args)


def assert_same_weights(got: dict, want: dict, atol: float = 1e-4) -> None:
    # Not bitwise: the ranks sum their gradients in another order than one process does. Adam moves each
    # weight by about lr (3e-3) whatever its gradient's size, so a gradient element that is a near-cancellation
    # can move by a few % of one step differently (seen: 5.9e-5 on 1 of 1024 W_dec entries, all else < 1e-6)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_one_process_is_a_no_op():
    assert (dist.world(), dist.rank(), dist.is_main(), dist.shard(5)) == (1, 0, True, slice(0, 5, 1))
    x = torch.arange(4.0)
    assert LOCAL.sum(x) is x and Reducer(False).world == 1


def test_global_kth_largest_in_one_process_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(50, 7, generator=gen).pow(3)
    values[:, 3] = 0.0  # a column with no positive entry
    m = torch.tensor([1, 5, 50, 2, 0, 17, 49])
    got = global_kth_largest(values.sort(dim=0, descending=True).values, m, LOCAL)
    for j in range(7):
        want = float("inf") if m[j] == 0 else float(values[:, j].sort(descending=True).values[m[j] - 1])
        assert float(got[j]) == want, j


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "feature_choice", "jumprelu"])
def test_data_parallel_equals_one_process_with_the_global_batch(tmp_path, activation):
    job("data", str(tmp_path), activation)
    want, _ = train_sae(dist_job.sae_cfg(activation), dist_job.data(), dist_job.train_cfg(), show_progress=False)
    assert_same_weights(load_file(str(tmp_path / "data.safetensors")), dist_job.weights(want))


@pytest.mark.slow
def test_data_parallel_streams_gather_the_init_sample_and_match(tmp_path):
    """Each rank's stream yields its own rows (as each rank's harvester does); the result is the one-process run."""
    job("data-stream", str(tmp_path), "batchtopk")
    want, _ = train_sae(
        dist_job.sae_cfg("batchtopk", "a"), dist_job.hook_stream(0, 1), dist_job.train_cfg(), show_progress=False
    )
    assert_same_weights(load_file(str(tmp_path / "data-stream.safetensors")), dist_job.weights(want))


@pytest.mark.slow
def test_hooks_mode_trains_one_sae_per_rank_equal_to_each_alone(tmp_path):
    job("hooks", str(tmp_path), "topk")
    for rank, hook in enumerate(dist_job.HOOKS):
        files = sorted(p.name for p in tmp_path.glob(f"hooks-{hook}-rank*.safetensors"))
        assert files == [f"hooks-{hook}-rank{rank}.safetensors"]  # dealt round-robin, returned by its owner only
        want, _ = train_sae(
            dist_job.sae_cfg("topk", hook), dist_job.hook_stream(0, 1), dist_job.train_cfg(), show_progress=False
        )
        assert_same_weights(load_file(str(tmp_path / files[0])), dist_job.weights(want))
        run = tmp_path / "run" / hook
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [4, 8, 12] and (run / "sae" / "cfg.json").exists()


@pytest.mark.slow
def test_resume_under_two_processes_is_exact(tmp_path):
    job("resume-part", str(tmp_path))
    parts = tmp_path / "parts"
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["state-00000005.safetensors"]
    assert not (parts / "sae").exists()
    job("resume-rest", str(tmp_path))
    job("resume-whole", str(tmp_path))
    rest, whole = (
        load_file(str(tmp_path / "resume-rest.safetensors")),
        load_file(str(tmp_path / "resume-whole.safetensors")),
    )
    for key in whole:
        assert torch.equal(rest[key], whole[key]), key
    steps = [json.loads(line)["step"] for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]


@pytest.mark.slow
def test_a_dead_rank_stops_the_job_and_the_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    r = job("crash-once", str(tmp_path), restarts=1)
    assert "rank 1 died" in r.stderr
    job("resume-whole", str(tmp_path))
    got, want = (
        load_file(str(tmp_path / "crash-once.safetensors")),
        load_file(str(tmp_path / "resume-whole.safetensors")),
    )
    for key in want:
        assert torch.equal(got[key], want[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]  # the step-4 row of the first attempt is kept once, nothing after the checkpoint repeats


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(tmp_path):
    job("resume-part", str(tmp_path))
    with pytest.raises(Exception, match="resume with --nproc_per_node 2"):
        train_sae(
            dist_job.sae_cfg("topk"),
            dist_job.data(),
            dist_job.train_cfg(checkpoint_every=5),
            run_dir=tmp_path / "parts",
            resume=True,
            show_progress=False,
        )


@pytest.mark.slow
def test_parallel_harvest_writes_the_one_process_cache(tmp_path, tiny):
    config = ROOT / "configs" / "tiny.yaml"
    sets = [
        "--set",
        "harvest.n_tokens=3000",
        "--set",
        "harvest.shard_contexts=5",
        "--set",
        "harvest.batch_size=4",
        "--set",
        "data.split=test",
    ]
    torchrun("-m", "saebench", "harvest", str(config), *sets, "--set", f"harvest.cache_dir={tmp_path / 'two'}")
    from saebench.cli import main

    assert main(["harvest", str(config), *sets, "--set", f"harvest.cache_dir={tmp_path / 'one'}"]) == 0
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert one == two and one["complete"] and one["n_tokens"] == 3000 and len(one["shards"]) >= 4
    for shard in one["shards"]:
        a, b = (load_file(str(tmp_path / d / "blocks.1.hook_resid_post" / shard["file"])) for d in ("one", "two"))
        for key in a:
            assert torch.equal(a[key], b[key]), (shard["file"], key)


@pytest.mark.slow
def test_torchrun_cli_train_then_eval_matches_one_process(tmp_path, tiny):
    """`torchrun --nproc_per_node 2 -m saebench train configs/tiny.yaml` (short budget) then `saebench eval`:
    FVU within 5% of the one-process run at the same token budget."""
    from saebench.cli import main

    config = ROOT / "configs" / "tiny.yaml"
    sets = [
        "--set",
        "train.n_tokens=409600",
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "eval.n_tokens=20000",
        "--set",
        "eval.n_contexts=8",
        "--set",
        f"runs_dir={tmp_path}",
    ]
    torchrun("-m", "saebench", "train", str(config), *sets, "--set", "name=two", timeout=600)
    assert main(["train", str(config), *sets, "--set", "name=one"]) == 0
    fvu = {}
    for name in ("one", "two"):
        assert main(["eval", str(tmp_path / name)]) == 0
        fvu[name] = json.loads((tmp_path / name / "eval.json").read_text())["sae"]["fvu"]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 100 and rows[-1]["tokens"] == 409600
    assert abs(fvu["two"] - fvu["one"]) <= 0.05 * fvu["one"], fvu
