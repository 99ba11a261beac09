"""saebench.graph: attribution graphs against the model itself run with its attention patterns, normalisation
scales and MLP outputs frozen (hooks on the real forward), against closed forms, and through the CLI."""

import dataclasses
import json

import pytest
import torch

import saebench as sb
from saebench.graph import AttributionGraph, Node, attribution_graph, influence, normalize

PROMPT = "And God said, Let there be light: and there was light."


def transcoder(hook: str, seed: int, n: int = 256, k: int = 8, skip: bool = False, dead: bool = False) -> sb.SAE:
    """A random transcoder on `hook` (any transcoder works: the error nodes carry what it misses)."""
    out = f"blocks.{hook.split('.')[1]}.hook_mlp_out"
    extra: dict = {"kind": "skip_transcoder" if skip else "transcoder", "output_hook": out}
    if "kind" not in {f.name for f in dataclasses.fields(sb.SAEConfig)}:  # before saebench knew transcoders
        extra = {}
    tc = sb.SAE(sb.SAEConfig(d_in=192, n_latents=n, k=k, hook=hook, model="tiny", **extra), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tc.b_enc.copy_(torch.full((n,), -1e4) if dead else 0.3 + 0.1 * torch.randn(n, generator=gen))
        tc.b_dec.copy_(torch.zeros(192) if dead else 0.1 * torch.randn(192, generator=gen))
    if skip:  # a parameter of the SAE once saebench trains transcoders (then W_skip is overwritten)
        tc.W_skip = torch.nn.Parameter(0.05 * torch.randn(192, 192, generator=gen))
    return tc


@pytest.fixture(scope="module")
def transcoders():
    return {
        "blocks.0.ln2.hook_normalized": transcoder("blocks.0.ln2.hook_normalized", 0),
        "blocks.1.ln2.hook_out": transcoder("blocks.1.ln2.hook_out", 1, skip=True),
    }


@pytest.fixture(scope="module")
def graph(tiny, transcoders):
    return attribution_graph(tiny, transcoders, PROMPT)


def frozen_run(model, graph: AttributionGraph, transcoders, add: dict[tuple[int, int], torch.Tensor]):
    """The real model on the graph's prompt with every attention pattern and normalisation scale frozen at its
    clean value and each MLP's output frozen too, but for its transcoder's skip term (which follows its input);
    add: {(layer, pos): vector} added to that MLP's output (layer -1: to the token embedding).
    -> (each transcoder's input hook's activation [pos d_in], logits [pos vocab])."""
    tokens = torch.tensor([graph.tokens])
    _, clean = model.run_with_cache(tokens)
    by_layer = {int(h.split(".")[1]): (h, tc) for h, tc in transcoders.items()}
    seen = {}

    def freeze(x, hook):
        return clean[hook.name]

    def record(x, hook):
        seen[hook.name] = x
        return x

    def mlp_out(x, hook, layer):
        out = clean[hook.name].clone()
        if layer in by_layer and getattr(by_layer[layer][1], "W_skip", None) is not None:
            h, tc = by_layer[layer]
            out += (seen[h] - clean[h]) @ tc.W_skip
        for (i, p), v in add.items():
            if i == layer:
                out[0, p] += v
        return out

    def embed(x, hook):
        x = x.clone()
        for (i, p), v in add.items():
            if i == -1:
                x[0, p] += v
        return x

    hooks = [(n, freeze) for n in clean.keys() if n.endswith(("hook_pattern", "hook_scale"))]
    hooks += [(h, record) for h in transcoders] + [("hook_embed", embed)]
    hooks += [(f"blocks.{i}.hook_mlp_out", lambda x, hook, i=i: mlp_out(x, hook, i)) for i in range(2)]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return {h: seen[h][0] for h in transcoders}, logits[0]


@torch.no_grad()
def readouts(graph: AttributionGraph, transcoders, acts, logits) -> torch.Tensor:
    """Each feature's pre-activation and each logit node's logit minus the mean logit, read off a run."""
    hooks = {int(h.split(".")[1]): h for h in transcoders}
    out = []
    for node in graph.nodes:
        if node.kind == "feature":
            h = hooks[node.layer]
            out.append(float(transcoders[h].pre_acts(acts[h][node.position][None])[0, node.feature]))
        elif node.kind == "logit":
            out.append(float(logits[-1, node.token_id] - logits[-1].mean()))
        else:
            out.append(0.0)
    return torch.tensor(out)


@torch.no_grad()
def test_replacement_model_gives_the_models_logits(tiny, graph):
    logits = tiny(torch.tensor([graph.tokens]))[0]
    got = graph.replacement_logits()
    assert (got - logits).abs().max() <= 1e-5 * max(1.0, float(logits.abs().max()))


def test_edges_are_the_frozen_models_direct_effects(tiny, graph, transcoders):
    """Adding a source node's output to the frozen model changes every target node by exactly its edge weight."""
    base = readouts(graph, transcoders, *frozen_run(tiny, graph, transcoders, {}))
    kinds = {n.kind for n in graph.nodes}
    assert kinds == {"feature", "error", "embedding", "logit"}
    nodes, vectors = graph.nodes, graph._ctx["vectors"]
    features = [i for i, n in enumerate(nodes) if n.kind == "feature" and n.layer == 0]
    picks = [
        next(i for i, n in enumerate(nodes) if n.kind == "embedding" and n.position == 3),
        next(i for i, n in enumerate(nodes) if n.kind == "error" and n.layer == 0 and n.position == 5),
        max(features, key=lambda i: float(graph.adjacency[:, i].abs().sum())),
    ]
    targets = [i for i, n in enumerate(graph.nodes) if n.kind in ("feature", "logit")]
    for s in picks:
        node = graph.nodes[s]
        moved = readouts(
            graph, transcoders, *frozen_run(tiny, graph, transcoders, {(node.layer, node.position): vectors[s]})
        )
        want = (moved - base)[targets]
        assert graph.adjacency[targets, s].abs().max() > 1e-3
        assert torch.allclose(graph.adjacency[targets, s], want, atol=1e-4, rtol=1e-3), node


def test_each_node_is_its_incoming_edges_plus_its_bias(tiny, graph, transcoders):
    acts, logits = frozen_run(tiny, graph, transcoders, {})
    values = torch.tensor([n.value for n in graph.nodes])
    targets = [i for i, n in enumerate(graph.nodes) if n.kind in ("feature", "logit")]
    pre = readouts(graph, transcoders, acts, logits)[targets]
    assert torch.allclose(values[targets], pre, atol=1e-4)  # a feature's activation is its pre-activation
    bias = torch.tensor([n.bias for n in graph.nodes])
    assert (graph.adjacency[targets].sum(1) + bias[targets] - pre).abs().max() < 1e-4
    assert graph.adjacency[[i for i in range(len(graph.nodes)) if i not in targets]].abs().sum() == 0


def test_position_zero_holds_no_feature_and_nothing_flows_backwards(graph):
    assert all(n.position > 0 for n in graph.nodes if n.kind == "feature")
    pos = torch.tensor([n.position for n in graph.nodes])
    layer = torch.tensor([n.layer for n in graph.nodes])
    t, s = graph.adjacency.nonzero(as_tuple=True)
    assert (pos[s] <= pos[t]).all() and (layer[s] < layer[t]).all()


def test_transcoders_without_features_leave_embeddings_and_the_mlps_as_errors(tiny):
    dead = {h: transcoder(h, 5, dead=True) for h in ("blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized")}
    g = attribution_graph(tiny, dead, PROMPT)
    assert {n.kind for n in g.nodes} == {"embedding", "error", "logit"}
    _, cache = tiny.run_with_cache(torch.tensor([g.tokens]))
    errors = [n for n in g.nodes if n.kind == "error"]
    want = [
        0.0 if n.position == 0 else float(cache[f"blocks.{n.layer}.hook_mlp_out"][0, n.position].norm()) for n in errors
    ]
    assert [n.value for n in errors] == pytest.approx(want, abs=1e-5)
    bare = attribution_graph(tiny, {}, PROMPT)  # no transcoder: each MLP is all error
    assert [n.id for n in bare.nodes] == [n.id for n in g.nodes]
    assert torch.allclose(bare.adjacency, g.adjacency, atol=1e-5)
    assert g.scores()[0] < 1.0 and bare.scores() == pytest.approx(g.scores(), abs=1e-6)


def test_bad_prompts_and_dictionaries_are_config_errors(tiny, transcoders):
    with pytest.raises(sb.ConfigError, match="2 to 128"):
        attribution_graph(tiny, transcoders, "word " * 200)
    with pytest.raises(sb.ConfigError, match="2 to 128"):
        attribution_graph(tiny, transcoders, "")
    two = [transcoder("blocks.0.ln2.hook_normalized", 0), transcoder("blocks.0.ln2.hook_out", 1)]
    with pytest.raises(sb.ConfigError, match="two transcoders replace layer 0"):
        attribution_graph(tiny, two, PROMPT)
    with pytest.raises(sb.ConfigError, match="no transcoder"):
        attribution_graph(tiny, [transcoder("blocks.0.hook_resid_post", 0)], PROMPT)


@torch.no_grad()
def test_logit_nodes_are_the_top_tokens_up_to_the_probability_mass(tiny, graph):
    logits = tiny(torch.tensor([graph.tokens]))[0, -1]
    probs = logits.softmax(-1)
    top = probs.argsort(descending=True)[:10].tolist()
    n = next((i + 1 for i in range(10) if float(probs[top[: i + 1]].sum()) >= 0.95), 10)
    nodes = [x for x in graph.nodes if x.kind == "logit"]
    assert [x.token_id for x in nodes] == top[:n]
    assert [x.value for x in nodes] == pytest.approx([float(logits[t] - logits.mean()) for t in top[:n]], abs=1e-5)
    assert graph.logit_probabilities.tolist() == pytest.approx(probs[top[:n]].tolist(), abs=1e-6)


def test_influence_is_the_closed_form_and_pruning_keeps_the_most_influential():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=gen).tril(-1) * (torch.rand(7, 7, generator=gen) > 0.3)
    w = torch.rand(7, generator=gen)
    closed = w @ (torch.linalg.inv(torch.eye(7) - normalize(a)) - torch.eye(7))
    assert torch.allclose(influence(normalize(a), w), closed, atol=1e-6)


