"""Sweeps: a grid of SAEs from one model pass into one run of cells, resumable, equal to separate runs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import one_error_line, run_cli

import saebench as sb
from saebench import train
from saebench.config import load_config
from saebench.pipeline import train_from_config
from saebench.sweep import cell_config, cell_name, grid_cells, sweep_from_config
from saebench.train import SAETrainer, TrainConfig, memory_needed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = [
    "data.split=test",
    "data.max_documents=100",
    "data.context_size=32",
    "harvest.buffer_tokens=4096",
    "harvest.batch_size=16",
    "train.n_tokens=3072",
    "train.batch_size=256",
    "train.init_tokens=512",
    "train.checkpoint_every=4",
    "train.log_every=2",
    "eval.n_tokens=1000",
    "eval.n_contexts=2",
    "sae.expansion=1",
]
GRID, ZIP = ["sae.activation=topk,batchtopk"], ["sae.k=4,8", "train.lr=1e-3,3e-3"]


def test_grid_and_zip_make_the_cells_and_name_them_by_their_settings():
    cells = grid_cells(["sae.k=16,32", "sae.activation=topk,batchtopk"], ["sae.expansion=8,16", "train.lr=1e-3,2e-3"])
    assert list(cells) == [
        f"k{k}_{a}_expansion{e}_lr{lr}"
        for k in (16, 32)
        for a in ("topk", "batchtopk")
        for e, lr in ((8, "1e-3"), (16, "2e-3"))
    ]
    assert cells["k32_topk_expansion16_lr2e-3"] == {
        "sae.k": 32,
        "sae.activation": "topk",
        "sae.expansion": 16,
        "train.lr": "2e-3",
    }
    lists = grid_cells(["sae.matryoshka=[96,192],[48,96,192]", "harvest.hooks=blocks.0.hook_resid_post"])
    assert list(lists) == ["matryoshka96-192_blocks.0.hook_resid_post", "matryoshka48-96-192_blocks.0.hook_resid_post"]
    assert cell_name({"sae.k": 8}) == "k8"
    zipped = grid_cells([], ["sae.activation=topk,topk", "sae.matryoshka=null,[96,192]"])
    assert list(zipped) == ["topk_nomatryoshka", "topk_matryoshka96-192"]  # a null value says what it leaves out
    assert zipped["topk_nomatryoshka"]["sae.matryoshka"] is None


@pytest.mark.parametrize(
    "grid, zipped, message",
    [
        (["model=tiny,minilm"], [], r"--grid model: a sweep's cells share one model pass.*set model for the whole"),
        (["train.batch_size=256,512"], [], "only sae.*, harvest.hooks and train.{lr,"),
        (["sae.k"], [], r"write it as key=v1,v2,..., e.g. --grid sae.k=16,32,64"),
        (["sae.k=[1,"], [], "write it as key=v1,v2"),
        ([], ["sae.k=4,8", "train.lr=1e-3"], r"one length \(sae.k has 2, train.lr has 1\)"),
        (["sae.k=4,8", "sae.k=16"], [], "one --grid or --zip axis per key"),
        ([], [], "one --grid or --zip axis per key"),
        (["sae.k=4,4"], [], "two cells would both be named k4"),
    ],
)
def test_a_bad_grid_is_one_line_naming_the_fix(grid, zipped, message):
    with pytest.raises(sb.ConfigError, match=message):
        grid_cells(grid, zipped)


def test_a_cell_is_the_sweeps_config_with_its_settings_inside_the_sweeps_folder():
    base = load_config(TINY, ["runs_dir=/r", "name=s"])
    cell = cell_config(base, "k8_lr1e-3", {"sae.k": 8, "train.lr": "1e-3"})
    assert (cell.sae.k, cell.train.lr, cell.run_dir, cell.model) == (8, 1e-3, Path("/r/s/k8_lr1e-3"), "tiny")
    assert (cell.train.batch_size, cell.sae.expansion, base.sae.k) == (base.train.batch_size, base.sae.expansion, 32)
    two = load_config(TINY, ["harvest.hooks=[blocks.0.hook_resid_post,blocks.1.hook_resid_post]"])
    with pytest.raises(sb.ConfigError, match="--grid harvest.hooks=blocks.0.hook_resid_post,blocks.1.hook_resid_post"):
        cell_config(two, "k8", {"sae.k": 8})
    with pytest.raises(sb.ConfigError, match="unknown config key 'sae.kk'"):
        cell_config(base, "x", {"sae.kk": 8})


def test_the_memory_estimate_is_what_a_trainer_holds_and_a_grid_over_it_is_refused(monkeypatch):
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3, activation="batchtopk")
    trainer = SAETrainer(cfg, TrainConfig(batch_size=64), torch.randn(256, 16))
    trainer.step(torch.randn(64, 16))
    params = list(trainer.sae.parameters())
    moments = [v for st in trainer.opt.state.values() for k, v in st.items() if k != "step"]
    held = [*params, *(p.grad for p in params), *moments, trainer.sae.threshold]
    held += [trainer.tokens_since_fired, trainer.fire_freq]
    state, step = memory_needed([cfg, cfg], 64)
    assert state == 2 * sum(t.numel() * t.element_size() for t in held if t is not None)
    assert step == train.STEP_COPIES * 4 * 64 * 48
    x = torch.randn(1024, 16)
    monkeypatch.setattr(train, "available_memory", lambda device: state + step - 1)
    with pytest.raises(sb.ConfigError, match=r"needs about .* GiB on cpu .* train fewer SAEs per pass"):
        sb.train_saes({"a": cfg, "b": cfg}, x, TrainConfig(n_tokens=128, batch_size=64), show_progress=False)
    monkeypatch.setattr(train, "available_memory", lambda device: state + step)
    sb.train_saes({"a": cfg, "b": cfg}, x, TrainConfig(n_tokens=128, batch_size=64), show_progress=False)


def test_the_cli_refuses_a_grid_that_will_not_fit_before_the_model_runs(tmp_path):
    r = run_cli(
        "sweep", str(TINY), "--grid", "sae.expansion=1000000,1000001", "--set", f"runs_dir={tmp_path}", cwd=ROOT
    )
    assert "train fewer SAEs per pass" in one_error_line(r)
    r = run_cli("sweep", str(TINY), "--grid", "train.n_tokens=1,2", cwd=ROOT)
    assert "--grid train.n_tokens: a sweep's cells share one model pass" in one_error_line(r)


def weights(path: Path) -> dict:
    return load_file(str(path / "sae" / "sae.safetensors"))


def log(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.slow
def test_a_sweep_resumes_after_a_kill_and_its_cells_equal_separate_runs(tmp_path):
    def config(name):
        return load_config(TINY, [*SMALL, f"runs_dir={tmp_path}", f"name={name}"])

    whole = sweep_from_config(config("whole"), GRID, ZIP)
    cells = list(whole["cells"])
    assert cells == ["topk_k4_lr1e-3", "topk_k8_lr3e-3", "batchtopk_k4_lr1e-3", "batchtopk_k8_lr3e-3"]
    sweep_from_config(config("part"), GRID, ZIP, stop_after_steps=6)
    part = tmp_path / "part"
    assert not any((part / c / "sae").exists() for c in cells)
    # as if killed once one cell had written step 8 and the others had not: the newest common step is 6
    (part / cells[1] / "checkpoints" / "state-00000008.safetensors").write_bytes(b"")
    with pytest.raises(sb.ConfigError, match="is a sweep of other cells"):
        sweep_from_config(config("part"), ["sae.activation=topk"], ZIP, resume=True)
    with pytest.raises(sb.DataError, match="already holds a sweep: pass --resume"):
        sweep_from_config(config("part"), GRID, ZIP)
    out = sweep_from_config(config("part"), GRID, ZIP, resume=True)
    assert out["evaluated"] and not out["analysed"]
    for cell in cells:
        a, b = weights(tmp_path / "whole" / cell), weights(part / cell)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), cell
        assert log(tmp_path / "whole" / cell) == log(part / cell) and log(part / cell)[-1]["step"] == 12
    assert sorted(p.name for p in (part / cells[1] / "checkpoints").iterdir()) == ["state-00000012.safetensors"]
    for cell in cells[2:3]:  # a separate `saebench train` of the cell's config, at the same seed and data order
        separate = cell_config(config("whole"), cell, whole["cells"][cell])
        separate.runs_dir, separate.name = str(tmp_path / "separate"), cell
        train_from_config(separate)
        a, b = weights(tmp_path / "whole" / cell), weights(tmp_path / "separate" / cell)
        assert all(torch.equal(a[k], b[k]) for k in a), cell

    run = sb.Run(tmp_path / "whole")
    assert list(run.saes) == sorted(cells) and (run.sweep or {})["cells"] == whole["cells"]
    assert run.home(cells[1]).path == tmp_path / "whole" / cells[1]
    assert run.load_sae(cells[3]).cfg.activation == "batchtopk"
    alone = sb.Run(tmp_path / "whole" / cells[1])  # a cell is a run folder of its own
    assert alone.config.name == cells[1] and list(alone.saes) == ["blocks.1.hook_resid_post"]
    result = alone.eval()
    assert result is not None and result == run.eval(cells[1]) and result["run"] == str(alone.path)
    assert json.loads((alone.path / "sae" / "cfg.json").read_text())["train"]["lr"] == 3e-3
    table = sb.compare([run]).set_index("sae")
    assert table.loc[cells[1], "sae.fvu"] == result["sae"]["fvu"]
    assert table.loc[cells[1], "lr"] == 3e-3 and table.loc[cells[2], "k"] == 4


@pytest.mark.slow
def test_under_torchrun_hooks_mode_deals_the_cells_to_ranks(tmp_path):
    """`torchrun --nproc_per_node 2 -m saebench sweep ... --set train.distribute=hooks`: three cells dealt to two
    ranks (0: cells 0 and 2, 1: cell 1), each trained on the global batches its rank gathers; the SAEs are as good as
    the one-process sweep's (not bitwise: the ranks' shares make other batches), and `saebench eval` reads them."""
    from test_distributed import torchrun

    from saebench.cli import main

    grid = ["--grid", "sae.k=4,6,8"]
    sets = [a for s in [*SMALL, f"runs_dir={tmp_path}", "train.distribute=hooks"] for a in ("--set", s)]
    torchrun("-m", "saebench", "sweep", str(TINY), *grid, *sets, "--set", "name=two", timeout=600)
    assert main(["sweep", str(TINY), *grid, *sets, "--set", "name=one"]) == 0
    for cell in ("k4", "k6", "k8"):
        one, two = log(tmp_path / "one" / cell), log(tmp_path / "two" / cell)
        assert [r["step"] for r in two] == [r["step"] for r in one] and two[-1]["step"] == 12
        assert abs(two[-1]["fvu"] - one[-1]["fvu"]) < 0.1 * one[-1]["fvu"], cell
    assert main(["eval", str(tmp_path / "two")]) == 0
    assert set(sb.compare([tmp_path / "two"]).sae) == {"k4", "k6", "k8"}
