"""What tensor and data parallelism do to a GPU's model state and what they communicate, torch-free.

Pure functions of counts, each with its source:

* :func:`model_state_bytes`: weights, gradients and optimizer state on one GPU under ZeRO
  stage 0-3 over ``dp`` ranks (Rajbhandari et al. 2020, "ZeRO", sec. 5.1 and fig. 1: with K
  bytes of optimizer state per parameter, (2+2+K)Ψ, 2Ψ+2Ψ+KΨ/N, 2Ψ+(2+K)Ψ/N and (2+2+K)Ψ/N for
  fp16 weights and gradients); ``bf16-mixed`` counts fp32 gradients as Megatron-LM's
  distributed optimizer does (docs "Distributed Optimizer": 18 bytes per parameter, 6 + 12/d
  with the optimizer sharded over d).
* :func:`tp_collectives_per_layer`: Megatron's tensor-parallel communication of one transformer
  layer for one micro-batch (Shoeybi et al. 2019, sec. 3, fig. 4: two all-reduces of the b·s·h
  activation in the forward pass, two in the backward); with sequence parallelism each
  all-reduce becomes an all-gather and a reduce-scatter of the same total size (Korthikanti et
  al. 2022, sec. 4.2.2), so the bytes on the wire stay the same.
* :func:`collective_time_s`: ring all-reduce, all-gather and reduce-scatter in the alpha-beta
  model (Patarasuk & Yuan 2009; Thakur et al. 2005): an all-reduce is a reduce-scatter followed
  by an all-gather. Where a calibration measured the collective itself on the backend in use
  (:class:`CollectiveFit`, ``pipetrain calibrate``), its fitted ``latency + bytes * per_byte``
  for that collective and group size replaces the ring formula: a backend's collectives are not
  the ring over its point-to-point link (gloo's all-reduce of a tensor-parallel activation on a
  shared CPU took many times the ring's time over the ping-pong fit's link; figures:
  benchmarks/RESULTS.md).

``Ψ`` here is the parameters held per GPU after the tensor- and pipeline-parallel splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipetrain.errors import ConfigError

__all__ = ["precision_for_dtype", "dp_allreduce_bytes_per_param",
           "PRECISIONS", "ZERO_STAGES", "COLLECTIVES", "ModelStateBytes", "param_state_bytes", "model_state_bytes",
           "Collective", "CollectiveFit", "AlphaBeta", "tp_collectives_per_layer", "tp_collectives_vocab", "collective_time_s",
           "find_fit"]

#: ``bf16-mixed``: bf16 working weights, fp32 gradients and master weights (Megatron, torchtitan);
#: ``amp-autocast``: fp32 weights and gradients, half-precision copies made per op (what torch.autocast does);
#: ``fp32``: everything in fp32; ``fp16-mixed``: the ZeRO paper's fp16 weights and fp16 gradients
PRECISIONS = ("bf16-mixed", "amp-autocast", "fp32", "fp16-mixed")
ZERO_STAGES = (0, 1, 2, 3)


def precision_for_dtype(dtype: str) -> str:
    """The precision a compute dtype alone meant before plans named one: what pipetrain's
    executor did with it (autocast over fp32 weights for bf16/fp16)."""
    return "fp32" if dtype == "fp32" else "amp-autocast"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


class AlphaBeta(Protocol):
    """A link as the alpha-beta model sees it (the topology's :class:`~pipetrain.topology.Link`, the simulator's)."""

    @property
    def latency_s(self) -> float: ...

    @property
    def bandwidth_bytes_per_s(self) -> float: ...


@dataclass(frozen=True, kw_only=True)
class ModelStateBytes:
    """One GPU's bytes of weights, gradients and optimizer state."""

    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float

    def __post_init__(self) -> None:
        if min(self.weights_bytes, self.grads_bytes, self.optimizer_bytes) < 0:
            raise ConfigError(f"model state bytes must be >= 0: {self}")

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def param_state_bytes(precision: str, optimizer: str = "adamw", *, momentum: bool = False) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter, unsharded.

    Adam keeps two fp32 moments (8 bytes) and, where the working weights are half precision, an
    fp32 master copy (4): K = 12 (ZeRO paper, sec. 3.1). SGD keeps the master copy and, with
    momentum, one fp32 buffer.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    weights, grads, master = {"bf16-mixed": (2, 4, 4), "fp16-mixed": (2, 2, 4), "amp-autocast": (4, 4, 0), "fp32": (4, 4, 0)}[precision]
    if optimizer == "adamw":
        return weights, grads, master + 8
    if optimizer == "sgd":
        return weights, grads, master + (4 if momentum else 0)
    raise ConfigError(f"optimizer {optimizer!r} is unknown; choose adamw or sgd")