def test_pruning_and_scores_on_a_hand_computed_graph():
    """One layer, two positions: emb(1) -> f (2), f -> logit (3), err(0, 1) -> logit (1). Rows normalised: the logit
    takes 0.75 from f and 0.25 from err, f all from emb; influence on the logit (probability 1): f 0.75, err 0.25,
    emb 0.75 (through f; errors have no inputs)."""
    nodes = [
        Node("f", "feature", 0, 1, feature=0, value=2.0),
        Node("e0", "error", 0, 0),
        Node("err", "error", 0, 1),
        Node("emb0", "embedding", -1, 0, token_id=0),
        Node("emb", "embedding", -1, 1, token_id=5),
        Node("logit", "logit", 1, 1, token_id=7, value=4.0),
    ]
    a = torch.zeros(6, 6)
    a[0, 4], a[5, 0], a[5, 2] = 2.0, 3.0, 1.0
    g = AttributionGraph("x", [0, 5], ["", "x"], nodes, a, torch.tensor([1.0]), {}, {0: "h"}, 1)
    assert g.influence().tolist() == pytest.approx([0.75, 0.0, 0.25, 0.0, 0.75, 0.0])
    replacement, completeness = g.scores()
    assert replacement == pytest.approx(0.75 / (0.75 + 0.25))
    # completeness: inputs from errors are 1/4 of the logit's (weight 1) and none of f's (0.75): 1 - 0.25 / 2.75
    assert completeness == pytest.approx(1 - 0.25 / (1 + 0.75 + 0.25 + 0.75))
    kept = g.prune(0.7, 0.99)  # f and emb hold 0.75 / 1.75 each: the 0.7 share keeps both, err goes
    assert kept.node_mask.tolist() == [True, False, False, True, True, True]
    assert kept.edge_mask.nonzero().tolist() == [[0, 4], [5, 0]]


