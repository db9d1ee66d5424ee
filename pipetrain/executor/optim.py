"""Optimizer, gradient synchronisation and global-norm clipping of one rank's stages.

Order at the end of a step (every rank, same order):
1. data-parallel all-reduce (SUM) of all this rank's gradients, flattened into one persistent
   buffer, in the rank's data-parallel group;
2. tied parameters whose owner and users sit on different ranks: all-reduce (SUM) of that
   parameter's gradient in its tie group, so every copy holds the full gradient;
3. global-norm clipping: squared norms summed over this rank's parameters (a tied copy counts
   only at its owner), all-reduced over the pipeline group; coefficient as
   ``torch.nn.utils.clip_grad_norm_``: ``min(1, max_norm / (norm + 1e-6))``;
4. the optimizer step (AdamW or SGD), then gradients zeroed: in place on CPU, set to None on
   CUDA (:func:`grads_to_none`).

Under ``bf16-mixed`` precision the optimizer updates fp32 master weights and the stages compute
with bf16 working copies; the gradients reach steps 1-3 in fp32. With ZeRO, FSDP2 does it
(:func:`pipetrain.executor.parallel.mixed_precision`); without, :class:`MasterWeights`.

Losses are scaled by ``1/(m*dp)`` per micro-batch, so the summed gradient is the gradient of
the mean loss over the global batch, as on one device.

On a device mesh (tensor parallelism or ZeRO, :mod:`pipetrain.executor.parallel`) parameters
may be DTensors: step 1 reduces their local shards (with ZeRO FSDP2 already reduce-scattered
them over dp in the backward, and step 1 is skipped), step 2 all-reduces local shards (the
tied copies are sharded alike on both ranks), and step 3 sums the squares of the gradient
elements each rank counts (every element once over pp, dp and tp:
:func:`pipetrain.executor.parallel.counts_in_norm`) in one all-reduce over all ranks, per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipetrain.errors import ConfigError

__all__ = ["OptimConfig", "make_optimizer", "GradSync", "MasterWeights", "clip_coefficient", "squared_norms", "grads_to_none", "grad_of", "DEFAULT_LR"]

DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 0.0  # 0 -> DEFAULT_LR[name]
    weight_decay: float = 0.0
    momentum: float = 0.0
    clip_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        if self.name not in DEFAULT_LR:
            raise ConfigError(f"optimizer {self.name!r} is unknown; use adamw or sgd")
        if self.lr < 0 or self.weight_decay < 0 or self.momentum < 0 or self.clip_norm < 0:
            raise ConfigError("lr, weight decay, momentum and clip norm must be >= 0")

    @property
    def effective_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.name]


def grads_to_none(device: torch.device | str) -> bool:
    """Whether the end of a step sets the gradients to None (CUDA) or zeroes them in place (CPU).

    On CUDA the caching allocator keeps freed memory, and the next step's first backward writes
    its gradient instead of adding to zeros. On CPU, freeing megabyte-sized gradients lets glibc
    give the pages back to the OS and the next backward faults them in again; zeroing in place
    keeps them, at no cost in step time (figures: benchmarks/RESULTS.md)."""
    return torch.device(device).type == "cuda"


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD. On CUDA the multi-tensor (foreach) kernels: one launch per group of tensors
    instead of about ten per tensor, which is what bounds the step of short GPU kernels. On CPU the
    per-tensor loop, as before: with one thread foreach saves only per-tensor dispatch, which helped
    on small tensors and not on large ones, where the arithmetic dominates (figures:
    benchmarks/RESULTS.md). The single-device reference makes its optimizer here too, so both sides
    run the same arithmetic."""
    foreach = bool(params) and params[0].device.type == "cuda"
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.effective_lr, weight_decay=cfg.weight_decay, foreach=foreach)
    return torch.optim.SGD(params, lr=cfg.effective_lr, momentum=cfg.momentum, foreach=foreach)


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Scale factor of ``torch.nn.utils.clip_grad_norm_`` (1.0 when within the limit)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def squared_norms(tensors: list[torch.Tensor]) -> list[float]:
    """Squared L2 norm of each tensor: one fused fp32 norm per tensor (as clip_grad_norm_), squared in fp64."""
    if not tensors:
        return []
    foreach = getattr(torch, "_foreach_norm", None)
    norms = foreach(tensors) if foreach is not None else [torch.linalg.vector_norm(t) for t in tensors]
    return [float(v) ** 2 for v in torch.stack([n.reshape(()) for n in norms]).double().cpu().tolist()]


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, which the caller knows is set (after a backward, or :meth:`GradSync.sync` filled it)."""
    g = p.grad
    assert g is not None, "parameter has no gradient"
    return g


def unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class MasterWeights:
    """bf16-mixed precision without FSDP2 (ZeRO-0): fp32 master weights in the optimizer, bf16
    working weights in the modules, gradients accumulated in fp32 (Megatron's ``main_grad``).

    The working parameters are cast to bf16 in place; each gets an fp32 master copy. After each
    backward's accumulation into a working parameter (``register_post_accumulate_grad_hook``) its
    bf16 gradient is added to the master's fp32 gradient and freed, so the accumulation over the
    micro-batches, the data-parallel all-reduce, the norm and the clip all run in fp32, as the
    memory model counts (4-byte gradients). :meth:`copy_to_working` after the optimizer step
    rounds the updated masters back to bf16."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.working = unique_params(modules)
        self.masters: list[nn.Parameter] = []
        self._of: dict[int, nn.Parameter] = {}
        for w in self.working:
            m = nn.Parameter(w.detach().clone().float())
            self.masters.append(m)
            self._of[id(w)] = m
            # swapped in place (the same Python object, so ties and the modules keep it): ``.data``
            # assignment would not recast a DTensor parameter (tensor parallelism)
            torch.utils.swap_tensors(w, nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=w.requires_grad))
            w.register_post_accumulate_grad_hook(self._accumulate)

    def master_of(self, p: torch.Tensor) -> nn.Parameter:
        """The fp32 master of working parameter ``p``."""
        return self._of[id(p)]

    def _accumulate(self, w: torch.Tensor) -> None:
        m = self._of[id(w)]
        g = w.grad
        assert g is not None
        if m.grad is None:
            m.grad = g.float()
        else:
            m.grad.add_(g)
        w.grad = None

    def collect(self) -> None:
        """Fold gradients left on working parameters into the masters: the split backward's W
        (:mod:`pipetrain.executor.wgrad`, :mod:`pipetrain.executor.splitbw`) assigns ``.grad``
        itself, which fires no accumulation hook. Called before the gradient sync."""
        for w in self.working:
            if w.grad is not None:
                self._accumulate(w)

    def full_precision_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state dict with each working parameter replaced by its fp32 master (tied
        parameters under each of their names)."""
        out = dict(module.state_dict())
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in self._of:
                out[name] = self._of[id(p)].detach()
        return out

    @torch.no_grad()
    def copy_to_working(self) -> None:
        for w, m in zip(self.working, self.masters):
            w.copy_(m)


class GradSync:
    """Steps 1-3 of the module docstring for one rank."""

    def __init__(self, params: list[nn.Parameter], *, dp_group: Any, pp_group: Any,
                 ties: list[tuple[nn.Parameter, Any, bool]], clip_norm: float, telemetry: Any, stage: int,
                 stage_of: dict[int, int] | None = None, counts: Callable[[torch.Tensor], bool] | None = None,
                 num_stages: int = 0) -> None:
        self.params = params
        self.dp_group = dp_group
        self.pp_group = pp_group
        self.ties = ties  # (local parameter, group, this rank owns it)
        self.clip_norm = clip_norm
        self.tel = telemetry
        self.stage = stage
        not_owned = {id(p) for p, _, owner in ties if not owner}
        self.norm_params = [p for p in params if id(p) not in not_owned]
        #: on a mesh: whether a gradient's local part enters the norm (then reduced over all ranks,
        #: one slot per stage of the plan's ``num_stages``)
        self.counts = counts
        self.num_stages = num_stages
        n = sum(_local(p).numel() for p in params)
        self.flat = torch.zeros(n, dtype=torch.float32, device=params[0].device) if (dp_group is not None and params) else None
        self.last_norm = 0.0
        self.stage_of = stage_of or {}  # id(param) -> stage index, for per-stage norms
        self.stage_norms: dict[str, float] = {}

    def _grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.counts is not None:  # on a mesh: partial sums over tp (sequence-parallel norms) reduced first
            from pipetrain.executor.parallel import reduce_partial_grads

            reduce_partial_grads(self.params)

    def sync(self) -> float:
        """All-reduce and clip; return the global gradient norm (before clipping)."""
        self._grads()
        tel = self.tel
        if self.flat is not None:
            t0 = tel.now()
            off = 0
            for p in self.params:
                g = _local(grad_of(p))
                k = g.numel()
                self.flat[off:off + k].copy_(g.reshape(-1))
                off += k
            dist.all_reduce(self.flat, group=self.dp_group)
            off = 0
            for p in self.params:
                g = _local(grad_of(p))
                k = g.numel()
                g.copy_(self.flat[off:off + k].view_as(g))
                off += k
            tel.add("ALLREDUCE", self.stage, -1, t0, tel.now(), self.flat.numel() * 4)
        for p, group, _ in self.ties:
            t0 = tel.now()
            g = _local(grad_of(p))
            dist.all_reduce(g, group=group)
            tel.add("ALLREDUCE", self.stage, -1, t0, tel.now(), g.numel() * g.element_size())
        if self.counts is not None:
            return self._mesh_norm_and_clip()
        sqs = squared_norms([grad_of(p).detach() for p in self.norm_params])
        per_stage: dict[int, float] = {}
        for p, v in zip(self.norm_params, sqs):
            k = self.stage_of.get(id(p), self.stage)
            per_stage[k] = per_stage.get(k, 0.0) + v
        self.stage_norms = {str(k): per_stage[k] ** 0.5 for k in sorted(per_stage)}
        dev = self.params[0].device if self.params else torch.device("cpu")
        sq = torch.tensor([sum(sqs)], dtype=torch.float64, device=dev)
        if self.pp_group is not None and self.clip_norm > 0:  # without clipping no rank waits for the others
            dist.all_reduce(sq, group=self.pp_group)
        return self._clip(float(sq.sqrt()))  # without clipping: this rank's stages only (RunResult sums the stages)

    def _clip(self, norm: float) -> float:
        """Scale every gradient to the clip norm when ``norm`` exceeds it; remember and return ``norm``."""
        coef = clip_coefficient(norm, self.clip_norm)
        if coef < 1.0:
            for p in self.params:
                grad_of(p).mul_(coef)
        self.last_norm = norm
        return norm

    def _mesh_norm_and_clip(self) -> float:
        """Step 3 on a mesh: per-stage squared sums of the counted local gradients, all-reduced over
        all ranks (always, clipping or not: the norm is global either way), then the clip."""
        counts = self.counts
        assert counts is not None
        mine = [p for p in self.norm_params if counts(grad_of(p))]
        sqs = squared_norms([_local(grad_of(p)).detach() for p in mine])
        dev = self.params[0].device if self.params else torch.device("cpu")
        vec = torch.zeros(max(self.num_stages, 1), dtype=torch.float64, device=dev)
        for p, v in zip(mine, sqs):
            vec[self.stage_of.get(id(p), self.stage)] += v
        dist.all_reduce(vec)
        per_stage = vec.cpu().tolist()
        self.stage_norms = {str(k): float(v) ** 0.5 for k, v in enumerate(per_stage)}
        return self._clip(float(vec.sum().sqrt()))


def _local(t: torch.Tensor) -> torch.Tensor:
    from pipetrain.executor.parallel import local

    return local(t)