def model_state_bytes(params: float, *, zero: int, dp: int, precision: str, optimizer: str = "adamw",
                      momentum: bool = False) -> ModelStateBytes:
    """Bytes on one GPU holding ``params`` parameters (after tp and pp), ZeRO stage ``zero`` over ``dp``.

    Stage 1 shards the optimizer state, stage 2 the gradients too, stage 3 the weights too; each
    sharded part is divided by ``dp`` (ZeRO paper, fig. 1). Buffers that stage 3 gathers for one
    layer at a time are working memory, not state, and are left to the activation model.
    """
    if zero not in ZERO_STAGES:
        raise ConfigError(f"zero must be one of {ZERO_STAGES}, got {zero!r}")
    if dp < 1:
        raise ConfigError(f"dp must be >= 1, got {dp}")
    if params < 0:
        raise ConfigError(f"parameter count must be >= 0, got {params}")
    w, g, k = param_state_bytes(precision, optimizer, momentum=momentum)
    return ModelStateBytes(weights_bytes=params * w / (dp if zero >= 3 else 1),
                           grads_bytes=params * g / (dp if zero >= 2 else 1),
                           optimizer_bytes=params * k / (dp if zero >= 1 else 1))


def dp_allreduce_bytes_per_param(*, zero: int, precision: str, num_microbatches: int) -> float:
    """Bytes per parameter of the data-parallel traffic of one step, as the size of one ring
    all-reduce moving the same volume (an all-reduce is a reduce-scatter plus an all-gather;
    Patarasuk & Yuan 2009), so one formula prices every stage:

    * ZeRO-0: one all-reduce of the fp32 gradients accumulated over the micro-batches (Megatron's
      ``accumulate_allreduce_grads_in_fp32``): 4;
    * ZeRO-1 (Megatron's distributed optimizer): a reduce-scatter of the fp32 gradients and an
      all-gather of the updated working weights: (4 + w) / 2;
    * ZeRO-2: the gradients reduce-scattered after every micro-batch's backward: (4 m + w) / 2;
    * ZeRO-3: also the weights all-gathered before every forward and backward: (4 m + w + 2 m w) / 2.

    ZeRO-2 and 3 overlap much of this with compute in practice; here it is all on the step's
    tail, an upper bound (Rajbhandari et al. 2020, sec. 7, give the volumes)."""
    if zero not in ZERO_STAGES:
        raise ConfigError(f"zero must be one of {ZERO_STAGES}, got {zero!r}")
    w = float(param_state_bytes(precision)[0])
    m = num_microbatches
    if zero == 0:
        return 4.0
    if zero == 1:
        return (4.0 + w) / 2
    if zero == 2:
        return (4.0 * m + w) / 2
    return (4.0 * m + w + 2.0 * m * w) / 2


@dataclass(frozen=True, kw_only=True)
class Collective:
    """One collective over the tensor-parallel group: ``kind`` of a tensor of ``nbytes`` (its full,
    unsharded size: an all-gather's output, a reduce-scatter's input), in pass ``phase`` ("F" or "B")."""

    kind: str
    phase: str
    nbytes: float

    def __post_init__(self) -> None:
        if self.kind not in COLLECTIVES:
            raise ConfigError(f"collective kind must be one of {COLLECTIVES}, got {self.kind!r}")
        if self.phase not in ("F", "B"):
            raise ConfigError(f"collective phase must be 'F' or 'B', got {self.phase!r}")
        if self.nbytes < 0:
            raise ConfigError(f"collective size must be >= 0 bytes, got {self.nbytes}")


def tp_collectives_per_layer(*, micro_batch_size: int, seq_len: int, hidden: int, tp: int, sequence_parallel: bool = False,
                             dtype_bytes: int = 2) -> tuple[Collective, ...]:
    """The tensor-parallel collectives of one transformer layer for one micro-batch (module docstring).

    Forward: after the attention's row-parallel output projection and after the MLP's
    row-parallel down projection (Megatron's ``g``); backward: before the column-parallel QKV and
    up projections (``f``). Nothing at ``tp`` = 1.
    """
    if min(micro_batch_size, seq_len, hidden, tp, dtype_bytes) < 1:
        raise ConfigError("micro_batch_size, seq_len, hidden, tp and dtype_bytes must be >= 1")
    if tp == 1:
        return ()
    n = float(micro_batch_size * seq_len * hidden * dtype_bytes)
    if not sequence_parallel:
        return tuple(Collective(kind="all_reduce", phase=ph, nbytes=n) for ph in ("F", "F", "B", "B"))
    # each region's all-reduce splits into the all-gather entering it and the reduce-scatter leaving it;
    # the backward pass runs the conjugates (Korthikanti et al. 2022, fig. 6)
    return tuple(Collective(kind=k, phase=ph, nbytes=n) for ph in ("F", "B") for k in ("all_gather", "reduce_scatter") * 2)


