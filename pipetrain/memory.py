"""Memory model of one pipeline stage, torch-free.

A stage holding layer-graph nodes ``[start, end)`` needs (all in bytes):

* **weights + gradients + optimizer state**, per parameter (:func:`bytes_per_param`), after
  ZeRO's accounting (Rajbhandari et al. 2020, "ZeRO", sec. 3.1: mixed-precision Adam keeps
  2 + 2 + 12 = 16 bytes per parameter):

  ========  ==========  ============  =========  ===================================  =====
  dtype     optimizer   weights       grads      optimizer state                      total
  ========  ==========  ============  =========  ===================================  =====
  fp32      adamw       4             4          8 (m, v in fp32)                      16
  bf16/fp16 adamw       2 (working)   2          12 (fp32 master 4 + m 4 + v 4)        16
  fp32      sgd         4             4          0 (4 with momentum)                  8/12
  bf16/fp16 sgd         2             2          4 fp32 master (8 with momentum)     8/12
  ========  ==========  ============  =========  ===================================  =====

* **tied parameters** used here but owned by another stage (GPT-2's head on the last
  stage): a full copy with its own gradient and optimizer state.
* **activations**: per in-flight micro-batch, the bytes autograd saves for backward
  (``Node.saved_bytes``, summed over the stage), times the number in flight. The last stage
  also computes the loss: cross-entropy saves its fp32 log-softmax (the size of the logits in
  fp32) and the int64 targets (:func:`loss_saved_bytes`; GPT-2 at micro-batch 8 x 1024 tokens:
  1.6 GB, more than a transformer block). With
  recomputation only the stage input is kept per micro-batch, plus the working set of one
  micro-batch being recomputed (the full saved bytes, once).
* **autocast weight copies** (on for bf16/fp16 unless ``autocast_copies=False``): under bf16/fp16
  ``torch.autocast`` (how the executor runs bf16), every matmul saves the half-precision cast
  of its weight, and each micro-batch's autograd graph keeps its own: 2 bytes per parameter of
  the stage's non-embedding nodes (and of tied weights they use) per in-flight micro-batch
  (:func:`autocast_cast_params`; GPT-2's head holds a 77 MB bf16 copy of the 38.6M-parameter
  tied embedding per micro-batch). The traced graph (a model cast to bf16) does not contain it.
* **receive buffers**: ``buffers`` slots for the activation arriving from the previous stage
  (the bytes crossing the cut at ``start``) and one slot for the gradient arriving from the
  next stage (the bytes crossing the cut at ``end``). Counted apart from the saved
  activations (an executor that saves the received tensor in place double-counts: conservative).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pipetrain.activations import layer_activation_bytes, zb_w_held_bytes
from pipetrain.errors import ConfigError, InfeasibleError
from pipetrain.graph import LayerGraph
from pipetrain.sharding import model_state_bytes, precision_for_dtype

__all__ = [
    "GiB", "ParamStateBytes", "StageMemory", "bytes_per_param", "activation_bytes_per_microbatch",
    "block_activation_bytes", "loss_saved_bytes", "autocast_cast_params", "autocast_cast_params_per_node", "stage_input_bytes",
    "stage_output_bytes", "tied_extra_params", "stage_memory", "node_input_bytes", "recompute_memory", "selective_dropped_bytes", "recomputed_layers",
    "wgrad_held_bytes",
    "check_stage_memory",
]

GiB = 2**30
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TORCH_DTYPE_BYTES = {"int64": 8, "long": 8, "int32": 4, "int": 4, "float32": 4, "float": 4, "float16": 2, "half": 2,
                      "bfloat16": 2, "float64": 8, "double": 8, "int8": 1, "uint8": 1, "bool": 1}


@dataclass(frozen=True, kw_only=True)
class ParamStateBytes:
    """Bytes per parameter of weights, gradients and optimizer state (see module table)."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def bytes_per_param(dtype: str, optimizer: str, *, momentum: bool = False) -> ParamStateBytes:
    """Bytes per parameter for a training precision and optimizer (ZeRO, Rajbhandari et al. 2020)."""
    if dtype not in _DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} is unknown; choose one of {', '.join(_DTYPE_BYTES)}")
    w = _DTYPE_BYTES[dtype]
    master = 0 if dtype == "fp32" else 4
    if optimizer == "adamw":
        return ParamStateBytes(weights=w, grads=w, optimizer=master + 8)
    if optimizer == "sgd":
        return ParamStateBytes(weights=w, grads=w, optimizer=master + (4 if momentum else 0))
    raise ConfigError(f"optimizer {optimizer!r} is unknown; choose one of adamw, sgd")


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """Peak memory of one stage by component (bytes); ``total_bytes`` is their sum."""

    param_count: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    tied_bytes: int
    activation_bytes: int  # in-flight saved activations (or stage inputs when recomputing)
    recompute_working_bytes: int
    buffer_bytes: int
    in_flight: int
    recompute: bool

    def __post_init__(self) -> None:
        for f in ("param_count", "weights_bytes", "grads_bytes", "optimizer_bytes", "tied_bytes", "activation_bytes",
                  "recompute_working_bytes", "buffer_bytes", "in_flight"):
            if getattr(self, f) < 0:
                raise ConfigError(f"stage memory {f} must be >= 0, got {getattr(self, f)}")

    @property
    def model_state_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.tied_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activation_bytes + self.recompute_working_bytes + self.buffer_bytes

    def describe(self) -> str:
        act = f"activations {self.activation_bytes / GiB:.2f} for {self.in_flight} micro-batch(es)"
        if self.recompute:
            act += f" (recompute, +{self.recompute_working_bytes / GiB:.2f} working)"
        return (f"{self.total_bytes / GiB:.2f} GiB: weights+grads+optimizer {self.model_state_bytes / GiB:.2f}, "
                f"{act}, buffers {self.buffer_bytes / GiB:.2f}")


