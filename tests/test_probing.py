"""The probing and TPP suites: the probe, the latent selection, the balancing, the labelling, TPP, end to end."""

import itertools
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_analysis import make_run

import saebench as sb
from saebench.config import load_config
from saebench.data import pack_texts
from saebench.evals.probing import fit_probe, probe_scores, top_k_by_mean_difference
from saebench.evals.tasks import (
    CODE_CLASSES,
    FROM_START,
    TEXT_CLASSES,
    balanced,
    class_splits,
    labelled_contexts,
    masked_activations,
    pooled,
    python_spans,
    text_spans,
    token_classes,
)
from saebench.evals.tpp import latent_effects, top_effects, tpp_differences, tpp_scores
from saebench.evaluate import random_baseline
from saebench.harvest import Harvester
from saebench.interop import save_saelens
from saebench.pipeline import eval_from_config

PEER_PYTHON = Path(__file__).resolve().parent.parent / ".cache" / "saebench-venv" / "bin" / "python"


def separable(n: int, seed: int, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n d] with y = (x_0 > 0), and a margin: |x_0| >= 0.5."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += 0.5 * x[:, 0].sign()
    return x, (x[:, 0] > 0).float()


def test_probe_on_separable_data_reaches_one_and_on_shuffled_labels_chance():
    (x, y), (x_test, y_test) = separable(200, 0), separable(400, 1)
    assert fit_probe(x, y).accuracy(x_test, y_test) == 1.0
    g = torch.Generator().manual_seed(2)
    shuffled, shuffled_test = y[torch.randperm(len(y), generator=g)], y_test[torch.randperm(len(y_test), generator=g)]
    assert abs(fit_probe(x, shuffled).accuracy(x_test, shuffled_test) - 0.5) < 0.08  # 4 standard deviations


def test_probe_minimises_sklearns_objective():
    x, y = separable(60, 3)
    y[:5] = 1 - y[:5]  # not separable: a finite, unique optimum
    probe = fit_probe(x, y, C=0.7)
    w = probe.w.clone().requires_grad_(True)
    b = torch.tensor(probe.b, dtype=torch.float64, requires_grad=True)
    s = 2 * y.double() - 1
    loss = 0.7 * torch.nn.functional.softplus(-s * (x.double() @ w + b)).sum() + 0.5 * w @ w
    loss.backward()
    assert w.grad is not None and b.grad is not None
    assert w.grad.abs().max() < 1e-7 and abs(b.grad) < 1e-7
    # by hand: x = [-1, 1], y = [0, 1], C = 1 -> b = 0 and w = 2 sigmoid(-w), i.e. w = 0.6749...
    one = fit_probe(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.0, 1.0]))
    w1 = float(one.w[0])
    assert abs(one.b) < 1e-12 and abs(w1 - 2 / (1 + math.exp(w1))) < 1e-12 and abs(w1 - 0.6749) < 1e-4


def test_top_k_by_mean_difference_against_brute_force():
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(30, 8, generator=g).relu(), (torch.arange(30) % 3 == 0).float()
    for k in (1, 3, 5):
        gap = [abs(z[y == 1, f].mean() - z[y == 0, f].mean()) for f in range(8)]
        best = max(itertools.combinations(range(8), k), key=lambda s: sum(gap[f] for f in s))
        assert set(top_k_by_mean_difference(z, y, k).tolist()) == set(best)


def toy_task(sizes, pos: int = 1, seed: int = 0) -> sb.ProbeTask:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    train = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < 0.75
    return sb.ProbeTask(
        "toy",
        [f"c{c}" for c in range(len(sizes))],
        torch.zeros(len(labels), pos, dtype=torch.long),
        torch.ones(len(labels), pos, dtype=torch.bool),
        labels,
        train,
    )


