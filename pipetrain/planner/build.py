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
from pipetrain.memory import (
    autocast_cast_params_per_node,
    bytes_per_param,
    loss_saved_bytes,
    node_input_bytes,
    selective_dropped_bytes,
    stage_input_bytes,
    wgrad_held_bytes,
)
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


def _running_max(x: np.ndarray, n: int) -> np.ndarray:
    """``out[i, j] = max(x[i:j])`` for ``i < j`` (0 elsewhere)."""
    out = np.zeros((n + 1, n + 1))
    for i in range(n):
        out[i, i + 1:] = np.maximum.accumulate(x[i:])
    return out


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
        self._times: dict[tuple[str, str], np.ndarray] = {}
        self._mems: dict[tuple[int, int, str, int], np.ndarray] = {}
        self._partial: dict[tuple[str, int, int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

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
        """Per micro-batch in flight, the layer inputs [i, j) keeps when recomputing layer by layer
        (+ the loss's on the last stage: it runs outside the checkpointed layers)."""
        a = additive_matrix(self.layer_inputs)
        a[:, self.n] += self.loss_bytes
        return a

    @cached_property
    def recompute_working(self) -> np.ndarray:
        """The largest single layer's saved bytes in [i, j): the working set of a per-layer recompute."""
        return _running_max(self.saved, self.n)

    @cached_property
    def selective_activations(self) -> np.ndarray:
        """Saved bytes of one micro-batch in [i, j) under selective recompute (+ the loss's)."""
        a = additive_matrix(self.saved - self.dropped)
        a[:, self.n] += self.loss_bytes
        return a

    @cached_property
    def dropped(self) -> np.ndarray:
        return np.array(selective_dropped_bytes(self.graph), dtype=float)

    @cached_property
    def selective_working(self) -> np.ndarray:
        """The largest single layer's attention core in [i, j): recomputed one layer at a time."""
        return _running_max(self.dropped, self.n)

    @cached_property
    def wgrad_held(self) -> np.ndarray:
        """Bytes one micro-batch holds in [i, j) between its I and its W (memory.wgrad_held_bytes)."""
        return additive_matrix(np.array(wgrad_held_bytes(self.graph), dtype=float))

    def time_matrix(self, dt: DeviceType, *, recompute: bool | str) -> np.ndarray:
        """Seconds of one micro-batch's F + B through [i, j) on ``dt``, + the recomputed forward:
        all of it (``recompute`` True or "full") or the attention cores ("selective")."""
        rec = "full" if recompute is True else (recompute or "none")
        key = (dt.name, rec)
        if key not in self._times:
            f, b, _ = self.node_times(dt)
            extra = {"none": 0.0, "full": f, "selective": f * np.asarray(self.core_share)}[rec]
            self._times[key] = additive_matrix(f + extra + b)
        return self._times[key]

    def memory_matrix(self, *, in_flight: int, buffers: int, recompute: bool | str, wgrad_held: int = 0) -> np.ndarray:
        """Peak bytes of [i, j) as a stage: equals ``memory.stage_memory(...).total_bytes`` (+
        ``wgrad_held`` micro-batches between I and W, a split backward's). Kept per arguments
        (read-only): the search asks for the same few in-flight counts thousands of times."""
        rec = "full" if recompute is True else (recompute or "none")
        key = (in_flight, buffers, rec, wgrad_held)
        if key not in self._mems:
            self._mems[key] = self._memory_matrix(in_flight=in_flight, buffers=buffers, recompute=rec, wgrad_held=wgrad_held)
            self._mems[key].setflags(write=False)
        return self._mems[key]

    def _memory_matrix(self, *, in_flight: int, buffers: int, recompute: str, wgrad_held: int) -> np.ndarray:
        if recompute == "full":  # memory.recompute_memory: every layer's input kept, one layer recomputed at a time
            act = in_flight * self.recompute_kept + self.recompute_working
        elif recompute == "selective":
            act = in_flight * self.selective_activations + self.selective_working
        else:
            act = in_flight * self.activations
        if wgrad_held:
            act = act + wgrad_held * self.wgrad_held
        return self.model_state + self._recv(buffers) + act

    def _recv(self, buffers: int) -> np.ndarray:
        return buffers * self.cut_bytes[:, None] + self.cut_bytes[None, :]

    def partial_recompute(self, dt: DeviceType, *, in_flight: int, buffers: int, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per range [i, j): the fewest leading layers ``k`` whose full recompute makes the stage
        fit ``cap`` (Megatron's ``--recompute-method block --recompute-num-layers k``: a stage
        recomputes its first k layers and keeps the rest), with that choice's time and memory
        matrices. Where no ``k`` fits, ``k = j - i`` (all; its memory then exceeds ``cap``).

        Memory falls as ``k`` grows (a layer's input is smaller than what it saves, from two
        micro-batches in flight up), so a vectorized bisection finds ``k``; the memory returned is
        that of the ``k`` found, so a range where the fall is not monotone is at worst reported as
        not fitting, never as fitting when it does not."""
        key = (dt.name, in_flight, buffers, cap)
        if key in self._partial:
            return self._partial[key]
        n = self.n
        i = np.arange(n + 1)[:, None]
        j = np.arange(n + 1)[None, :]
        length = np.maximum(j - i, 0)
        u = np.concatenate(([0.0], np.cumsum(self.layer_inputs)))
        sv = np.concatenate(([0.0], np.cumsum(self.saved)))
        runmax = _running_max(self.saved, n)  # runmax[a, e]: the largest saved bytes in [a, e)
        base = self.model_state + self._recv(buffers)
        last = j == n

        def memory(k: np.ndarray) -> np.ndarray:
            e = np.minimum(i + k, n)
            all_rec = e >= j
            kept = in_flight * (u[e] - u[i] + np.where(all_rec, 0.0, sv[np.maximum(j, e)] - sv[e]))
            work = runmax[i, e]
            return base + kept + work + np.where(last, in_flight * self.loss_bytes, 0.0)

        lo, hi = np.minimum(1, length), length.copy()
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            ok = memory(mid) <= cap
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid + 1)
        k = hi
        f, b, _ = self.node_times(dt)
        fp = np.concatenate(([0.0], np.cumsum(f)))
        t = self.time_matrix(dt, recompute=False) + np.where(length > 0, fp[np.minimum(i + k, n)] - fp[i], 0.0)
        out = (k, t, memory(k))
        for a in out:
            a.setflags(write=False)
        self._partial[key] = out
        return out


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