def _check_range(graph: LayerGraph, start: int, end: int) -> None:
    if not 0 <= start < end <= graph.num_nodes:
        raise ConfigError(f"stage range [{start}, {end}) is not within the graph's {graph.num_nodes} nodes")


def block_activation_bytes(graph: LayerGraph, index: int) -> int:
    """Bytes saved for backward by node ``index`` for one micro-batch (from the traced graph)."""
    return graph.nodes[index].saved_bytes


def loss_saved_bytes(graph: LayerGraph) -> int:
    """Bytes cross-entropy saves on the last stage: fp32 log-softmax of the output + int64 targets.

    The output's last dimension is the class/vocabulary axis; the targets have the other
    dimensions (``F.cross_entropy`` of ``ModelSpec.loss``; measured in tests/test_profile.py).
    On a tp view the head is vocabulary-parallel and the loss runs on its logits' shard
    (``loss_parallel``): a rank's log-softmax is ``1/tp`` of it, its targets whole.
    """
    shape = graph.nodes[-1].output_shape
    if not shape:
        return 0
    return _numel(shape) * 4 // graph.tp + _numel(shape[:-1]) * 8


def activation_bytes_per_microbatch(graph: LayerGraph, start: int, end: int, *, include_loss: bool = True) -> int:
    """Saved-for-backward bytes of nodes ``[start, end)`` for one micro-batch (+ the loss's, last stage)."""
    _check_range(graph, start, end)
    loss = loss_saved_bytes(graph) if include_loss and end == graph.num_nodes else 0
    return sum(n.saved_bytes for n in graph.nodes[start:end]) + loss


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def stage_input_bytes(graph: LayerGraph, start: int) -> int:
    """Bytes entering a stage that starts at ``start``: the model input, or the cut's tensors."""
    if start == 0:
        return _numel(graph.input_shape) * _TORCH_DTYPE_BYTES.get(graph.input_dtype.replace("torch.", ""), 8) if graph.input_shape else 0
    return graph.cut(start).bytes


def stage_output_bytes(graph: LayerGraph, end: int) -> int:
    """Bytes leaving a stage that ends before ``end`` (0 for the last stage)."""
    return 0 if end >= graph.num_nodes else graph.cut(end).bytes


def tied_extra_params(graph: LayerGraph, start: int, end: int) -> int:
    """Parameters of tied weights used in ``[start, end)`` but owned outside it (own copy)."""
    return sum(t.param_count for t in graph.tied
               if not (start <= t.owner < end) and any(start <= u < end for u in t.users))


def autocast_cast_params_per_node(graph: LayerGraph) -> tuple[int, ...]:
    """Per node, the parameters whose half-precision cast autocast saves per micro-batch.

    Every parameter of a non-embedding node (an embedding lookup is not cast), plus, at each
    non-embedding user, a tied weight owned by an embedding node (GPT-2's head casts the tied
    embedding). A weight tied between two non-embedding nodes counts at its owner only. Includes
    biases and norm weights (not saved in fact; small): an upper bound. Additive over a range,
    so the planner's range matrices and :func:`stage_memory` agree exactly.
    """
    nodes = graph.nodes
    out = [n.param_count if n.kind != "embedding" else 0 for n in nodes]
    for t in graph.tied:
        if nodes[t.owner].kind == "embedding":
            for u in set(t.users):
                if nodes[u].kind != "embedding":
                    out[u] += t.param_count
    return tuple(out)


def autocast_cast_params(graph: LayerGraph, start: int, end: int) -> int:
    """Parameters whose half-precision cast autocast saves per micro-batch in ``[start, end)``
    (the sum of :func:`autocast_cast_params_per_node` over the range)."""
    _check_range(graph, start, end)
    return sum(autocast_cast_params_per_node(graph)[start:end])


