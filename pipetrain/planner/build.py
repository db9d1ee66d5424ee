"""From a layer graph and a cost model to the planner's range matrices.

:class:`StageTables` precomputes, for one traced graph (one micro-batch size), everything the
inner partitioner needs as ``(n+1) x (n+1)`` range matrices (prefix sums; numpy):

* time of blocks ``[i, j)`` on a device type: ``F + B`` (+ ``F`` again when recomputing), the
  cost model's per-node times summed (:func:`pipetrain.costs.stage_from_node_times`);
* memory of blocks ``[i, j)`` as stage ``s`` with ``in_flight`` micro-batches and ``buffers``
  receive slots, term for term what :func:`pipetrain.memory.stage_memory` returns
  (a test checks equality on every range).

:func:`pipetrain.program.lower.sim_input` turns a chosen split into the simulator's input, whose
simulated peak memory per stage equals the memory model's. Torch-free.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from pipetrain.costs import CostModel
from pipetrain.graph import LayerGraph
from pipetrain.memory import autocast_cast_params_per_node, bytes_per_param, loss_saved_bytes, stage_input_bytes
from pipetrain.planner.partition import additive_matrix
from pipetrain.program.lower import Placement, StageCosts
from pipetrain.topology import DeviceType, Topology

__all__ = ["StageTables", "rank_caps", "cut_bytes"]


def cut_bytes(graph: LayerGraph) -> tuple[np.ndarray, tuple[int, ...]]:
    """Bytes crossing every cut position 0..n (0 at the ends) and the legal cut positions.

    The same as ``graph.cut(k).bytes`` for every k (a test checks it) in one pass over the
    edges: source ``u`` crosses the cuts ``u+1 .. (its last consumer)``, once however many
    consumers it has.
    """
    n = graph.num_nodes
    last: dict[int, int] = {}
    for e in graph.edges:
        last[e.src] = max(last.get(e.src, e.src), e.dst)
    diff = np.zeros(n + 2)
    crossing = np.zeros(n + 2, dtype=int)
    for u, v in last.items():
        diff[u + 1] += graph.nodes[u].output_bytes
        diff[v + 1] -= graph.nodes[u].output_bytes
        crossing[u + 1] += 1
        crossing[v + 1] -= 1
    out = np.cumsum(diff)[: n + 1]
    count = np.cumsum(crossing)[: n + 1]
    out[0] = out[n] = 0.0
    return out, tuple(k for k in range(1, n) if count[k] > 0)


class StageTables(StageCosts):
    """Range matrices of one graph for the partitioner (see module docstring)."""

    def __init__(self, graph: LayerGraph, cost: CostModel | None = None, *, optimizer: str = "adamw") -> None:
        super().__init__(graph, cost, optimizer=optimizer)
        self.n = graph.num_nodes
        self.per_param = bytes_per_param(graph.dtype, optimizer)
        self.params = np.array([nd.param_count for nd in graph.nodes], dtype=float)
        self.saved = np.array([nd.saved_bytes for nd in graph.nodes], dtype=float)
        if graph.dtype != "fp32":  # the executor runs half precision as autocast: + each matmul's weight cast
            self.saved += 2.0 * np.array(autocast_cast_params_per_node(graph), dtype=float)
        self.cut_bytes, self.legal_cuts = cut_bytes(graph)
        self.input_bytes = self.cut_bytes.copy()
        self.input_bytes[0] = float(stage_input_bytes(graph, 0))
        self.loss_bytes = float(loss_saved_bytes(graph))
        self._times: dict[tuple[str, bool], np.ndarray] = {}

    @cached_property
    def _tied_params(self) -> np.ndarray:
        """Parameters of tied weights used in [i, j) but owned outside it."""
        n = self.n
        out = np.zeros((n + 1, n + 1))
        i = np.arange(n + 1)[:, None]
        j = np.arange(n + 1)[None, :]
        for t in self.graph.tied:
            owner_in = (i <= t.owner) & (t.owner < j)
            user_in = np.zeros((n + 1, n + 1), dtype=bool)
            for u in t.users:
                user_in |= (i <= u) & (u < j)
            out += np.where(~owner_in & user_in, float(t.param_count), 0.0)
        return out

    @cached_property
    def model_state(self) -> np.ndarray:
        """Weights + grads + optimizer state (+ tied copies) of [i, j), bytes."""
        return additive_matrix(self.params, scale=self.per_param.total) + self._tied_params * self.per_param.total

    @cached_property
    def activations(self) -> np.ndarray:
        """Saved-for-backward bytes of one micro-batch in [i, j) (+ the loss's on the last stage)."""
        a = additive_matrix(self.saved)
        a[:, self.n] += self.loss_bytes
        return a

    @cached_property
    def stage_params(self) -> np.ndarray:
        return additive_matrix(self.params)

    def time_matrix(self, dt: DeviceType, *, recompute: bool) -> np.ndarray:
        """Seconds of one micro-batch's F + B (+ recompute F) through [i, j) on ``dt``."""
        key = (dt.name, recompute)
        if key not in self._times:
            f, b, _ = self.node_times(dt)
            self._times[key] = additive_matrix(f * (2.0 if recompute else 1.0) + b)
        return self._times[key]

    def memory_matrix(self, *, in_flight: int, buffers: int, recompute: bool) -> np.ndarray:
        """Peak bytes of [i, j) as a stage: equals ``memory.stage_memory(...).total_bytes``."""
        recv = buffers * self.cut_bytes[:, None] + self.cut_bytes[None, :]
        if recompute:
            act = in_flight * self.input_bytes[:, None] + self.activations
        else:
            act = in_flight * self.activations
        return self.model_state + act + recv


def rank_caps(topology: Topology, place: Placement, *, max_memory_bytes: float | None = None,
              max_memory_fraction: float | None = None) -> list[float]:
    """Memory cap per pipeline rank: the smallest device among its replicas, after the user's limit."""
    caps = []
    for r in range(place.pp):
        cap = min(d.type.memory_bytes for d in place.rank_devices(topology, r))
        if max_memory_fraction is not None:
            cap *= max_memory_fraction
        if max_memory_bytes is not None:
            cap = min(cap, max_memory_bytes)
        caps.append(float(cap))
    return caps
