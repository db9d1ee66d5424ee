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
from pipetrain.hardware import default_memory_reserve_bytes
from pipetrain.memory import autocast_cast_params_per_node, bytes_per_param, loss_saved_bytes, node_input_bytes, stage_input_bytes
from pipetrain.planner.partition import additive_matrix
from pipetrain.program.lower import Placement, StageCosts
from pipetrain.program.spec import Link
from pipetrain.sharding import model_state_bytes, precision_for_dtype
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

    def __init__(self, graph: LayerGraph, cost: CostModel | None = None, *, optimizer: str = "adamw", precision: str | None = None,
                 zero: int = 0, dp: int = 1, tp_link: Link | None = None) -> None:
        super().__init__(graph, cost, optimizer=optimizer, tp_link=tp_link, precision=precision, zero=zero, dp=dp)
        self.n = graph.num_nodes
        if precision is None:
            self.state_per_param = float(bytes_per_param(graph.dtype, optimizer).total)
        else:  # ZeRO's sharded state over dp (sharding.model_state_bytes is linear in the parameters)
            self.state_per_param = model_state_bytes(1.0, zero=zero, dp=dp, precision=precision, optimizer=optimizer).total_bytes
        self.params = np.array([nd.param_count for nd in graph.nodes], dtype=float)
        self.saved = np.array([nd.saved_bytes for nd in graph.nodes], dtype=float)
        if graph.dtype != "fp32" and (precision or precision_for_dtype(graph.dtype)) == "amp-autocast":
            # autocast over fp32 weights (the executor's way): + each matmul's weight cast per micro-batch
            self.saved += 2.0 * np.array(autocast_cast_params_per_node(graph), dtype=float)
        self.layer_inputs = np.array(node_input_bytes(graph), dtype=float)
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
        return additive_matrix(self.params, scale=self.state_per_param) + self._tied_params * self.state_per_param

    @cached_property
    def activations(self) -> np.ndarray:
        """Saved-for-backward bytes of one micro-batch in [i, j) (+ the loss's on the last stage)."""
        a = additive_matrix(self.saved)
        a[:, self.n] += self.loss_bytes
        return a

    @cached_property
    def stage_params(self) -> np.ndarray:
        return additive_matrix(self.params)

    @cached_property
    def recompute_kept(self) -> np.ndarray:
        """Per micro-batch in flight, the layer inputs [i, j) keeps when recomputing layer by layer."""
        return additive_matrix(self.layer_inputs)

    @cached_property
    def recompute_working(self) -> np.ndarray:
        """The largest single layer's saved bytes in [i, j): the working set of a per-layer recompute
        (+ the loss's on the last stage)."""
        n = self.n
        out = np.zeros((n + 1, n + 1))
        for i in range(n):
            out[i, i + 1:] = np.maximum.accumulate(self.saved[i:])
        out[:, n] += self.loss_bytes
        return out

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
        if recompute:  # memory.recompute_memory: every layer's input kept, one layer recomputed at a time
            act = in_flight * self.recompute_kept + self.recompute_working
        else:
            act = in_flight * self.activations
        return self.model_state + act + recv


def rank_caps(topology: Topology, place: Placement, *, max_memory_bytes: float | None = None,
              max_memory_fraction: float | None = None, reserve_bytes: float | None = None) -> list[float]:
    """Memory cap per pipeline rank: the smallest device among its replicas, less the reserve
    (``reserve_bytes``, default :func:`pipetrain.hardware.default_memory_reserve_bytes`), after
    the user's limit."""
    caps = []
    for r in range(place.pp):
        devs = place.rank_devices(topology, r)
        cap = min(d.type.memory_bytes - (default_memory_reserve_bytes(d.type) if reserve_bytes is None else reserve_bytes)
                  for d in devs)
        if max_memory_fraction is not None:
            cap = min(cap, min(d.type.memory_bytes for d in devs) * max_memory_fraction)
        if max_memory_bytes is not None:
            cap = min(cap, max_memory_bytes)
        caps.append(float(max(0.0, cap)))
    return caps