def test_heads_carry_the_edges_that_cross_one_attention_layer(graph):
    """From layer 0's MLP to the logits, and from the embeddings to layer 0's features, every path crosses one
    attention layer: the heads' parts sum to the edge's weight."""
    nodes, a = graph.nodes, graph.adjacency

    def crossing(source_kind: set[str], target_kind: str, target_layer: int) -> list[tuple[int, int]]:
        return [
            (s, t)
            for t, tn in enumerate(nodes)
            for s, sn in enumerate(nodes)
            if tn.kind == target_kind
            and tn.layer == target_layer
            and sn.kind in source_kind
            and sn.layer in (-1, 0)
            and sn.position < tn.position
            and a[t, s].abs() > 1e-3
        ][:30]

    cases = crossing({"feature", "error"}, "logit", 2) + crossing({"embedding"}, "feature", 0)
    assert len(cases) == 60
    split = graph.attention(cases)
    assert split.shape == (60, 2, 6)
    want = torch.stack([a[t, s] for s, t in cases])
    assert torch.allclose(split.sum((1, 2)), want, atol=1e-4, rtol=1e-4)
    assert split[30:, 1].abs().max() == 0 and split[:30, 0].abs().max() == 0  # the attention layer they cross


@pytest.mark.slow
def test_json_holds_the_pruned_graph_and_qk_pairs_that_sum_to_the_score(tiny, graph, tmp_path):
    path = graph.save(tmp_path / "g.json", node_threshold=0.8, edge_threshold=0.98)
    data = json.loads(path.read_text())
    kept = graph.prune(0.8, 0.98)
    assert data["prompt"] == PROMPT and data["logit_centered"] is True and data["tokens"] == graph.tokens
    assert data["settings"]["node_threshold"] == 0.8 and data["settings"]["edge_threshold"] == 0.98
    assert data["settings"]["transcoders"] == {"0": "blocks.0.ln2.hook_normalized", "1": "blocks.1.ln2.hook_out"}
    ids = [n["id"] for n in data["nodes"]]
    assert ids == [graph.nodes[i].id for i in kept.node_mask.nonzero().squeeze(-1).tolist()] and len(set(ids)) == len(
        ids
    )
    for n in data["nodes"]:
        assert {"id", "kind", "layer", "position", "feature", "token_id", "value", "bias"} <= set(n)
    assert len(data["edges"]) == int(kept.edge_mask.sum()) and all(
        e["source"] in ids and e["target"] in ids for e in data["edges"]
    )
    index = {n.id: i for i, n in enumerate(graph.nodes)}
    for e in data["edges"]:
        assert e["weight"] == pytest.approx(float(graph.adjacency[index[e["target"]], index[e["source"]]]))
    crossing = [e for e in data["edges"] if "attention" in e]
    assert crossing and all(
        graph.nodes[index[e["source"]]].position < graph.nodes[index[e["target"]]].position for e in crossing
    )
    _, cache = tiny.run_with_cache(torch.tensor([graph.tokens]))
    for name in {h["qk"] for e in crossing for h in e["attention"]}:
        qk = data["qk"][name]
        score = cache[f"blocks.{qk['layer']}.attn.hook_attn_scores"][0, qk["head"], qk["query_pos"], qk["key_pos"]]
        assert qk["score"] == pytest.approx(float(score), abs=1e-4)
        assert sum(p[2] for p in qk["pairs"]) + qk["rest"] == pytest.approx(qk["score"], abs=1e-4)
        r = graph.qk(qk["layer"], qk["head"], qk["query_pos"], qk["key_pos"])
        assert float(r.pair_scores.sum()) == pytest.approx(float(score), abs=1e-4)
    r = graph.qk(1, 0, len(graph.tokens) - 1, 3)  # the transcoders' features are components of both sides
    assert (
        any(c.startswith("blocks.0.ln2.hook_normalized:f") for c in r.k_names)
        and "blocks.0.ln2.hook_normalized:error" in r.q_names
    )


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory):
    """A run of two transcoders as `saebench train` writes them (random dictionaries)."""
    from test_analysis import make_run

    hooks = ("blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized")
    run, _ = make_run(tmp_path_factory.mktemp("graph"), hooks=hooks, name="tc")
    for h in hooks:
        cfg = json.loads((run / h / "sae" / "cfg.json").read_text())
        cfg.update(kind="transcoder", output_hook=h.replace("ln2.hook_normalized", "hook_mlp_out"), d_out=192)
        (run / h / "sae" / "cfg.json").write_text(json.dumps(cfg))
    return run


