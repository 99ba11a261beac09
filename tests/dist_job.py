"""Jobs the distributed tests run under torchrun (and, for references, in one process).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_job.py CASE OUT [ACTIVATION]

Every rank builds the same data from a seed; results go to OUT as safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file

from saebench import distributed as dist
from saebench.sae import SAEConfig
from saebench.sae.families import Activation
from saebench.train import TrainConfig, train_sae, train_saes

D, N_LATENTS, BATCH, STEPS = 16, 64, 256, 12
HOOKS = ("a", "b")


def data(seed: int = 0, n: int = 4096) -> torch.Tensor:
    """[n D] correlated, offset, sparse-ish activations (a planted dictionary plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(96, D, generator=gen)
    codes = torch.rand(n, 96, generator=gen).pow(6) * (torch.rand(n, 96, generator=gen) < 0.1)
    return codes @ dictionary + 0.05 * torch.randn(n, D, generator=gen) + 3.0


def sae_cfg(activation: str, hook: str | None = None) -> SAEConfig:
    # dead_tokens is small so AuxK runs on the dead-latent statistics, which must be global
    return SAEConfig(
        d_in=D, n_latents=N_LATENTS, activation=cast(Activation, activation), k=4, dead_tokens=1024, hook=hook
    )


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            "n_tokens": STEPS * BATCH,
            "batch_size": BATCH,
            "init_tokens": 2 * BATCH,
            "log_every": 4,
            "checkpoint_every": 0,
            "lr": 3e-3,
            "seed": 0,
            **kw,
        }
    )


def hook_stream(rank: int, world: int):
    """epoch -> {hook: [BATCH/world D]}: this rank's slice of every global batch of both hooks, in order."""
    acts = {h: data(seed) for seed, h in enumerate(HOOKS)}
    b = BATCH // world

    def epoch(e: int):
        for i in range(0, len(acts["a"]) - BATCH + 1, BATCH):
            yield {h: a[i + rank * b : i + (rank + 1) * b] for h, a in acts.items()}

    return epoch


def weights(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in sae.state_dict().items()}


def main(case: str, out: str, activation: str = "topk") -> None:
    dist.init("cpu")
    torch.set_num_threads(1)
    out_dir = Path(out)
    rank, world = dist.rank(), dist.world()
    if case == "data":  # every rank: the same tensor, its slice of each global batch
        sae, _ = train_sae(sae_cfg(activation), data(), train_cfg(), show_progress=False)
        if rank == 0:
            save_file(weights(sae), str(out_dir / "data.safetensors"))
    elif case == "data-stream":  # every rank: its own stream (its slices), init sample gathered
        cfgs = {"sae": sae_cfg(activation, "a")}
        saes, _ = train_saes(cfgs, hook_stream(rank, world), train_cfg(), show_progress=False)
        if rank == 0:
            save_file(weights(saes["sae"]), str(out_dir / "data-stream.safetensors"))
    elif case == "hooks":  # SAE on hook a -> rank 0, on hook b -> rank 1; each rank runs "the model" on its share
        cfgs = {h: sae_cfg(activation, h) for h in HOOKS}
        saes, _ = train_saes(
            cfgs, hook_stream(rank, world), train_cfg(distribute="hooks"), run_dir=out_dir / "run", show_progress=False
        )
        for name, sae in saes.items():
            save_file(weights(sae), str(out_dir / f"hooks-{name}-rank{rank}.safetensors"))
    elif case in ("resume-part", "resume-rest", "resume-whole"):
        run = out_dir / ("whole" if case == "resume-whole" else "parts")
        cfg = train_cfg(checkpoint_every=5)
        stop = 5 if case == "resume-part" else None
        sae, _ = train_sae(
            sae_cfg(activation),
            data(),
            cfg,
            run_dir=run,
            resume=case == "resume-rest",
            stop_after_steps=stop,
            show_progress=False,
        )
        if rank == 0 and case != "resume-part":
            save_file(weights(sae), str(out_dir / f"{case}.safetensors"))
    elif case == "crash-once":  # rank 1 dies after the step-5 checkpoint; torchrun's restart resumes
        run = out_dir / "crash"
        if dist.restarted():
            sae, _ = train_sae(
                sae_cfg(activation), data(), train_cfg(checkpoint_every=5), run_dir=run, show_progress=False
            )
            if rank == 0:
                save_file(weights(sae), str(out_dir / "crash-once.safetensors"))
        else:
            train_sae(
                sae_cfg(activation),
                data(),
                train_cfg(checkpoint_every=5),
                run_dir=run,
                stop_after_steps=7,
                show_progress=False,
            )
            if rank == 1:
                raise RuntimeError("rank 1 died")
            dist.barrier()  # waits for rank 1, which never comes: torchrun stops this rank
    else:
        raise SystemExit(f"unknown case {case}")
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
