"""The sparse autoencoder: pre = (x - b_dec) W_enc + b_enc; z = sparsify(pre); x_hat = z W_dec + b_dec.

A transcoder (cfg.kind) maps its input hook's activations x to its output hook's y instead:
pre = x W_enc + b_enc; y_hat = z W_dec + b_dec (+ x W_skip for a skip transcoder)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from saebench import sparse
from saebench.atomic import atomic_save_file, atomic_write_text
from saebench.distributed import LOCAL, Reducer
from saebench.errors import ConfigError, DataError
from saebench.readers import read_json, read_safetensors
from saebench.sae import sparsify
from saebench.sae.config import SAEConfig
from saebench.sae.families import SelectContext


class SAE(nn.Module):
    """W_enc: [d_in n]; b_enc: [n]; W_dec: [n d_out] (unit-norm rows); b_dec: [d_out]; threshold: [n]
    (JumpReLU: log_threshold [n], the trained parameter, of which `threshold` is the copy inference reads);
    W_skip: [d_in d_out] for a skip transcoder, else None. d_out = d_in for an SAE."""

    threshold: torch.Tensor
    log_threshold: nn.Parameter
    W_skip: nn.Parameter | None
    meta: dict

    def __init__(
        self,
        cfg: SAEConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        basis: torch.Tensor | None = None,
    ):
        """basis: [d_out r] orthonormal columns U; W_dec = normalise(G U^T), G [n r] Gaussian (subspace init).
        A transcoder's encoder columns are drawn apart from its decoder rows (they live in another space),
        its W_skip starts at zero."""
        super().__init__()
        if not cfg.d_in or not cfg.n_latents:
            raise ConfigError(
                "SAEConfig has no d_in / n_latents yet: give them, or cfg.resolve(d_in) for a hook's width"
            )
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.n_latents, cfg.d_out if basis is None else basis.shape[1], generator=gen)
        if basis is not None:
            W_dec = W_dec @ basis.T.cpu().float()
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        W_enc = W_dec  # tied init
        if cfg.transcoder:
            W_enc = torch.randn(cfg.n_latents, cfg.d_in, generator=gen)
            W_enc /= W_enc.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device, dtype))
        self.W_enc = nn.Parameter(W_enc.T.clone().contiguous().to(device, dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, device=device, dtype=dtype))
        skip = torch.zeros(cfg.d_in, cfg.d_out, device=device, dtype=dtype)
        self.W_skip = nn.Parameter(skip) if cfg.skip else None
        self.register_buffer("threshold", torch.zeros(cfg.n_latents, device=device, dtype=dtype))
        if cfg.family.threshold == "learned":  # JumpReLU trains log(threshold); `threshold` follows it
            self.log_threshold = nn.Parameter(torch.zeros_like(self.threshold))
            self.set_threshold(torch.full_like(self.threshold, cfg.epsilon))

    # -- forward pieces ---------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x: [... d_in] -> [... n]."""
        self._check_input(x)
        # = (x - b_dec) W_enc + b_enc; folding b_dec into the bias keeps a [batch d_in] gradient
        # (a third dense matmul) out of the backward when x needs none. The bias takes the matmul's
        # dtype, so a bf16 autocast matmul is not promoted to fp32 by an fp32 bias.
        pre = x @ self.W_enc
        return pre + (self.b_enc - self.b_in @ self.W_enc).to(pre.dtype)

    @property
    def b_in(self) -> torch.Tensor:
        """[d_in] what the encoder subtracts from its input: b_dec for an SAE, zero for a transcoder."""
        return self.b_enc.new_zeros(self.cfg.d_in) if self.cfg.transcoder else self.b_dec

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: [... d_in] -> x W_skip [... d_out] for a skip transcoder; None otherwise."""
        return None if self.W_skip is None else x @ self.W_skip

    def select(
        self,
        pre: torch.Tensor,
        train: bool | None = None,
        reduce: Reducer = LOCAL,
        grad: torch.Tensor | None = None,
        freq: torch.Tensor | None = None,
        k: int | None = None,
    ) -> sparsify.Selection:
        """Which latents fire, with their values. pre: [batch n]; reduce: the ranks whose batches the
        batch sparsifiers select over together (data parallelism); grad: [batch d_in], the model's loss
        gradient at the input, read by the families that rank by it (Family.gradients); freq: [n] recent
        fires per token; k: k' latents per token at inference (see `check_k`). A transcoder's grad is at its
        output ([batch d_out]), where its decoder writes."""
        train = self.training if train is None else train
        family = self.cfg.family
        cfg = self.cfg
        if k is not None:
            self.check_k(k)
            cfg = dataclasses.replace(cfg, k=k)
        elif family.threshold and not train:
            return sparsify.threshold(pre, self.threshold)
        latent_grads = None
        if grad is not None and family.gradients:
            latent_grads = grad.to(pre.dtype) @ self.W_dec.detach().T.to(pre.dtype)
        return family.select(
            pre,
            cfg,
            SelectContext(reduce, latent_grads=latent_grads, freq=freq, threshold=self.learned_threshold()),
        )

    def learned_threshold(self) -> torch.Tensor | None:
        """[n] JumpReLU's exp(log_threshold), differentiable; None for the other families."""
        return self.log_threshold.exp() if self.cfg.family.threshold == "learned" else None

    def check_k(self, k: int) -> None:
        """k' for inference: a per-token family keeps the k' latents its rule ranks first (pre, or |pre| for a
        signed family), i.e. the first k' of a hierarchical SAE's sorted selection. k' < k truncates what the
        SAE was trained to select, k' > k goes beyond it. ConfigError for the batch families (their inference
        rule is a threshold) and outside [1, n_latents]."""
        cfg = self.cfg
        if cfg.family.threshold:
            raise ConfigError(
                f"k'={k}: a {cfg.activation} SAE encodes by a learned threshold, not a number of latents per token; "
                "drop k' (--k) for it, or use a per-token family (topk, hierarchical_topk)"
            )
        if not 1 <= k <= cfg.n_latents:
            raise ConfigError(f"k'={k} must lie in [1, n_latents={cfg.n_latents}] (the SAE was trained at k={cfg.k})")

    def pre_at(self, sel: sparsify.Selection, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """pre [batch n], computed without autograd, recomputed with it at sel's entries only ([nnz] or
        [batch k]), so the encoder's backward is sparse (saebench.sparse.pre_acts_at)."""
        return sparse.pre_acts_at(x, self.b_in, self.W_enc, self.b_enc, sel.indices, sel.offsets, pre)

    def reattach(self, sel: sparsify.Selection, at: torch.Tensor, jump: bool = True) -> sparsify.Selection:
        """A selection made on detached pre with its values recomputed from `at` (pre_at): values equal sel's.
        jump: JumpReLU's values jump at the threshold (False: ReLU'd, as AuxK's)."""
        if jump and (theta := self.learned_threshold()) is not None:
            values = sparsify.jump(at, theta[sel.indices], self.cfg.epsilon, self.cfg.ste_to_input)
        else:
            values = at if self.cfg.family.signed else at.relu()
        return sparsify.Selection(values, sel.indices, sel.offsets, sel.batch)

    def encode(self, x: torch.Tensor, grad: torch.Tensor | None = None, *, k: int | None = None) -> torch.Tensor:
        """x: [... d_in] -> z: [... n], dense with zeros (inference rule for batch sparsifiers).
        grad: [... d_out], the model's loss gradient at the output (x for an SAE), for the families that rank by
        it (TopK without);
        k: k' latents per token instead of the SAE's k (per-token families; see `check_k`)."""
        shape = x.shape
        pre = self.pre_acts(x.reshape(-1, shape[-1]))
        sel = self.select(pre, train=False, grad=None if grad is None else grad.reshape(-1, shape[-1]), k=k)
        return sel.dense(pre.shape[-1]).reshape(*shape[:-1], -1)

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """z: [... n] -> [... d_out]; x: [... d_in] the input, which a skip transcoder's skip term reads."""
        out = z @ self.W_dec + self.b_dec
        if self.W_skip is None:
            return out
        if x is None:
            raise ValueError("a skip transcoder's output reads its input: pass x to decode(z, x)")
        return out + x @ self.W_skip

    def decode_selection(self, sel: sparsify.Selection, n_prefix: int | None = None) -> torch.Tensor:
        """Sparse decode of a selection, optionally only latents < n_prefix (Matryoshka); without a skip term.
        -> [batch d_out]."""
        if n_prefix is not None and n_prefix < self.cfg.n_latents:
            sel = sel.prefix(n_prefix)
        if sel.offsets is None:
            return sparse.decode_fixed(sel.values, sel.indices, self.W_dec, self.b_dec)
        return sparse.decode_ragged(sel.values, sel.indices, sel.offsets, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None, *, k: int | None = None) -> torch.Tensor:
        """x: [... d_in] -> [... d_out]; grad: the model's loss gradient at the output (see `encode`)."""
        return self.decode(self.encode(x, grad, k=k), x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise DataError(f"activations have width {x.shape[-1]} but the SAE expects d_in={self.cfg.d_in}")

    # -- decoder geometry -------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the component of each W_dec row's gradient along the row (it only changes the norm)."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.addcmul_((g * w).sum(-1, keepdim=True), w, value=-1)  # in place, no [n d] temporary

    @torch.no_grad()
    def fold_input_scale(self, scale: float, out_scale: float | None = None) -> None:
        """Make an SAE trained on scale * x work on raw x: codes shrink by `scale`, W_dec stays unit-norm.
        The raw loss gradient is scale x the scaled one, so gradient_beta / scale keeps the ranking.
        A transcoder trained from scale * x to out_scale * y: codes shrink by out_scale, W_enc and W_skip
        grow by scale / out_scale."""
        out_scale = scale if out_scale is None else out_scale
        if out_scale != scale:
            self.W_enc *= scale / out_scale
            if self.W_skip is not None:
                self.W_skip.mul_(scale / out_scale)
        self.b_dec /= out_scale
        self.b_enc /= out_scale
        self.set_threshold(self.threshold / out_scale)
        if self.cfg.family.gradients:
            self.cfg = dataclasses.replace(self.cfg, gradient_beta=self.cfg.gradient_beta / out_scale)

    @torch.no_grad()
    def set_threshold(self, threshold: torch.Tensor) -> None:
        """The inference threshold [n]; for JumpReLU also the trained log(threshold) (from 1e-30 up)."""
        self.threshold.copy_(threshold)
        if self.cfg.family.threshold == "learned":
            self.log_threshold.copy_(threshold.clamp_min(1e-30).log())

    # -- files ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().contiguous() for k, v in self.named_parameters() if k != "log_threshold"}
        if self.cfg.family.threshold:
            out["threshold"] = self.threshold.detach().contiguous()
        return out

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """folder/cfg.json + folder/sae.safetensors (+ W_skip for a skip transcoder), each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**dataclasses.asdict(self.cfg), **(extra or {})}
        atomic_write_text(folder / "cfg.json", json.dumps(meta, indent=1) + "\n")
        atomic_save_file(self.state_tensors(), folder / "sae.safetensors")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> SAE:
        """saebench's own format (folder/cfg.json + folder/sae.safetensors); a damaged or half-written
        file is a DataError naming it. `saebench.interop.load_sae` also reads SAELens folders."""
        folder = Path(folder)
        if not (folder / "cfg.json").exists() or not (folder / "sae.safetensors").exists():
            raise DataError(f"no SAE at {folder} (needs cfg.json and sae.safetensors)")
        meta = read_json(folder / "cfg.json", "retrain the SAE or copy the folder again")
        names = {f.name for f in dataclasses.fields(SAEConfig)}
        sae = cls(SAEConfig(**{k: v for k, v in meta.items() if k in names}), device=device)
        tensors = read_safetensors(folder / "sae.safetensors", device, "retrain the SAE or copy the folder again")
        want = set(sae.state_tensors())
        if not want <= set(tensors):
            raise DataError(
                f"{folder / 'sae.safetensors'} lacks {', '.join(sorted(want - set(tensors)))}: "
                "it is damaged or from another tool; retrain the SAE or copy the folder again"
            )
        with torch.no_grad():
            for name, value in tensors.items():
                target = getattr(sae, name)
                if target.shape != value.shape:
                    raise DataError(
                        f"{folder / 'sae.safetensors'}: {name} has shape {tuple(value.shape)} but cfg.json says "
                        f"{tuple(target.shape)}; the two files are from different SAEs"
                    )
                target.copy_(value)
        sae.set_threshold(sae.threshold.clone())
        sae.meta = meta
        return sae