@pytest.mark.slow
def test_graph_command_writes_the_json_beside_the_run(tmp_path, transcoder_run, capsys):
    from test_analysis import make_run

    from saebench.cli import main

    run = transcoder_run
    args = ["graph", str(run), "--prompt", "And God said", "--edge-threshold", "0.9"]
    assert main(args) == 0
    path = sb.Run(run).graph_path("And God said")
    assert path.parent.parent == run and json.loads(capsys.readouterr().out)["graph"] == str(path)
    data = json.loads(path.read_text())
    assert data["settings"]["edge_threshold"] == 0.9 and data["prompt"] == "And God said"
    out = tmp_path / "g.json"
    assert main([*args, "--out", str(out)]) == 0 and json.loads(out.read_text())["nodes"] == data["nodes"]
    assert main([*args, "--node-threshold", "1.5"]) == 2 and "node_threshold" in capsys.readouterr().err
    plain, _ = make_run(tmp_path, name="plain")  # an SAE on the residual stream: no transcoder
    assert main(["graph", str(plain), "--prompt", "x"]) == 2 and "no transcoder" in capsys.readouterr().err


@pytest.mark.slow
def test_graph_page_shows_the_pruned_graph_and_an_attention_edges_qk_pairs(tmp_path, transcoder_run, monkeypatch, tiny):
    from test_analysis import make_run
    from test_app import markdown_text, page

    run, prompt = transcoder_run, "The cat sat on the mat. The cat sat on the"
    saes = sb.Run(run).load_saes()
    g = attribution_graph(tiny, saes, prompt)
    kept = g.prune(0.5, 0.9)
    t, s = kept.edge_mask.nonzero(as_tuple=True)
    edges = [(int(a), int(b)) for a, b in zip(s, t, strict=True) if g.nodes[a].position != g.nodes[b].position]
    heads = g.attention(edges)
    (src, tgt), split = next((e, h) for e, h in zip(edges, heads, strict=True) if h.abs().max() > 0)
    layer, head = divmod(int(split.abs().argmax()), split.shape[1])
    at = page("pages/6_Graph.py", [run], monkeypatch, prompt=prompt, node=0.5, edge=0.9, sel=g.nodes[tgt].id)
    assert at.metric[0].value == f"{int(kept.node_mask.sum())} of {len(g.nodes)}"
    assert at.metric[2].value == f"{g.scores()[0]:.3f}" and at.metric[3].value == f"{g.scores()[1]:.3f}"
    inputs = at.dataframe[0].value
    want = sorted(
        (a for a, b in zip(s.tolist(), t.tolist(), strict=True) if b == tgt),
        key=lambda a: -abs(float(g.adjacency[tgt, a])),
    )
    assert inputs["source"].tolist() == [g.nodes[a].id for a in want]
    assert inputs["weight"].tolist() == pytest.approx([float(g.adjacency[tgt, a]) for a in want], abs=1e-6)
    at.selectbox[1].set_value(g.nodes[src].id).run()
    assert at.dataframe[1].value["head"].tolist()[0] == f"L{layer}H{head}"
    r = g.qk(layer, head, g.nodes[tgt].position, g.nodes[src].position)
    pairs = at.dataframe[2].value
    assert pairs["score"].tolist() == pytest.approx(r.top_pairs(20)["score"].tolist(), abs=1e-5)
    assert at.metric[-1].value == f"{float(r.pair_scores.sum()):.3f}" == at.metric[-2].value
    assert at.query_params["sel"] in (g.nodes[tgt].id, [g.nodes[tgt].id])
    everything = g.prune(1.0, 1.0).node_mask
    feature = next(x for i, x in enumerate(g.nodes) if x.kind == "feature" and everything[i])
    at = page("pages/6_Graph.py", [run], monkeypatch, prompt=prompt, node=1, edge=1, sel=feature.id)
    link = f"hook={g.hooks[feature.layer]}&amp;feature={feature.feature}"
    assert link in markdown_text(at) and any("saebench analyze" in i.value for i in at.info)
    plain, _ = make_run(tmp_path, name="plain")
    at = page("pages/6_Graph.py", [plain], monkeypatch)
    assert any("no transcoder" in e.value for e in at.error)


