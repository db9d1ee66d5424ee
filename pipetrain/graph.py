"""The layer graph: a model as a networkx DiGraph with costs per node, torch-free.

Nodes are blocks (embedding, transformer block, head, ...) or, at op granularity, single
ops, listed in topological order. Each carries forward/backward FLOPs, parameter bytes,
output activation bytes and the bytes saved for backward, for the micro-batch size,
sequence length and dtype the graph was traced at (``pipetrain.planner.trace`` builds it
with torch; this module only reads and writes it).

A *cut* at position ``k`` splits the nodes into ``nodes[:k]`` and ``nodes[k:]``. The tensors
that cross it are the distinct sources of the DAG edges from the first part into the second,
so a cut inside a residual block carries both the branch and the skip tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx

from pipetrain.errors import ConfigError
from pipetrain.serde import from_dict, parse_json, read_text_or_error, to_dict, write_text_atomic

__all__ = ["GRAPH_SCHEMA_VERSION", "ATTENTION_KINDS", "NORM_KINDS", "LayerShape", "Node", "Edge", "TiedParam", "CutTensor", "Cut",
           "LayerGraph", "structure_fingerprint"]

GRAPH_SCHEMA_VERSION = 1

#: How a transformer layer's attention keeps its scores: ``flash`` (FlashAttention: only the
#: output and log-sum-exp; Dao et al. 2022) or ``math`` (the s x s scores and softmax stored).
ATTENTION_KINDS = ("flash", "math")
#: A transformer layer's normalization: ``layernorm`` (Ba et al. 2016: saves its input and an fp32
#: mean and rstd per token) or ``rmsnorm`` (Zhang & Sennrich 2019, written out as in Llama: saves its
#: input, the rstd and the normalized input); see ``pipetrain.activations``.
NORM_KINDS = ("layernorm", "rmsnorm")


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """The shape of one transformer layer, which tensor parallelism and the shape-aware GEMM
    model need and FLOP counts alone do not give (Megatron-LM: Shoeybi et al. 2019; Narayanan
    et al. 2021). A block declares it as its ``layer_shape`` attribute; tracing copies it."""

    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    gated_mlp: bool = False  # SwiGLU: three ffn matrices, not two
    attention: str = "flash"
    dropout: bool = False
    causal: bool = True
    norm: str = "layernorm"
    rotary: bool = False  # rotary position embedding applied to q and k (RoFormer; Llama)

    def __post_init__(self) -> None:
        if min(self.hidden, self.heads, self.kv_heads, self.ffn_hidden) < 1:
            raise ConfigError(f"layer shape {self}: sizes must be >= 1")
        if self.heads % self.kv_heads or self.hidden % self.heads:
            raise ConfigError(f"layer shape {self}: heads must divide hidden and kv_heads must divide heads")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"layer shape: attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.norm not in NORM_KINDS:
            raise ConfigError(f"layer shape: norm must be one of {NORM_KINDS}, got {self.norm!r}")


@dataclass(frozen=True, kw_only=True)
class Node:
    """One block (or op) and its costs for one micro-batch."""

    name: str
    kind: str
    fwd_flops: float
    bwd_flops: float
    wgrad_flops: float = 0.0  # the part of bwd_flops that computes weight gradients
    param_count: int = 0  # own parameters; a tied parameter counts at its owner only
    param_bytes: int = 0
    output_bytes: int = 0
    output_shape: tuple[int, ...] = ()
    output_dtype: str = "float32"
    saved_bytes: int = 0  # bytes autograd saves for backward during this node's forward
    layer: LayerShape | None = None  # a transformer layer's shape, where the block declares one

    def __post_init__(self) -> None:
        for f in ("fwd_flops", "bwd_flops", "wgrad_flops", "param_count", "param_bytes", "output_bytes", "saved_bytes"):
            if getattr(self, f) < 0:
                raise ConfigError(f"node {self.name!r}: {f} must be >= 0, got {getattr(self, f)}")


@dataclass(frozen=True, kw_only=True)
class Edge:
    """Node ``src``'s output feeds node ``dst`` (indices into ``LayerGraph.nodes``)."""

    src: int
    dst: int


@dataclass(frozen=True, kw_only=True)
class TiedParam:
    """A parameter shared by several nodes (e.g. GPT-2's embedding and head)."""

    name: str
    owner: int
    users: tuple[int, ...]
    param_count: int
    param_bytes: int


@dataclass(frozen=True, kw_only=True)
class CutTensor:
    src: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class Cut:
    """Cut at ``position``: nodes ``[:position]`` before, ``[position:]`` after."""

    position: int
    tensors: tuple[CutTensor, ...]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)