def tp_collectives_vocab(part: str, *, micro_batch_size: int, seq_len: int, hidden: int, tp: int,
                         sequence_parallel: bool = False, dtype_bytes: int = 2) -> tuple[Collective, ...]:
    """The tensor-parallel collectives of the vocabulary-parallel ``part`` ("embedding" or "head")
    for one micro-batch (Megatron-LM's ``VocabParallelEmbedding``, its parallel LM head and
    ``vocab_parallel_cross_entropy``; Narayanan et al. 2021, sec. 2.3):

    * embedding: each rank looks up the tokens of its vocabulary shard and the b·s·h outputs are
      summed, an all-reduce in the forward pass (a reduce-scatter with sequence parallelism,
      whose backward all-gathers the output gradient);
    * head: a column-parallel projection, so the backward all-reduces the gradient of its b·s·h
      input (with sequence parallelism: an all-gather of the input forward, a reduce-scatter of
      its gradient backward); the cross-entropy over vocabulary shards all-reduces three fp32
      values per token forward (the logits' max, the sum of exponentials, the target's logit).
    """
    if part not in ("embedding", "head"):
        raise ConfigError(f"vocabulary-parallel part must be 'embedding' or 'head', got {part!r}")
    if min(micro_batch_size, seq_len, hidden, tp, dtype_bytes) < 1:
        raise ConfigError("micro_batch_size, seq_len, hidden, tp and dtype_bytes must be >= 1")
    if tp == 1:
        return ()
    n = float(micro_batch_size * seq_len * hidden * dtype_bytes)
    sp = sequence_parallel
    if part == "embedding":
        if sp:
            return (Collective(kind="reduce_scatter", phase="F", nbytes=n), Collective(kind="all_gather", phase="B", nbytes=n))
        return (Collective(kind="all_reduce", phase="F", nbytes=n),)
    per_token = float(micro_batch_size * seq_len * 4)
    loss = tuple(Collective(kind="all_reduce", phase="F", nbytes=per_token) for _ in range(3))
    if sp:
        return (Collective(kind="all_gather", phase="F", nbytes=n), *loss, Collective(kind="reduce_scatter", phase="B", nbytes=n))
    return (*loss, Collective(kind="all_reduce", phase="B", nbytes=n))


@dataclass(frozen=True, kw_only=True)
class CollectiveFit:
    """A collective measured on a backend: ``kind`` over ``ranks`` ranks of a tensor of ``nbytes``
    (its full size, as :class:`Collective` counts it) takes ``seconds`` at ``sizes_bytes`` (the
    medians over repeats) and, fitted to them, ``latency_s + nbytes * per_byte_s`` (the Hockney
    model; :meth:`time_s` says which applies where)."""

    kind: str
    ranks: int
    backend: str
    latency_s: float
    per_byte_s: float
    sizes_bytes: tuple[int, ...] = ()
    seconds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in COLLECTIVES:
            raise ConfigError(f"collective kind must be one of {COLLECTIVES}, got {self.kind!r}")
        if self.ranks < 2:
            raise ConfigError(f"a measured collective needs >= 2 ranks, got {self.ranks}")
        if not (self.latency_s >= 0 and self.per_byte_s >= 0):
            raise ConfigError(f"collective fit {self.kind} x{self.ranks}: latency_s and per_byte_s must be >= 0")
        if len(self.sizes_bytes) != len(self.seconds):
            raise ConfigError(f"collective fit {self.kind} x{self.ranks}: {len(self.sizes_bytes)} sizes but {len(self.seconds)} times")

    def time_s(self, nbytes: float) -> float:
        """Between the measured sizes the measured times, linearly interpolated; above them the
        largest one plus the fit's per-byte cost; below them the smallest one (latency-bound). A
        single straight line through every size misprices the sizes that matter: the largest
        sizes pull it, and a tensor-parallel message of a small model is then priced below what
        was measured at its own size (benchmarks/RESULTS.md). Without sizes, the fit."""
        if nbytes <= 0:
            return 0.0
        if len(self.sizes_bytes) < 2:
            return self.latency_s + nbytes * self.per_byte_s
        pts = sorted(zip(self.sizes_bytes, self.seconds))
        if nbytes <= pts[0][0]:
            return pts[0][1]
        if nbytes >= pts[-1][0]:
            return pts[-1][1] + (nbytes - pts[-1][0]) * self.per_byte_s
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if nbytes <= x1:
                return y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0)
        raise AssertionError("unreachable: nbytes lies inside the measured sizes")


def find_fit(fits: Sequence[CollectiveFit], kind: str, n: int) -> CollectiveFit | None:
    """The measured ``kind`` over ``n`` ranks among ``fits``, or None."""
    return next((f for f in fits if f.kind == kind and f.ranks == n), None)


def collective_time_s(kind: str, nbytes: float, n: int, link: AlphaBeta, fits: Sequence[CollectiveFit] = ()) -> float:
    """``kind`` of a tensor of ``nbytes`` (full size) over ``n`` ranks: the measured fit of that
    collective and group size among ``fits`` where there is one, else the ring on ``link`` (alpha-beta)."""
    if kind not in COLLECTIVES:
        raise ConfigError(f"collective kind must be one of {COLLECTIVES}, got {kind!r}")
    if n < 1:
        raise ConfigError(f"a collective needs n >= 1 ranks, got {n}")
    if n == 1 or nbytes == 0:
        return 0.0
    fit = find_fit(fits, kind, n)
    if fit is not None:
        return fit.time_s(nbytes)
    # each rank sends (n-1)/n of the tensor once per phase: twice for an all-reduce
    phases = 2 if kind == "all_reduce" else 1
    return phases * ((n - 1) / n * nbytes / link.bandwidth_bytes_per_s + (n - 1) * link.latency_s)
