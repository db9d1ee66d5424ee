"""One tensor-parallel rank's view of a layer graph, torch-free.

Megatron-style tensor parallelism (Shoeybi et al. 2019, sec. 3) splits each transformer layer's
attention heads and MLP columns over ``tp`` GPUs of a node: the QKV and up projections are
column-parallel, the attention output and down projections row-parallel, so a rank holds 1/tp of
the layer's weight matrices and does 1/tp of its FLOPs. The vocabulary-parallel embedding and
head split their vocabulary the same way (Narayanan et al. 2021, sec. 2.3). What the rank keeps
for backward follows Korthikanti et al. 2023 ("Reducing Activation Recomputation in Large
Transformer Models", sec. 4): the tensors inside the attention and MLP regions are split over
tp, while the LayerNorm regions -- the norms' inputs and outputs, the dropout masks after the
projections -- stay whole on every rank unless sequence parallelism splits them along the
sequence (:mod:`pipetrain.activations` holds the per-term model).

:func:`shard_graph` returns that view as a :class:`~pipetrain.graph.LayerGraph` with the rank's
FLOPs, parameters and saved bytes per node, so the memory model, the cost model and the
partitioner price a tp plan with no other change; the tensor-parallel collectives are priced by
:func:`tp_comm_times_s`. Plans still name the whole model: the view keeps its fingerprint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from pipetrain.activations import layer_activation_bytes
from pipetrain.errors import InfeasibleError
from pipetrain.graph import LayerGraph, Node
from pipetrain.sharding import AlphaBeta, CollectiveFit, collective_time_s, tp_collectives_per_layer, tp_collectives_vocab

__all__ = ["shard_graph", "tp_block", "tp_comm_times_s"]

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Node kinds split over the vocabulary (Megatron's VocabParallelEmbedding and its parallel head).
_VOCAB_PARALLEL = ("embedding", "head")


def tp_block(graph: LayerGraph, tp: int) -> str | None:
    """Why ``graph`` cannot run at tensor-parallel degree ``tp``, or None when it can."""
    if tp == 1:
        return None
    layers = [n for n in graph.nodes if n.kind == "transformer"]
    if not layers:
        return f"model {graph.model} has no transformer layers to split over tp={tp}"
    for n in graph.nodes:
        if n.kind == "transformer" and n.layer is None:
            return f"block {n.name} of {graph.model} does not declare its layer shape, so it cannot be split over tp"
        if n.kind not in ("transformer", *_VOCAB_PARALLEL) and n.param_count > 0:
            return f"block {n.name} ({n.kind}) of {graph.model} has no tensor-parallel split"
        if n.layer is not None and (n.layer.heads % tp or n.layer.ffn_hidden % tp):
            return f"tp={tp} does not divide {n.name}'s {n.layer.heads} heads and {n.layer.ffn_hidden} MLP columns"
    return None


def _shard_node(node: Node, tp: int, sp: bool, graph: LayerGraph, dtype_bytes: int) -> Node:
    if node.layer is None:
        if node.kind not in _VOCAB_PARALLEL:
            return node
        # what an embedding or head saves is token ids or hidden-sized (a norm's input, the projection's
        # input, BERT's MLM transform), never vocabulary-sized: whole on every rank without sp, the norm
        # region on sequence shards with it (taken as 1/tp). The vocabulary-sized log-softmax is the
        # loss's (memory.loss_saved_bytes, 1/tp under loss_parallel)
        return replace(node, fwd_flops=node.fwd_flops / tp, bwd_flops=node.bwd_flops / tp, wgrad_flops=node.wgrad_flops / tp,
                       param_count=node.param_count // tp, param_bytes=node.param_bytes // tp,
                       saved_bytes=node.saved_bytes // tp if sp else node.saved_bytes,
                       output_bytes=node.output_bytes // tp if sp else node.output_bytes)
    # The activation model's change from tp=1 to this tp, applied to the traced bytes: exact where the
    # model equals the trace (tests/test_activations.py checks the zoo's blocks), and it keeps what
    # the model does not name. With sp the column-parallel linears keep the all-gathered norm
    # outputs, as DTensor's SequenceParallel does (activations.layer_activation_terms).
    s, b = graph.seq_len, graph.micro_batch_size
    whole = layer_activation_bytes(node.layer, seq_len=s, micro_batch_size=b, dtype_bytes=dtype_bytes)
    part = layer_activation_bytes(node.layer, seq_len=s, micro_batch_size=b, dtype_bytes=dtype_bytes, tp=tp, sequence_parallel=sp)
    saved = max(0, node.saved_bytes - whole + part)
    return replace(node, fwd_flops=node.fwd_flops / tp, bwd_flops=node.bwd_flops / tp, wgrad_flops=node.wgrad_flops / tp,
                   # the norms' weights stay whole on every rank (a few h per layer): 1/tp is exact to <0.1%
                   param_count=node.param_count // tp, param_bytes=node.param_bytes // tp, saved_bytes=saved,
                   output_bytes=node.output_bytes // tp if sp else node.output_bytes)


def shard_graph(graph: LayerGraph, tp: int, *, sequence_parallel: bool = False) -> LayerGraph:
    """The view of ``graph`` on one of ``tp`` tensor-parallel ranks (module docstring).

    With ``sequence_parallel`` the tensors between layers, and so between stages, are split along
    the sequence too (Korthikanti et al. 2023, sec. 4.2.2)."""
    if tp == 1 and not sequence_parallel:
        return graph
    if graph.tp != 1:
        raise InfeasibleError(f"graph of {graph.model} is already a tp={graph.tp} view")
    why = tp_block(graph, tp)
    if why is not None:
        raise InfeasibleError(why)
    db = _DTYPE_BYTES.get(graph.dtype, 4)
    nodes = tuple(_shard_node(n, tp, sequence_parallel, graph, db) for n in graph.nodes)
    tied = tuple(replace(t, param_count=t.param_count // tp, param_bytes=t.param_bytes // tp) for t in graph.tied)
    return replace(graph, nodes=nodes, tied=tied, tp=tp, sequence_parallel=sequence_parallel, model_fingerprint=graph.fingerprint)


def tp_comm_times_s(graph: LayerGraph, link: AlphaBeta | None, fits: Sequence[CollectiveFit] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Per node, the seconds of its tensor-parallel collectives in forward and in backward on the
    node's ``link`` (Megatron's count: two all-reduces of b*s*h forward and two backward per
    layer, or the same volume as all-gather plus reduce-scatter with sequence parallelism;
    :func:`pipetrain.sharding.tp_collectives_per_layer`; and the vocabulary-parallel embedding's,
    head's and cross-entropy's, :func:`pipetrain.sharding.tp_collectives_vocab`). They run on the compute stream, on the
    critical path, as Megatron runs them without overlap. ``fits``: collectives a calibration
    measured (:func:`pipetrain.sharding.collective_time_s` prices with them where they match)."""
    n = graph.num_nodes
    fwd, bwd = np.zeros(n), np.zeros(n)
    if graph.tp == 1 or link is None:
        return fwd, bwd
    db = _DTYPE_BYTES.get(graph.dtype, 4)
    hidden = next((nd.layer.hidden for nd in graph.nodes if nd.layer is not None), 0)
    for i, node in enumerate(graph.nodes):
        b, s, tp, sp = graph.micro_batch_size, graph.seq_len, graph.tp, graph.sequence_parallel
        if node.layer is not None:
            cs = tp_collectives_per_layer(micro_batch_size=b, seq_len=s, hidden=node.layer.hidden, tp=tp, sequence_parallel=sp, dtype_bytes=db)
        elif node.kind in _VOCAB_PARALLEL and hidden:
            cs = tp_collectives_vocab(node.kind, micro_batch_size=b, seq_len=s, hidden=hidden, tp=tp, sequence_parallel=sp, dtype_bytes=db)
        else:
            continue
        for c in cs:
            t = collective_time_s(c.kind, c.nbytes, graph.tp, link, fits)
            if c.phase == "F":
                fwd[i] += t
            else:
                bwd[i] += t
    return fwd, bwd