def structure_fingerprint(model: str, nodes: Iterable[tuple[str, str, int]], edges: Iterable[tuple[int, int]],
                          tied: Iterable[tuple[str, int, tuple[int, ...]]] = ()) -> str:
    """Stable hash of a model's structure: names, kinds, parameter counts, edges, ties.

    Independent of micro-batch size, sequence length and dtype, so the executor can check
    a plan against a model it builds without tracing FLOPs.
    """
    payload = {"model": model, "nodes": [list(n) for n in nodes], "edges": sorted([list(e) for e in edges]),
               "tied": [[t[0], t[1], list(t[2])] for t in tied]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class LayerGraph:
    model: str
    granularity: str  # "block" or "op"
    micro_batch_size: int
    seq_len: int
    dtype: str  # "fp32" | "bf16" | "fp16"
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    input_shape: tuple[int, ...] = ()
    input_dtype: str = "int64"
    tied: tuple[TiedParam, ...] = ()
    # A graph can be one tensor-parallel rank's view of a model (``pipetrain.program.shard``):
    # its nodes hold that rank's FLOPs, parameters and saved bytes; plans still name the whole
    # model, whose fingerprint ``model_fingerprint`` keeps.
    tp: int = 1
    sequence_parallel: bool = False
    model_fingerprint: str = ""
    schema_version: int = GRAPH_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.tp < 1 or (self.sequence_parallel and self.tp == 1):
            raise ConfigError(f"graph tp must be >= 1 and sequence_parallel needs tp > 1, got tp={self.tp}")
        if self.granularity not in ("block", "op"):
            raise ConfigError(f"graph granularity must be 'block' or 'op', got {self.granularity!r}")
        if not self.nodes:
            raise ConfigError("a layer graph needs at least one node")
        n = len(self.nodes)
        for e in self.edges:
            if not (0 <= e.src < e.dst < n):
                raise ConfigError(f"edge {e.src}->{e.dst} is not forward in topological order over {n} nodes")

    # ----- structure ---------------------------------------------------------------
    @cached_property
    def digraph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        for i, node in enumerate(self.nodes):
            g.add_node(i, **to_dict(node))
        g.add_edges_from((e.src, e.dst) for e in self.edges)
        return g

    @cached_property
    def fingerprint(self) -> str:
        if self.model_fingerprint:
            return self.model_fingerprint
        return structure_fingerprint(
            self.model, ((n.name, n.kind, n.param_count) for n in self.nodes),
            ((e.src, e.dst) for e in self.edges), ((t.name, t.owner, t.users) for t in self.tied))

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def param_count(self) -> int:
        """Total parameters, tied parameters counted once."""
        return sum(n.param_count for n in self.nodes)

    @property
    def param_bytes(self) -> int:
        return sum(n.param_bytes for n in self.nodes)

    @property
    def fwd_flops(self) -> float:
        return sum(n.fwd_flops for n in self.nodes)

    @property
    def bwd_flops(self) -> float:
        return sum(n.bwd_flops for n in self.nodes)

    def cut(self, position: int) -> Cut:
        """The tensors crossing a cut before node ``position`` (1 <= position < n)."""
        n = len(self.nodes)
        if not 1 <= position < n:
            raise ConfigError(f"cut position {position} is out of range 1..{n - 1}")
        return self._cut_table[position - 1]

    @cached_property
    def _cut_table(self) -> tuple[Cut, ...]:
        """The cut before every position 1..n-1, in one sweep over the edges (the planner and the
        lowering ask for cuts hundreds of thousands of times): an edge u -> v crosses the cuts
        before u+1 .. v."""
        n = len(self.nodes)
        sources: list[set[int]] = [set() for _ in range(n)]
        for e in self.edges:
            for pos in range(e.src + 1, min(e.dst, n - 1) + 1):
                sources[pos].add(e.src)
        return tuple(Cut(position=k, tensors=tuple(
            CutTensor(src=u, name=self.nodes[u].name, shape=self.nodes[u].output_shape,
                      dtype=self.nodes[u].output_dtype, bytes=self.nodes[u].output_bytes)
            for u in sorted(sources[k]))) for k in range(1, n))

    @cached_property
    def cuts(self) -> tuple[Cut, ...]:
        """Every legal cut position in topological order (those some tensor crosses)."""
        return tuple(c for c in self._cut_table if c.tensors)

    def tied_extra_bytes(self, start: int, end: int) -> int:
        """Bytes of tied parameters used in nodes [start, end) but owned outside it.

        A stage holding GPT-2's head but not the embedding keeps its own copy of the weight.
        """
        extra = 0
        for t in self.tied:
            if not (start <= t.owner < end) and any(start <= u < end for u in t.users):
                extra += t.param_bytes
        return extra

    # ----- JSON --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, data: Any) -> LayerGraph:
        if not isinstance(data, dict):
            raise ConfigError("layer graph JSON must be a mapping")
        data = dict(data)
        stored = data.pop("fingerprint", None)
        if data.get("schema_version", GRAPH_SCHEMA_VERSION) != GRAPH_SCHEMA_VERSION:
            raise ConfigError(f"layer graph schema_version {data.get('schema_version')!r} is not supported; re-run `pipetrain graph --json`")
        g = from_dict(cls, data, where="graph")
        if stored is not None and stored != g.fingerprint:
            raise ConfigError("layer graph JSON was edited: its fingerprint does not match its contents; re-run `pipetrain graph --json`")
        return g

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LayerGraph:
        return cls.from_dict(parse_json(text, what="layer graph file"))

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LayerGraph:
        return cls.from_json(read_text_or_error(path, what="layer graph",
                                                hint=f"write one with `pipetrain graph MODEL --json {Path(path).name}`"))
