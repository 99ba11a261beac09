"""The Run: the one owner of a run folder. Its layout, and every damaged file it reads as one line."""

import json

import pytest
import torch
from test_analysis import HOOK, make_run
from test_app import page
from test_cli import one_error_line, run_cli

import saebench as sb
from saebench.harvest import ActivationStore, hook_dirname


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_one_hook_run_and_a_multi_hook_run(tmp_path):
    one, _ = make_run(tmp_path, name="one")
    other = "blocks.1.hook_resid_post"
    two, _ = make_run(tmp_path, name="two", hooks=(HOOK, other))
    assert {h: home.path for h, home in sb.Run(one).saes.items()} == {HOOK: one}
    assert {h: home.path for h, home in sb.Run(two).saes.items()} == {HOOK: two / HOOK, other: two / other}
    homes = sb.Run.homes_for(two, ["blocks.0.attn.hook_z", HOOK])
    assert homes["blocks.0.attn.hook_z"].path == two / hook_dirname("blocks.0.attn.hook_z")
    assert sb.Run.homes_for(one, [HOOK])[HOOK].path == one
    sae = sb.Run(two).load_sae(HOOK)
    assert sae.cfg.hook == HOOK and torch.equal(sae.W_dec, sb.SAE.load(two / HOOK / "sae").W_dec)
    with pytest.raises(sb.DataError, match="pass --hook"):
        sb.Run(two).load_sae()
    with pytest.raises(sb.DataError, match="has no SAE on 'blocks.5.hook_resid_post'"):
        sb.Run(two).load_sae("blocks.5.hook_resid_post")
    assert sb.Run(one).eval() is None and sb.Run(one).metrics() is None
    with pytest.raises(sb.DataError, match="is not a run directory"):
        sb.Run.open(tmp_path / "nowhere")


def test_a_half_written_metrics_line_is_dropped_and_a_bad_one_named(tmp_path):
    run, _ = make_run(tmp_path)
    (run / "metrics.jsonl").write_text('{"step": 1, "fvu": 0.5}\n{"step": 2, "fv')
    assert sb.Run(run).metrics() == [{"step": 1, "fvu": 0.5}]
    (run / "metrics.jsonl").write_text('{"step": 1, "fv\n{"step": 2, "fvu": 0.4}\n')
    with pytest.raises(sb.DataError, match=r"metrics\.jsonl is damaged or half-written \(line 1"):
        sb.Run(run).metrics()


@pytest.mark.parametrize(
    "damage, name, fix",
    [
        ("sae/sae.safetensors", "sae.safetensors", "retrain the SAE"),
        ("sae/cfg.json", "cfg.json", "retrain the SAE"),
        ("config.yaml", "config.yaml", "copy the run again"),
        ("eval.json", "eval.json", "saebench eval"),
        ("metrics.jsonl", "metrics.jsonl", "--resume"),
    ],
)
def test_each_damaged_file_of_a_run_is_one_line_naming_it_and_the_fix(tmp_path, damage, name, fix):
    run, _ = make_run(tmp_path)
    (run / "eval.json").write_text(json.dumps({"sae": {}, "random_baseline": {}}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    path = run / damage
    if name == "config.yaml":
        path.write_text("name: t\nmodel: [tiny\n")
    elif name == "metrics.jsonl":
        path.write_text('{"step": 1\n{"step": 2}\n')
    else:
        truncate(path)
    r = sb.Run(run)
    errors = []
    for read in (lambda: r.config, lambda: r.load_sae(device="cpu"), r.eval, r.metrics):
        try:
            read()
        except sb.DataError as e:
            errors.append(str(e))
    assert len(errors) >= 1
    message = errors[0]
    assert name in message and fix in message and "\n" not in message


def test_the_cli_turns_truncated_weights_into_one_line(tmp_path):
    run, _ = make_run(tmp_path)
    truncate(run / "sae" / "sae.safetensors")
    line = one_error_line(run_cli("eval", str(run), cwd=tmp_path))
    assert "sae.safetensors is damaged or half-written" in line and "retrain the SAE" in line


def test_the_app_shows_a_damaged_eval_json_as_a_message(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path)
    (run / "eval.json").write_text('{"sae": {"fvu": 0.1')
    at = page("Home.py", [run], monkeypatch)
    assert any("eval.json is damaged" in e.value for e in at.error)


def test_a_damaged_cache_shard_is_one_line(tmp_path, tiny):
    cfg = sb.RunConfig(name="c", runs_dir=str(tmp_path / "runs"))
    cfg.data = sb.DataConfig(split="test", max_documents=40, context_size=32)
    cfg.harvest = sb.HarvestConfig(hooks=[HOOK], n_tokens=1000, batch_size=8, shard_contexts=8)
    manifest = sb.harvest_from_config(cfg, model=tiny)
    store = ActivationStore(manifest["cache_dir"], HOOK)
    truncate(store.cache_dir / hook_dirname(HOOK) / store.shards[0]["file"])
    with pytest.raises(sb.DataError, match=r"shard_00000\.safetensors is damaged or half-written.*saebench harvest"):
        next(iter(store.iter_batches(64, seed=0)))
    (store.cache_dir / "manifest.json").write_text('{"hooks": ')
    with pytest.raises(sb.DataError, match=r"manifest\.json is damaged or half-written"):
        ActivationStore(manifest["cache_dir"], HOOK)