def test_balancing_draws_negatives_evenly_from_the_other_classes():
    task = toy_task([10, 6, 6, 6])
    task.train[:] = True
    gen = torch.Generator().manual_seed(0)
    idx, y = balanced(task, 1, True, gen)  # 6 positives: ceil(6 / 3) = 2 negatives from each other class
    assert y.tolist() == [1] * 6 + [0] * 6 and sorted(idx[:6].tolist()) == list(range(10, 16))
    assert torch.bincount(task.labels[idx[6:]], minlength=4).tolist() == [2, 0, 2, 2]
    idx, y = balanced(task, 0, True, gen)  # 10 positives: ceil(10 / 3) = 4 from each, 10 of those 12 drawn
    counts = torch.bincount(task.labels[idx[10:]], minlength=4).tolist()
    assert len(idx) == 20 and counts[0] == 0 and sum(counts) == 10 and min(counts[1:]) >= 2
    assert len(set(idx.tolist())) == 20


def offsets_of(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    assert "".join(pieces) == text
    ends = list(itertools.accumulate(len(p) for p in pieces))
    return [(e - len(p), e) for p, e in zip(pieces, ends, strict=True)]


def test_python_token_labels_on_a_snippet():
    pieces = [
        "def",
        " fo",
        "o",
        "(x",
        "):",
        "  #",
        " hi",
        "\n   ",
        " return",
        ' "',
        "a",
        ' b"',
        " if",
        " x",
        " else",
        " None",
    ]
    text = "".join(pieces)
    labels = token_classes(text, python_spans(text), offsets_of(text, pieces))
    names = [CODE_CLASSES[c] if c >= 0 else None for c in labels]
    # "(x" straddles an operator and a name; "):" is operators only
    assert names == [
        "keyword", "identifier", "identifier", None, None, "comment", "comment", None,
        "keyword", "string", "string", "string", "keyword", "identifier", "keyword", "keyword",
    ]  # fmt: skip


def test_prose_token_labels_on_a_snippet():
    pieces = ["In", " 19", "84", " the", " Lo", "rd", " spake", ".", "\n", "And", " God", " said", " 7", "x"]
    text = "".join(pieces)
    labels = token_classes(text, text_spans(text, verses=True), offsets_of(text, pieces), FROM_START)
    names = [TEXT_CLASSES[c] if c >= 0 else None for c in labels]
    # verse_start paints over capitalised; "rd" does not begin its word; the "7" of "7x" is a run of digits
    assert names == [
        "verse_start", "digit", "digit", None, "capitalised", None, None, None, None,
        "verse_start", "capitalised", None, "digit", None,
    ]  # fmt: skip
    assert [TEXT_CLASSES[c] for _, _, c in text_spans("Be 1", verses=False)] == ["capitalised", "digit"]


def test_labelled_contexts_pack_as_the_data_module_does(tiny):
    texts = ["def f(x):\n    return x  # id\n", "And God said, Let there be light: and there was light.", "42 is"]
    spans = [python_spans(texts[0]), text_spans(texts[1]), text_spans(texts[2])]
    tokens, classes = labelled_contexts(texts * 4, spans * 4, tiny.tokenizer, 16)
    assert torch.equal(tokens, pack_texts(texts * 4, tiny.tokenizer, 16, show_progress=False).tokens)
    special = torch.isin(tokens, torch.tensor(tiny.tokenizer.all_special_ids))
    assert (classes[special] == -1).all() and (classes[~special] >= 0).any()
    first = tiny.tokenizer.decode(tokens[0, 1:2])
    assert first == "def" and CODE_CLASSES[int(classes[0, 1])] == "keyword"


def test_masked_activations_are_the_models_at_the_masked_positions(tiny):
    hook, g = "blocks.0.hook_resid_post", torch.Generator().manual_seed(7)
    contexts = torch.randint(1, 500, (3, 8), generator=g)
    a, b = toy_task([3], pos=8), toy_task([2], pos=8)
    a.tokens, b.tokens = contexts[[0, 1, 0]], contexts[[2, 1]]  # shared contexts run once
    a.mask, b.mask = torch.rand(3, 8, generator=g) < 0.5, torch.rand(2, 8, generator=g) < 0.5
    xa, xb = masked_activations(tiny, hook, [a, b], batch_size=2, show_progress=False)
    full = Harvester(tiny, [hook]).forward(torch.cat([a.tokens, b.tokens]))[hook]
    torch.testing.assert_close(torch.cat([xa, xb]), full[torch.cat([a.mask, b.mask])])


def class_data(per_class: int = 40, n_classes: int = 4, pos: int = 4, d: int = 16, seed: int = 0):
    """Tokens 3 e_c + noise for class c, pooled over positions 1..pos-1 (position 0 is left out, like a BOS)."""
    task = toy_task([per_class] * n_classes, pos, seed)
    task.mask[:, 0] = False
    g = torch.Generator().manual_seed(seed + 1)
    x = 3 * torch.eye(d)[task.labels][:, None, :] + 0.3 * torch.randn(len(task.labels), pos, d, generator=g)
    return task, x[task.mask]


def class_sae(d: int = 16, n_classes: int = 4) -> sb.SAE:
    """An SAE whose latents are exactly the class directions e_c."""
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=n_classes, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(d)[:n_classes])
        sae.W_enc.copy_(sae.W_dec.T)
    return sae.eval()