@pytest.mark.peers
@pytest.mark.slow
def test_the_same_graph_as_circuit_tracer(tiny):
    """circuit-tracer 0.5.0 (its own venv) on tiny as a HookedTransformer, the same skip transcoders (one reading
    ln2.hook_out, rewritten to read ln2.hook_normalized as circuit-tracer's set must), the same tokens: the same
    features, values, logit nodes and pre-pruning edge weights. No definition differs; circuit-tracer takes a skip
    term on all layers or none (its set's first transcoder decides), saebench per transcoder."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "graph.py"
    spec = importlib.util.spec_from_file_location("graph_benchmark", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not bench.PEER_PYTHON.exists():
        pytest.skip(f"no circuit-tracer venv at {bench.PEER_PYTHON} (benchmarks/graph.py says how to make it)")
    hooks = ("blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_out")
    transcoders = {h: transcoder(h, i, skip=True) for i, h in enumerate(hooks)}
    graph = attribution_graph(tiny, transcoders, PROMPT)
    peer = bench.circuit_tracer_graph(tiny, transcoders, torch.tensor([graph.tokens]))
    diff = bench.compare(graph, peer)
    assert diff["same_features"] and diff["same_logits"] and diff["features"] > 100
    assert diff["max_value_diff"] < 1e-4 and diff["max_edge_diff"] < 1e-4 < diff["max_edge"]


@pytest.mark.slow
def test_the_induction_circuit_appears_in_the_graph(tiny):
    """[BOS s s'] for a random span s of 16 tokens, s' its first 15: the top logit at the last token (s[14]) is
    s[15]; the embedding edge into it from another position that weighs most comes from the first copy's s[15],
    carried mostly by induction heads (tiny has several in L1; on random tokens L1H0 carries most of this edge);
    that edge's QK explanation (the top head's score at (last, that key)) sums to the score and its key side
    names the previous-token features of the layer-0 attention SAE that the induction trace (saebench.induction,
    on the same query) ranks first. The MLPs are error nodes (the circuit
    crosses no MLP feature); with random transcoders in their place the same edge and QK split come out."""
    from test_induction import TINY_ATTN

    from saebench.induction import repeated_prompt, trace_induction

    saes = sb.Run(TINY_ATTN).load_saes(device="cpu")
    induction = sb.induction_report(tiny)["induction"]  # [layer head]; tiny has several induction heads in L1
    span = torch.randint(10, tiny.cfg.d_vocab, (16,), generator=torch.Generator().manual_seed(0))
    full = repeated_prompt(span, tiny.tokenizer.bos_token_id)  # [1 33]
    prompt, last, key = full[:, :32], 31, 16
    random_tcs = {h: transcoder(h, i) for i, h in enumerate(("blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_out"))}
    found, heads = [], []
    for tcs in ({}, random_tcs):
        g = attribution_graph(tiny, tcs, prompt, saes=saes)
        index = {n.id: i for i, n in enumerate(g.nodes)}
        logit = index[f"logit/{int(span[15])}"]
        assert g.nodes[logit].value == max(n.value for n in g.nodes if n.kind == "logit")
        embeds = [index[f"emb/p{p}"] for p in range(last)]
        source = max(embeds, key=lambda s: abs(float(g.adjacency[logit, s])))
        assert source == index[f"emb/p{key}"]
        split = g.attention([(source, logit)])[0]
        layer, head = divmod(int(split.abs().argmax()), split.shape[1])
        assert induction[layer, head] >= 0.4 and split[induction >= 0.4].sum() >= 0.5 * g.adjacency[logit, source]
        r = g.qk(layer, head, last, key)
        assert float(r.pair_scores.sum()) == pytest.approx(r.score, abs=1e-4)
        found.append([r.k_names[i] for i in r.key_marginals().argsort(descending=True)[:10].tolist()])
        heads.append((layer, head))
    assert found[0] == found[1]  # the transcoders change no key-side component of layer 1's score at the key
    assert heads[0] == heads[1]
    trace = trace_induction(tiny, full, heads[0][0], heads[0][1], saes, query_positions=[last])[0]
    assert trace.key_pos == key
    by_trace = [c for c, _ in sorted(trace.key_side.items(), key=lambda kv: -kv[1]) if ":f" in c][:5]
    assert all(c.startswith("blocks.0.attn.hook_z:f") for c in by_trace[:3])
    assert len(set(by_trace) & set(found[0])) >= 3, (by_trace, found[0])