def node_input_bytes(graph: LayerGraph) -> tuple[int, ...]:
    """Bytes flowing into each node: its predecessors' outputs (the model input for node 0)."""
    inp = [0] * graph.num_nodes
    for e in graph.edges:
        inp[e.dst] += graph.nodes[e.src].output_bytes
    if graph.input_shape and inp[0] == 0:
        inp[0] = stage_input_bytes(graph, 0)
    return tuple(inp)


def recomputed_layers(start: int, end: int, layers: int) -> int:
    """How many of stage ``[start, end)``'s layers recompute: its first ``layers``, or all at 0
    (Megatron's ``--recompute-num-layers``; the executor's ``StageModule.set_recompute``)."""
    return end - start if layers <= 0 else min(layers, end - start)


def recompute_memory(graph: LayerGraph, start: int, end: int, *, in_flight: int, per_node_saved: tuple[float, ...],
                     layers: int = 0) -> tuple[float, float]:
    """(kept, working) bytes of a stage recomputing layer by layer, as Megatron's full recompute
    checkpoints each layer (``--recompute-granularity full``): each in-flight micro-batch keeps
    every recomputed layer's input, and the backward recomputes one layer at a time, so the
    working set is the largest single recomputed layer's saved bytes (Korthikanti et al. 2023,
    sec. 5: "only the input to each transformer layer is stored"). ``layers`` > 0 recomputes only
    the stage's first ``layers`` layers and keeps the others' activations (Megatron's
    ``--recompute-method block --recompute-num-layers``); 0 recomputes all of them."""
    k = recomputed_layers(start, end, layers)
    inputs = node_input_bytes(graph)
    kept = in_flight * (float(sum(inputs[start:start + k])) + float(sum(per_node_saved[start + k:end])))
    return kept, float(max(per_node_saved[start:start + k]))


# Per-layer figures depend only on the layer's shape and the graph's sizes: the planner asks for
# them for every stage it prices, hundreds of thousands of times on a large grid.
_layer_bytes = functools.lru_cache(maxsize=4096)(layer_activation_bytes)
_w_held_bytes = functools.lru_cache(maxsize=4096)(zb_w_held_bytes)


def selective_dropped_bytes(graph: LayerGraph) -> tuple[int, ...]:
    """Per node, the saved bytes that selective recompute does not keep: the attention core's
    (softmax output, its dropout and mask, the causal mask, the log-sum-exp; Korthikanti et al.
    2023, sec. 4.3), from :func:`pipetrain.activations.layer_activation_terms` with and without it
    at the graph's tp and sequence parallelism. 0 for nodes that declare no transformer layer
    shape (nothing there is recomputed selectively); never more than the node saves."""
    db = _DTYPE_BYTES[graph.dtype]
    out = []
    for nd in graph.nodes:
        if nd.layer is None:
            out.append(0)
            continue
        kept = [_layer_bytes(nd.layer, seq_len=graph.seq_len, micro_batch_size=graph.micro_batch_size, dtype_bytes=db,
                             tp=graph.tp, sequence_parallel=graph.sequence_parallel, recompute=kind)
                for kind in ("none", "selective")]
        drop = kept[0] - kept[1]
        out.append(max(0, min(nd.saved_bytes, drop)))
    return tuple(out)


def wgrad_held_bytes(graph: LayerGraph) -> tuple[int, ...]:
    """Per node, the bytes a split backward (ZB-H1, ZB-V, DualPipeV) holds for one micro-batch from
    its input-gradient pass (I) to its weight-gradient pass (W): for a transformer layer only the
    linear layers' inputs and output gradients (:func:`pipetrain.activations.zb_w_held_bytes`; Qi
    et al. 2024, sec. 2); for any other node everything it saved (its autograd graph is split
    generically, and kept whole until W)."""
    db = _DTYPE_BYTES[graph.dtype]
    out = []
    for nd in graph.nodes:
        if nd.layer is None:
            out.append(nd.saved_bytes)
        else:
            out.append(min(nd.saved_bytes, _w_held_bytes(nd.layer, seq_len=graph.seq_len, micro_batch_size=graph.micro_batch_size,
                                                         dtype_bytes=db, tp=graph.tp, sequence_parallel=graph.sequence_parallel)))
    return tuple(out)