def test_sparse_probes_on_class_latents_and_pooling():
    task, x = class_data()
    sae = class_sae()
    manual = torch.stack([x[task.mask.nonzero()[:, 0] == i].mean(0) for i in range(len(task.labels))])
    torch.testing.assert_close(pooled(x, task), manual)
    torch.testing.assert_close(pooled(x, task, sae), sae.encode(x.reshape(-1, 3, 16)).mean(1))
    out = probe_scores(task, x, {"sae": sae}, sb.ProbingSettings(ks=[1, 2]), show_progress=False)
    assert out["dense"] == 1.0 and out["sae"] == {"1": 1.0, "2": 1.0}
    assert set(out["classes"]) == {"c0", "c1", "c2", "c3"} and out["classes"]["c0"]["n_train"] > 20


def test_tpp_of_class_latents_is_near_its_maximum_and_of_a_random_sae_near_zero():
    task, x = class_data()
    sae = class_sae()
    out = tpp_scores(task, x, {"sae": sae, "random": random_baseline(sae, x)}, [1, 2], sb.ProbingSettings(), False)
    for c in task.classes:
        assert out["classes"][c]["clean"] == 1.0
        assert out["classes"][c]["sae"]["intended"]["1"] == 0.5  # class c's probe falls to chance on its test set
    assert out["sae"]["total"]["1"] > 0.45 and abs(out["sae"]["unintended"]["1"]) < 0.05
    assert abs(out["random"]["total"]["1"]) < 0.05 and abs(out["random"]["total"]["2"]) < 0.05


def test_tpp_ablation_equals_explicit_encode_zero_decode():
    """TPP ablates by x - z_S W_dec[S] pooled; SAEBench decodes the zeroed codes and adds the error back."""
    torch.manual_seed(5)
    task, x = class_data(per_class=10, d=16)
    sae = sb.SAE(sb.SAEConfig(d_in=16, n_latents=24, k=4))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.3)
    S = torch.tensor([3, 7, 11])
    z = sae.encode(x)
    kept = z.clone()
    kept[:, S] = 0
    explicit = pooled(sae.decode(kept) + x - sae.decode(z), task)
    torch.testing.assert_close(pooled(x, task) - pooled(x, task, sae)[:, S] @ sae.W_dec[S].detach(), explicit)


