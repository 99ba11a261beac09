"""torch.distributed glue: rank, world, collectives and data sharding. Nothing else knows ranks.

Under `torchrun` (WORLD_SIZE > 1 in the environment) `init` joins the process group (NCCL on
GPUs, gloo on CPU); in one process every function here is a no-op, so train.py and harvest.py
read the same either way. A `Reducer` is what a data-parallel trainer reduces over: `LOCAL` does
nothing, `Reducer(True)` all-reduces across every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

MODES = ("data", "hooks")
# this elastic attempt's key space in torchrun's store (set by init)
_STORE: dist.Store | None = None  # pyright: ignore[reportPrivateImportUsage]


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "cpu", timeout_minutes: float = 30) -> str:
    """Join torchrun's process group if there is one; returns this rank's device ("cuda" -> "cuda:LOCAL_RANK")."""
    if env_world() <= 1 or not dist.is_available():
        return device
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        rank, world = int(os.environ["RANK"]), env_world()
        agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=rank == 0 and not agent_hosts,
            timeout=timeout,
        )
        # each elastic attempt gets its own keys: a restarted group read the dead attempt's peer
        # addresses from torchrun's store and failed to connect (torch 2.13, gloo)
        prefix = f"saebench/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        attempt = dist.PrefixStore(prefix, store)  # pyright: ignore[reportPrivateImportUsage]
        global _STORE
        _STORE = attempt
        dist.init_process_group("nccl" if cuda else "gloo", store=attempt, rank=rank, world_size=world, timeout=timeout)
    return device


def restarted() -> bool:
    """This process is an elastic restart (`torchrun --max-restarts`): training resumes from the run's last
    checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def shutdown() -> None:
    """Leave the process group (every rank, at the end of a job) after every rank has arrived.

    The rendezvous goes through the store, not gloo: a gloo barrier's work object is released by
    gloo's worker thread after the waiting rank wakes, and if that happens while the interpreter
    is finalising, the tensors it frees need the GIL and the process aborts ("terminate called
    without an active exception", torch 2.13)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if _STORE is not None and dist.get_world_size() > 1:
        arrived = _STORE.add("shutdown/arrived", 1)
        if arrived == dist.get_world_size():
            _STORE.set("shutdown/done", "1")
        _STORE.wait(["shutdown/done"])
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(n: int) -> slice:
    """This rank's share of n items taken round-robin: items rank, rank + world, ..."""
    return slice(rank(), n, world())


def owner(i: int) -> int:
    """The rank that owns item i when items are dealt round-robin (hooks mode)."""
    return i % world()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """[b ...] on each rank -> [(world b) ...] in rank order, the same on every rank (b equal on all ranks)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_cat(t: torch.Tensor, dst: int) -> torch.Tensor | None:
    """[b ...] on each rank -> [(world b) ...] in rank order on rank dst, None elsewhere."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world())] if rank() == dst else None
    dist.gather(t.contiguous(), parts, dst=dst)
    return torch.cat(parts) if parts is not None else None


def all_min_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


@dataclass(frozen=True)
class Reducer:
    """The ranks a data-parallel SAE's statistics are reduced over; inactive = this process alone."""

    active: bool = False

    @property
    def world(self) -> int:
        return world() if self.active else 1

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.active:
            return t
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=op)
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MIN)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def sum_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (sum) every parameter's gradient in place; a missing gradient counts as zeros."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


LOCAL = Reducer(False)


def global_kth_largest(values: torch.Tensor, m: torch.Tensor, reduce: Reducer) -> torch.Tensor:
    """Per column j, the m[j]-th largest of column j's entries on all ranks together.
    values: [c n] >= 0, each column sorted descending (as topk(sorted=True) gives); m: [n] -> [n].

    Exact with no gather of the values: a binary search over the float's bit pattern (non-negative
    floats order as their int32 bits), one all-reduce of [n] counts per bit. m[j] = 0 gives +inf.
    Each rank must hold its share of the column's top m[j] (its top-c with c >= min(m[j], rows)).
    """
    asc = values.detach().float().flip(0).T.contiguous()  # [n c] ascending
    m = m.to(asc.device, torch.long)
    lo = torch.zeros(asc.shape[0], dtype=torch.int32, device=asc.device)
    hi = torch.full_like(lo, 0x7F800000)  # +inf
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        t = mid.view(torch.float32)[:, None]
        count = asc.shape[1] - torch.searchsorted(asc, t, side="left").squeeze(1)
        ok = reduce.sum(count) >= m
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
    return lo.view(torch.float32)
