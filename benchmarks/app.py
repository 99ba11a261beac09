"""How fast the app's pages answer, each next to its goal, in one run.

    python benchmarks/app.py [--run runs/tiny] [--wide 65536] [--wide-tokens 100000] [--repeats 5]

For the run's SAE (3072 features for tiny) and for a wide random SAE of the same model (analysed
once into .cache/bench-app/, reused after), prints one JSON line per case with the library call the
page makes (median ms over many calls) and the whole page script under streamlit's AppTest, warm
(median of --repeats runs after a first, cold run that loads the model). Goals (ms): feature 300,
prompt 300, steer (32 tokens) 3000, trace 1000.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import saebench as sb
from saebench.analysis import AnalysisConfig
from saebench.app_launcher import APP_DIR, RUNS_ENV

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyze import bench_run, emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOALS_MS = {"feature": 300, "search": 300, "prompt": 300, "steer": 3000, "trace": 1000}
PROMPT = "And God said, Let there be light: and there was light. And God saw the light, that it was good."


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def page_ms(run: Path, page: str, params: dict, repeats: int) -> tuple[float, float]:
    """(cold ms, warm median ms) of one page script under AppTest."""
    from streamlit.testing.v1 import AppTest

    os.environ[RUNS_ENV] = str(run)
    at = AppTest.from_file(str(APP_DIR / page), default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = str(v)
    t = time.perf_counter()
    at.run()
    cold = (time.perf_counter() - t) * 1000
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].value}")
    return cold, median_ms(at.run, repeats)


def wide_run(run: Path, n_latents: int, n_tokens: int) -> Path:
    """A random SAE with n_latents features on the run's hook, analysed once (cached)."""
    cache = ROOT / ".cache" / "bench-app" / f"wide-{n_latents}-{n_tokens}"
    if (cache / "bench" / "features.sqlite").exists():
        return cache / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    dst, _ = bench_run(run, cache)
    cfg = sb.SAE.load(dst / "sae").cfg
    shutil.rmtree(dst / "sae")
    sb.SAE(sb.SAEConfig(d_in=cfg.d_in, n_latents=n_latents, k=cfg.k, hook=cfg.hook, model=cfg.model)).save(dst / "sae")
    t = time.perf_counter()
    sb.analyze(dst, AnalysisConfig(n_tokens=n_tokens), show_progress=True)
    print(
        f"# analysed the {n_latents}-feature SAE on {n_tokens} tokens in {time.perf_counter() - t:.0f} s",
        file=sys.stderr,
    )
    return dst


def bench(run: Path, label: str, repeats: int, live: bool) -> None:
    store = sb.FeatureStore(run)
    n = store.n_features
    rng = random.Random(0)
    ids = [rng.randrange(n) for _ in range(50)]
    it = iter(ids * 10)
    lib = median_ms(lambda: store.feature(next(it)), len(ids))
    cold, warm = page_ms(run, "pages/1_Feature.py", {"feature": ids[0]}, repeats)
    emit(
        {
            "case": "feature",
            "sae": label,
            "n_features": n,
            "library_ms": round(lib, 2),
            "page_cold_ms": round(cold),
            "page_ms": round(warm, 1),
            "goal_ms": GOALS_MS["feature"],
            "ratio_to_goal": round(warm / GOALS_MS["feature"], 3),
        }
    )
    lib = median_ms(lambda: store.search("light"), 20)
    emit(
        {
            "case": "search",
            "sae": label,
            "n_features": n,
            "library_ms": round(lib, 2),
            "goal_ms": GOALS_MS["search"],
            "ratio_to_goal": round(lib / GOALS_MS["search"], 3),
        }
    )
    if not live:
        return
    rc = sb.load_config(run / "config.yaml")
    model = sb.load_model(rc.model, rc.device, rc.torch_dtype)
    sae = sb.SAE.load(run / "sae")
    hook = store.meta["hook"]
    lib = median_ms(lambda: sb.features_firing_on(model, sae, hook, PROMPT, top=64, vocab=store.vocab), 20)
    cold, warm = page_ms(run, "pages/2_Prompt.py", {"prompt": PROMPT}, repeats)
    emit(
        {
            "case": "prompt",
            "sae": label,
            "n_tokens": len(sb.prompt_tokens(model, PROMPT)[0]),
            "library_ms": round(lib, 2),
            "page_cold_ms": round(cold),
            "page_ms": round(warm, 1),
            "goal_ms": GOALS_MS["prompt"],
            "ratio_to_goal": round(warm / GOALS_MS["prompt"], 3),
        }
    )
    feats = {int(store.table().nlargest(1, "density").feature.iloc[0]): 8.0}
    lib = median_ms(lambda: sb.compare_steering(model, sae, feats, "In the beginning", max_new_tokens=32), 3)
    cold, warm = page_ms(
        run,
        "pages/3_Steer.py",
        {"prompt": "In the beginning", "features": ",".join(f"{f}:8" for f in feats), "tokens": 32},
        repeats,
    )
    emit(
        {
            "case": "steer",
            "sae": label,
            "new_tokens": 32,
            "generations": 2,
            "library_ms": round(lib, 1),
            "page_cold_ms": round(cold),
            "page_ms": round(warm, 1),
            "goal_ms": GOALS_MS["steer"],
            "ratio_to_goal": round(warm / GOALS_MS["steer"], 3),
        }
    )
    prompt = "The cat sat on the mat. The cat sat on the mat."
    assert sae.cfg.hook is not None
    saes = {sae.cfg.hook: sae}
    lib = median_ms(
        lambda: sb.trace_attention(model, prompt, model.cfg.n_layers - 1, 0, saes=saes, logit_tokens="top"), 10
    )
    cold, warm = page_ms(
        run, "pages/4_Trace.py", {"prompt": prompt, "layer": model.cfg.n_layers - 1, "head": 0}, repeats
    )
    emit(
        {
            "case": "trace",
            "sae": label,
            "prompt_tokens": len(sb.prompt_tokens(model, prompt)[0]),
            "library_ms": round(lib, 1),
            "page_cold_ms": round(cold),
            "page_ms": round(warm, 1),
            "goal_ms": GOALS_MS["trace"],
            "ratio_to_goal": round(warm / GOALS_MS["trace"], 3),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/tiny")
    p.add_argument("--wide", type=int, default=65536, help="features of the wide random SAE (0: skip)")
    p.add_argument("--wide-tokens", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "features.sqlite").exists():
        sys.exit(f"{run} has no feature store: run `make demo` (or `saebench analyze {run}`) first")
    bench(run, f"{run.name} (trained)", args.repeats, live=True)
    if args.wide:
        bench(wide_run(run, args.wide, args.wide_tokens), f"random {args.wide}", args.repeats, live=True)


if __name__ == "__main__":
    main()