def test_tpp_arithmetic_and_selection_by_hand():
    d = tpp_differences([0.9, 0.8, 1.0], [0.5, 0.7, 0.9], c=0)
    assert d == pytest.approx({"intended": 0.4, "unintended": 0.1, "total": 0.3})
    assert top_effects(torch.tensor([0.0, 3.0, -1.0, 0.0, 2.0]), 2).tolist() == [1, 4]
    few = top_effects(torch.tensor([0.0, 3.0, -1.0, 0.0]), 5).tolist()  # as many as the nonzero effects, largest first
    assert len(few) == 2 and few[0] == 1 and few[1] != 2
    z = torch.tensor([[2.0, 0.0], [4.0, 1.0], [1.0, 3.0]])
    y, W_dec, w = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, 1.0])
    # mean differences [2, -2.5]; probe along the decoder rows [0.5, 2]
    assert latent_effects(z, y, W_dec, w, signed=False).tolist() == [1.0, 0.0]
    assert latent_effects(z, y, W_dec, w, signed=True).tolist() == [1.0, -5.0]


def test_probing_settings_from_yaml_and_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("eval:\n  probing:\n    n_train: 20\n")
    cfg = load_config(path, ["eval.probing.ks=[1,5]", "eval.tpp.n_ablated=[10, 20]"])
    assert (cfg.eval.probing.ks, cfg.eval.probing.n_train, cfg.eval.tpp.n_ablated) == ([1, 5], 20, [10, 20])
    with pytest.raises(sb.ConfigError, match="use one of source, code, text"):
        load_config(path, ["eval.probing.tasks=[source, verse]"])
    with pytest.raises(sb.ConfigError, match="did you mean 'ks'"):
        load_config(path, ["eval.probing.k=[1]"])
    sae = class_sae()
    with pytest.raises(sb.ConfigError, match="eval.probing: ks must be a list of latent counts >= 1"):
        sb.sparse_probing(None, sae, "h", settings=sb.ProbingSettings(ks=[0, 5]))
    with pytest.raises(sb.ConfigError, match="eval.tpp.n_ablated must be a list of latent counts >= 1"):
        sb.tpp(None, sae, "h", settings=sb.TPPSettings(n_ablated=[]))


@pytest.mark.slow
def test_probing_and_tpp_suites_end_to_end(tmp_path, tiny):
    run, _ = make_run(tmp_path, n_latents=256, k=8)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"].update(
        n_tokens=2000, n_contexts=4, probing={"n_train": 12, "n_test": 6, "ks": [1, 4]}, tpp={"n_ablated": [2, 8]}
    )
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    eval_from_config(run, ["probing", "tpp"], show_progress=False)
    result = json.loads((run / "eval.json").read_text())
    probing, tpp = result["probing"], result["tpp"]
    assert set(probing) == {"source", "code", "text", "mean", "settings"}
    assert set(probing["code"]["classes"]) == set(CODE_CLASSES) and probing["settings"]["ks"] == [1, 4]
    for task in ("source", "code", "text", "mean"):
        assert set(probing[task]["sae"]) == set(probing[task]["random"]) == {"1", "4"}
        assert all(0 <= v <= 1 for v in [probing[task]["dense"], *probing[task]["sae"].values()])
    assert probing["source"]["dense"] > 0.9  # which source a context comes from is plain in tiny's activations
    assert set(tpp["classes"]) == {"bible", "fortunes", "jargon", "python"}
    assert set(tpp["sae"]["total"]) == {"2", "8"} and all(abs(v) <= 1 for v in tpp["random"]["total"].values())


PEER_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
import sae_bench.evals.sparse_probing.probe_training as pt
import sae_bench.sae_bench_utils.activation_collection as ac
import sae_bench.evals.scr_and_tpp.main as tpp

root = Path(sys.argv[1])
t = load_file(str(root / "in.safetensors"))
sae = SAE.load_from_disk(root / "sae")
train = {"a": t["train_a"], "b": t["train_b"]}
test = {"a": t["test_a"], "b": t["test_b"]}
out, report = {}, {"sae": {}}
torch.manual_seed(0)
with torch.no_grad():
    dense_tr, dense_te = ac.create_meaned_model_activations(train), ac.create_meaned_model_activations(test)
    sae_tr, sae_te = ac.get_sae_meaned_activations(train, sae, 7), ac.get_sae_meaned_activations(test, sae, 7)