def stage_memory(graph: LayerGraph, start: int, end: int, *, in_flight: int, buffers: int = 1, recompute: bool = False,
                 optimizer: str = "adamw", dtype: str | None = None, momentum: bool = False,
                 autocast_copies: bool | None = None, precision: str | None = None, zero: int = 0,
                 dp: int = 1, recompute_mode: str = "full", recompute_layers: int = 0, wgrad_held: int = 0) -> StageMemory:
    """Peak bytes of a stage with ``in_flight`` micro-batches' activations alive at once.

    ``in_flight`` comes from the schedule (1F1B: min(p - s, m); GPipe: m). ``dtype`` defaults to
    the graph's (the activation bytes are those of the traced dtype and micro-batch size).
    ``autocast_copies`` adds autocast's per-micro-batch weight casts; by default (None) it is on for
    the ``amp-autocast`` precision (the default for bf16/fp16, as the executor runs it).
    ``precision``, ``zero`` and ``dp`` set the weights, gradients and optimizer state per
    parameter (:func:`pipetrain.sharding.model_state_bytes`); without ``precision`` the
    ``dtype``'s table above. With ``recompute``, ``recompute_mode`` "full" recomputes whole layers
    (the first ``recompute_layers`` of the stage, or all of them at 0; :func:`recompute_memory`)
    and "selective" the attention core of those layers (:func:`selective_dropped_bytes`; its
    working set is one layer's core; the planner makes every layer's). ``wgrad_held``: micro-batches between their I and W passes (a split
    backward), each holding what W needs (:func:`wgrad_held_bytes`), counted with the activations.
    """
    _check_range(graph, start, end)
    if recompute_mode not in ("full", "selective"):
        raise ConfigError(f"recompute_mode must be 'full' or 'selective', got {recompute_mode!r}")
    if in_flight < 1:
        raise ConfigError(f"in_flight must be >= 1, got {in_flight}")
    if buffers < 1:
        raise ConfigError(f"buffers must be >= 1, got {buffers}")
    params = sum(n.param_count for n in graph.nodes[start:end])
    tied = tied_extra_params(graph, start, end)
    weights: float
    grads: float
    opt: float
    tied_bytes: float
    if precision is None:
        per = bytes_per_param(dtype or graph.dtype, optimizer, momentum=momentum)
        weights, grads, opt = params * per.weights, params * per.grads, params * per.optimizer
        tied_bytes = tied * per.total
    else:
        st = model_state_bytes(params, zero=zero, dp=dp, precision=precision, optimizer=optimizer, momentum=momentum)
        weights, grads, opt = st.weights_bytes, st.grads_bytes, st.optimizer_bytes
        tied_bytes = model_state_bytes(tied, zero=zero, dp=dp, precision=precision, optimizer=optimizer, momentum=momentum).total_bytes
    saved = [float(n.saved_bytes) for n in graph.nodes]
    if autocast_copies is None:
        autocast_copies = (precision or precision_for_dtype(dtype or graph.dtype)) == "amp-autocast"
    if autocast_copies and (dtype or graph.dtype) != "fp32":
        saved = [s + 2.0 * c for s, c in zip(saved, autocast_cast_params_per_node(graph))]
    loss = loss_saved_bytes(graph) if end == graph.num_nodes else 0
    if recompute and recompute_mode == "selective":  # the first recompute_layers layers (0: all), as the executor's
        k = recomputed_layers(start, end, recompute_layers)
        dropped = selective_dropped_bytes(graph)[start:start + k]
        activation = in_flight * (sum(saved[start:end]) - sum(dropped) + loss)
        working = float(max(dropped))
    elif recompute:
        activation, working = recompute_memory(graph, start, end, in_flight=in_flight, per_node_saved=tuple(saved),
                                               layers=recompute_layers)
        activation += in_flight * loss  # the loss runs outside the checkpointed layers: kept per micro-batch
    else:
        activation, working = in_flight * (sum(saved[start:end]) + loss), 0.0
    if wgrad_held:
        activation += wgrad_held * sum(wgrad_held_bytes(graph)[start:end])
    recv = (buffers * graph.cut(start).bytes if start > 0 else 0) + stage_output_bytes(graph, end)
    return StageMemory(param_count=params, weights_bytes=_int(weights), grads_bytes=_int(grads), optimizer_bytes=_int(opt),
                       tied_bytes=_int(tied_bytes), activation_bytes=_int(activation), recompute_working_bytes=_int(working),
                       buffer_bytes=recv, in_flight=in_flight, recompute=recompute)


def _int(x: float) -> int:
    return int(round(x))


def check_stage_memory(mem: StageMemory, capacity_bytes: float, *, stage: int, device: str = "") -> None:
    """Raise :class:`InfeasibleError` when a stage does not fit its device, naming the fixes."""
    if mem.total_bytes <= capacity_bytes:
        return
    on = f" {device}" if device else ""
    fixes = "raise pp, lower micro-batch size" + ("" if mem.recompute else " or enable recompute")
    raise InfeasibleError(f"stage {stage} needs {mem.total_bytes / GiB:.1f} GiB ({mem.describe()}), "
                          f"device{on} has {capacity_bytes / GiB:.1f} GiB: {fixes}")