for c in "ab":
    out[f"dense_{c}"], out[f"sae_{c}"] = dense_tr[c], sae_tr[c]
_, report["dense"] = pt.train_probe_on_activations(dense_tr, dense_te, select_top_k=None, use_sklearn=True)
for k in (1, 2, 5):
    _, report["sae"][str(k)] = pt.train_probe_on_activations(sae_tr, sae_te, select_top_k=k)
    acts, labels = pt.prepare_probe_data(sae_tr, "a")
    out[f"top_{k}"] = (~pt.get_top_k_mean_diff_mask(acts, labels, k)).nonzero()[:, 0]
acts, labels = pt.prepare_probe_data(dense_tr, "a")
probe, _ = pt.train_sklearn_probe(acts, labels, acts, labels)
out["coef"], out["intercept"] = torch.tensor(probe.coef_[0]), torch.tensor(probe.intercept_)
ours = pt.Probe(t["w"].shape[0], torch.float32)
with torch.no_grad():
    ours.net.weight.copy_(t["w"][None]); ours.net.bias.copy_(t["b"])
    out["effects"] = tpp.get_effects_per_class_precomputed_acts(sae, ours, "a", train, False, 7)
    ablate = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool)
    ablate[t["ablate"]] = True
    out["ablated"] = tpp.ablated_precomputed_activations(t["unmasked"], sae, ablate, 7)
accs = {"x": {2: {"x": 0.5, "y": 0.85, "z": 0.7}}, "y": {2: {"x": 0.9, "y": 0.6, "z": 0.75}},
        "z": {2: {"x": 0.95, "y": 0.9, "z": 0.8}}}
_, report["tpp"] = tpp.create_tpp_plotting_dict(accs, {"x": 0.95, "y": 0.9, "z": 0.8})
save_file({k: v.contiguous().float() for k, v in out.items()}, str(root / "out.safetensors"))
print(json.dumps(report))
"""


@pytest.mark.peers
@pytest.mark.slow
def test_sparse_probing_and_tpp_match_saebench(tmp_path):
    """SAEBench 0.6.0's own functions on the same activations and SAE (loaded by SAELens from our export).
    With two classes of equal size, its random balancing keeps every sample, so the sets are the same. Not
    compared: its dense probe (Adam, best test epoch; ours is the sklearn-objective probe SAEBench uses for k
    latents) and its data loading (hub datasets)."""
    if not PEER_PYTHON.exists():
        pytest.skip(f"no SAEBench venv at {PEER_PYTHON}")
    g = torch.Generator().manual_seed(6)
    n_tr, n_te, L, d = 40, 20, 6, 12
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=40, k=5, hook="blocks.0.hook_resid_post", model="tiny"), seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2, generator=g)
        sae.b_dec.normal_(0, 0.3, generator=g)
        sae.W_enc.add_(torch.randn(sae.W_enc.shape, generator=g) * 0.3)
    sae.eval()
    save_saelens(sae, tmp_path / "sae")
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)

    def acts(n, sign):  # masked positions (BOS, trailing pads) zeroed, as SAEBench keeps them
        x = torch.randn(n, L, d, generator=g) + 0.5 * sign * direction
        x[:, 0] = 0
        x[torch.arange(n) % 3 == 0, -2:] = 0
        return x

    data = {"train_a": acts(n_tr, 1), "train_b": acts(n_tr, -1), "test_a": acts(n_te, 1), "test_b": acts(n_te, -1)}
    x_tr = torch.cat([data["train_a"], data["train_b"]])
    x_te = torch.cat([data["test_a"], data["test_b"]])
    x_all = torch.cat([x_tr, x_te])
    mask = x_all.abs().sum(-1) != 0
    n = len(x_all)
    task = sb.ProbeTask(
        "peer",
        ["a", "b"],
        torch.zeros(n, L, dtype=torch.long),
        mask,
        torch.tensor(([0] * n_tr + [1] * n_tr) + ([0] * n_te + [1] * n_te)),
        torch.arange(n) < 2 * n_tr,
    )
    x = x_all[mask]
    dense, codes = pooled(x, task), pooled(x, task, sae)
    y_tr = (task.labels[: 2 * n_tr] == 0).float()
    probe = fit_probe(dense[: 2 * n_tr], y_tr)
    ablate = torch.tensor(
        [int(i) for i in latent_effects(codes[: 2 * n_tr], y_tr, sae.W_dec, probe.w, False).topk(3)[1]]
    )
    unmasked = torch.randn(8, L, d, generator=g)
    save_file(
        {**data, "w": probe.w.float(), "b": torch.tensor([probe.b]), "ablate": ablate, "unmasked": unmasked},
        str(tmp_path / "in.safetensors"),
    )
    run = subprocess.run(
        [str(PEER_PYTHON), "-W", "ignore", "-c", PEER_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        # jaxtyping 0.3 binds train_probe_on_activations' per-class size to the binary set inside it and fails
        env={**os.environ, "HF_HUB_OFFLINE": "1", "JAXTYPING_DISABLE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report, out = json.loads(run.stdout.strip().splitlines()[-1]), load_file(str(tmp_path / "out.safetensors"))

    def close(a, b):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-4)

    close(out["dense_a"], dense[:n_tr])
    close(out["sae_b"], codes[n_tr : 2 * n_tr])
    ours = probe_scores(task, x, {"sae": sae}, sb.ProbingSettings(ks=[1, 2, 5]), show_progress=False)
    for c, ((tr, y), (te, _)) in zip("ab", class_splits(task, 42), strict=True):
        assert abs(ours["classes"][c]["dense"] - report["dense"][c]) < 1e-3
        for k in (1, 2, 5):
            keep = top_k_by_mean_difference(codes[tr], y, k)
            p = fit_probe(codes[tr][:, keep], y)
            # a test sample on the boundary goes either way within sklearn's tolerance: at most one here
            on_edge = int(((codes[te][:, keep].double() @ p.w + p.b).abs() < 1e-3).sum())
            assert (
                on_edge <= 1
                and abs(ours["classes"][c]["sae"][str(k)] - report["sae"][str(k)][c]) <= on_edge / len(te) + 1e-9
            ), (c, k)
    for k in (1, 2, 5):
        assert set(out[f"top_{k}"].long().tolist()) == set(
            top_k_by_mean_difference(codes[: 2 * n_tr], y_tr, k).tolist()
        )
    # sklearn's lbfgs stops at a gradient of 1e-4 (its tol); ours is converged to 1e-9
    torch.testing.assert_close(out["coef"].double(), probe.w, atol=5e-3, rtol=0)
    assert abs(float(out["intercept"]) - probe.b) < 5e-3
    close(out["effects"], latent_effects(codes[: 2 * n_tr], y_tr, sae.W_dec.detach(), probe.w, False))
    whole = sb.ProbeTask("u", ["a"], torch.zeros(8, L, dtype=torch.long), torch.ones(8, L, dtype=torch.bool),
                         torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.bool))  # fmt: skip
    u = unmasked.reshape(-1, d)
    close(out["ablated"], pooled(u, whole) - pooled(u, whole, sae)[:, ablate] @ sae.W_dec[ablate].detach())
    clean, acc = [0.95, 0.9, 0.8], {"x": [0.5, 0.85, 0.7], "y": [0.9, 0.6, 0.75], "z": [0.95, 0.9, 0.8]}
    for c, cls in enumerate("xyz"):
        mine = tpp_differences(clean, acc[cls], c)
        assert report["tpp"][cls]["tpp_threshold_2_total_metric"] == pytest.approx(mine["total"], abs=1e-9)
        assert report["tpp"][cls]["tpp_threshold_2_unintended_diff_only"] == pytest.approx(mine["unintended"], abs=1e-9)
