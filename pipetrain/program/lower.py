"""The one lowering of a plan: schedule, communication, receive posts and the simulator's input.

:func:`lower` turns a :class:`~pipetrain.plan.Plan` (with its layer graph, a topology and a cost
model) into a :class:`Program`. The planner, ``pipetrain simulate``, the run's fidelity check and
the executor all take what they run from it, so what is simulated is what is run:

* the schedule, with the SEND/RECV actions of :func:`pipetrain.schedules.with_comms`;
* per pipeline rank, the operations in the order the executor issues them (:func:`lower_ops`):
  each compute action, each SEND right after the compute that produced its tensor, each RECV's
  *wait* right before the compute that reads it, and each RECV's *post*, as early as the
  stage's receive-buffer pool allows (prefetch);
* the simulator's input (:func:`sim_input`): per-stage costs from the cost model, boundaries on
  the topology's links, compute groups for ranks that share cores, data parallelism.

Receive prefetching (the rule the executor follows, defined here once): stage ``s`` owns a pool
of input-activation slots and one of output-gradient slots (:func:`pipetrain.program.catalog.pool_sizes`).
Receives are posted into a pool in the order the stage's compute actions need them, whenever a
slot is free: at the start of the step, and after each compute action (the only points where a
slot is given back). An activation slot is given back when its micro-batch no longer needs its
input (after its full B, or after its W when its backward is split into I and W); a gradient slot right after the B that
read it (B or I). Within one posting point, activation receives go first, stage by stage, then gradient
receives.

``as_executed`` picks which of two views of the same plan the simulator input takes:

* ``False`` (planning): memory held as the memory model plans it (with a split backward, the
  peak F..B plus the peak B..W), data-parallel all-reduce as the plan's cost model prices it;
* ``True`` (as pipetrain's executor runs it): receive buffers held as the schedule peaks, the
  global-norm clip barrier before the optimizer steps, all-reduce after the last backward (not
  overlapped), CPU ranks time-sliced on their node's cores, and the executor's measured per-step
  work when the cost model carries it (a calibration).

Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from pipetrain.costs import AnalyticCostModel, CostModel, NodeTimes, StageCost, attention_core_share, stage_from_node_times
from pipetrain.errors import InfeasibleError, PlanError, ScheduleError
from pipetrain.graph import LayerGraph
from pipetrain.memory import StageMemory, recomputed_layers, stage_memory, stage_output_bytes, wgrad_held_bytes
from pipetrain.plan import Plan
from pipetrain.program.catalog import held_in_flight, pool_sizes
from pipetrain.program.shard import shard_graph, tp_comm_times_s
from pipetrain.program.spec import POST, RUN, BoundarySpec, ComputeGroup, DataParallelSpec, Link, Op, SimInput, StageSpec, TieSpec
from pipetrain.schedules import Action, Schedule, make_schedule, peak_in_flight, peak_pending_wgrad
from pipetrain.sharding import CollectiveFit, dp_allreduce_bytes_per_param
from pipetrain.topology import Device, DeviceType, Topology

__all__ = ["POST", "RUN", "Op", "Program", "StageCosts", "Placement", "placement", "rank_device_type", "compute_groups",
           "sim_input", "lower_ops", "lower", "lower_schedule", "tp_link", "dp_link", "plan_stage_memory", "measured_collectives"]

#: Gradients are all-reduced in fp32 whatever the training dtype: pipetrain's executor keeps fp32
#: master weights under autocast and reduces one flat fp32 buffer per stage after the pipeline
#: flush (hence no overlap by default), as Megatron-LM does with its default
#: ``accumulate_allreduce_grads_in_fp32`` for bf16 (Narayanan et al. 2021).
_ALLREDUCE_BYTES_PER_PARAM = 4

@dataclass(frozen=True, kw_only=True)
class Program:
    """A lowered plan: the schedule, each rank's operations, and (with a cost model) the simulator input."""

    schedule: Schedule
    ops: tuple[tuple[Op, ...], ...]
    act_slots: tuple[int, ...]
    grad_slots: tuple[int, ...]
    sim_input: SimInput | None = None

    def rank_ops(self, rank: int) -> tuple[Op, ...]:
        return self.ops[rank]

    def comm_order(self, rank: int) -> tuple[str, ...]:
        """The rank's communication as the executor issues it: ``post:sRECV_Xk``, ``sRECV_Xk`` (its
        wait) and ``sSEND_Xk`` (its post), in order. Telemetry records the same strings."""
        return tuple(str(op) for op in self.ops[rank] if op.verb == POST or not op.action.is_compute)

    def to_strings(self) -> list[list[str]]:
        return [[str(op) for op in ops] for ops in self.ops]


def lower_ops(schedule: Schedule, act_slots: Sequence[int], grad_slots: Sequence[int]) -> tuple[tuple[Op, ...], ...]:
    """Each rank's operations with its receive posts placed by the prefetch rule (module docstring).

    Raises :class:`ScheduleError` when a RECV would be waited on before a slot was free to post it
    (a pool smaller than what the schedule keeps in flight).
    """
    return tuple(_lower_rank(schedule, r, acts, act_slots, grad_slots) for r, acts in enumerate(schedule.actions))


def _lower_rank(schedule: Schedule, r: int, acts: Sequence[Action], act_slots: Sequence[int], grad_slots: Sequence[int]) -> tuple[Op, ...]:
    """Rank ``r``'s operations (:func:`lower_ops`)."""
    recv_f = {s: [a for a in acts if a.kind == "RECV_F" and a.stage == s] for s in schedule.stages_of(r)}
    recv_b = {s: [a for a in acts if a.kind == "RECV_B" and a.stage == s] for s in schedule.stages_of(r)}
    queues = [(recv_f, act_slots, 0), (recv_b, grad_slots, 1)]
    free = {(s, d): int(slots[s]) for _, slots, d in queues for s in schedule.stages_of(r)}
    nxt = {(s, d): 0 for (s, d) in free}
    holding: set[tuple[int, int, int]] = set()
    posted: set[Action] = set()
    ops: list[Op] = []

    def post_all() -> None:
        for by_stage, _, d in queues:
            for s, recvs in by_stage.items():
                while nxt[(s, d)] < len(recvs) and free[(s, d)] > 0:
                    a = recvs[nxt[(s, d)]]
                    nxt[(s, d)] += 1
                    free[(s, d)] -= 1
                    holding.add((s, d, a.microbatch))
                    posted.add(a)
                    ops.append(Op(POST, a))

    post_all()
    for a in acts:
        if a.kind in ("RECV_F", "RECV_B") and a not in posted:
            raise ScheduleError(f"rank {r}: {a} is needed before a receive buffer of stage {a.stage} is free: the stage keeps "
                                f"more micro-batches in flight than its buffers; raise the plan's buffers for stage {a.stage}")
        ops.append(Op(RUN, a))
        if not a.is_compute:
            continue
        s, k = a.stage, a.microbatch
        if a.kind in ("B", "I") and (s, 1, k) in holding:
            holding.discard((s, 1, k))
            free[(s, 1)] += 1
        if a.kind in ("B", "W") and (s, 0, k) in holding:
            holding.discard((s, 0, k))
            free[(s, 0)] += 1
        post_all()
    return tuple(ops)


def lower_schedule(schedule: Schedule, buffers: Sequence[int]) -> Program:
    """The program of a bare schedule (no costs): its operations under the executor's buffer pools."""
    act, grad = pool_sizes(schedule, list(buffers))
    return Program(schedule=schedule, ops=lower_ops(schedule, act, grad), act_slots=act, grad_slots=grad)


# ----- costs per stage ---------------------------------------------------------------------------
class StageCosts:
    """A graph's per-node times under a cost model, cached per device type, summed per stage."""

    def __init__(self, graph: LayerGraph, cost: CostModel | None = None, *, optimizer: str = "adamw",
                 tp_link: Link | None = None, precision: str | None = None, zero: int = 0, dp: int = 1,
                 tp_fits: Sequence[CollectiveFit] | None = None) -> None:
        self.graph = graph
        self.cost: Any = cost or AnalyticCostModel()
        self.optimizer = optimizer
        self.tp_link = tp_link  # the tensor-parallel group's link, for a tp > 1 view of the model
        # the tp group's collectives as a calibration measured them (empty: the ring on tp_link; None:
        # the cost model's for the device type, as for a group inside one node, where placement puts it)
        self.tp_fits = None if tp_fits is None else tuple(tp_fits)
        self._tp_comms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # how the model state is kept: None is the graph dtype's default table (memory.bytes_per_param)
        self.precision, self.zero, self.dp = precision, zero, dp
        self._node_times: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def node_times(self, dt: DeviceType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per node: forward, backward and weight-gradient seconds of one micro-batch on ``dt``,
        the tensor-parallel collectives included (in F and in the input-gradient part of B)."""
        if dt.name not in self._node_times:
            f, b, w = _node_times(self.cost, self.graph, dt)
            cf, cb = self._tp_comm(dt)
            self._node_times[dt.name] = (f + cf, b + cb, w)
        return self._node_times[dt.name]

    @cached_property
    def core_share(self) -> tuple[float, ...]:
        """Per node, the share of its forward that selective recompute repeats."""
        return attention_core_share(self.graph)

    def _tp_comm(self, dt: DeviceType) -> tuple[np.ndarray, np.ndarray]:
        """Per node, the tp collectives' seconds in F and in B on ``dt`` (once per device type: the
        planner asks for every stage it screens)."""
        if dt.name not in self._tp_comms:
            measured = getattr(self.cost, "tp_comm_per_layer_s", None)
            per_layer = measured(self.graph, dt) if measured is not None and self.graph.tp > 1 else None
            if per_layer is not None:  # the calibration's tp run timed this model's collectives in place
                on = np.array([1.0 if n.layer is not None else 0.0 for n in self.graph.nodes])
                self._tp_comms[dt.name] = (on * per_layer[0], on * per_layer[1])
            else:
                fits = self.tp_fits
                if fits is None:
                    get = getattr(self.cost, "collective_fits", None)
                    fits = tuple(get(dt)) if get is not None else ()
                self._tp_comms[dt.name] = tp_comm_times_s(self.graph, self.tp_link, fits)
        return self._tp_comms[dt.name]

    def tp_comm_s(self, dt: DeviceType, start: int, end: int, *, recompute: bool, recompute_mode: str = "full",
                  recompute_layers: int = 0) -> float:
        """Seconds of the tensor-parallel collectives of one micro-batch through nodes [start, end)
        (part of :meth:`node_times`; a full recompute repeats the forward's of the layers it
        recomputes, a selective one none: the attention core lies between the collectives)."""
        cf, cb = self._tp_comm(dt)
        again = 0.0
        if recompute and recompute_mode == "full":
            k = recomputed_layers(start, end, recompute_layers)
            again = float(cf[start:start + k].sum())
        return float(cf[start:end].sum() + again + cb[start:end].sum())

    def stage_cost(self, dt: DeviceType, start: int, end: int, *, recompute: bool, recompute_mode: str = "full",
                   recompute_layers: int = 0) -> StageCost:
        f, b, w = self.node_times(dt)
        return stage_from_node_times(NodeTimes(fwd_s=tuple(f), bwd_s=tuple(b), wgrad_s=tuple(w)), start, end, recompute=recompute,
                                     recompute_mode=recompute_mode, recompute_layers=recompute_layers,
                                     core_share=self.core_share if recompute_mode == "selective" else None)


def _node_times(cost: Any, graph: LayerGraph, dt: DeviceType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if hasattr(cost, "node_times"):
        t = cost.node_times(graph, dt)
        return np.asarray(t.fwd_s, float), np.asarray(t.bwd_s, float), np.asarray(t.wgrad_s, float)
    n = graph.num_nodes
    f, b, w = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        c = cost.stage_costs(graph, i, i + 1, dt)
        f[i], b[i], w[i] = c.t_fwd_s, c.t_bwd_s, c.t_wgrad_s
    return f, b, w


# ----- placement ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Placement:
    """Pipeline rank ``r`` of replica ``k`` runs on the ``tp`` devices from ``devices[k][r]`` on
    (indices into topology.devices); ``idle`` devices are left out."""

    pp: int
    dp: int
    devices: tuple[tuple[int, ...], ...]
    tp: int = 1
    idle: int = 0

    def rank_devices(self, topology: Topology, rank: int) -> list[Device]:
        return [topology.devices[self.devices[k][rank]] for k in range(self.dp)]


def placement(topology: Topology, pp: int, dp: int, tp: int = 1) -> Placement:
    """Replica-major, stage-contiguous placement with the tensor-parallel group innermost:
    device ``(k * pp + r) * tp + j`` is tp rank ``j`` of pipeline rank ``r`` of replica ``k``.
    A tp group of up to a node's size stays in one node (its collectives are on the critical
    path); adjacent stages of a pipeline share a node where they fit. This is the executor's rank
    order (replica-major) with tp inside it, where Megatron orders tp, dp, pp: the two agree for
    tp = a node, the layout the planner picks for large models."""
    need = pp * dp * tp
    if need > topology.num_devices:
        raise InfeasibleError(f"tp={tp} x pp={pp} x dp={dp} needs {need} devices but topology {topology.name} has "
                              f"{topology.num_devices}")
    return Placement(pp=pp, dp=dp, tp=tp, idle=topology.num_devices - need,
                     devices=tuple(tuple((k * pp + r) * tp for r in range(pp)) for k in range(dp)))


def tp_link(topology: Topology, place: Placement) -> Link | None:
    """The slowest link inside any tensor-parallel group (None at tp = 1): its collectives' link.
    A group spanning nodes crosses the inter-node network (the planner only does that when pinned)."""
    if place.tp == 1:
        return None
    return _slowest_link(topology, ((first + j, first + j + 1) for row in place.devices for first in row for j in range(place.tp - 1)))


def dp_link(topology: Topology, place: Placement) -> Link:
    """The slowest link of the data-parallel rings: each pipeline rank's replicas in a ring
    (replica k to k+1, and back to 0), whatever nodes they sit on -- a ring is as fast as its
    slowest hop (Patarasuk & Yuan 2009)."""
    return _slowest_link(topology, ((place.devices[k][r], place.devices[(k + 1) % place.dp][r])
                                    for r in range(place.pp) for k in range(place.dp)))


def _slowest_link(topology: Topology, pairs: Iterable[tuple[int, int]]) -> Link:
    """The slowest of the links between the device pairs (the first of equals). Looked up once per
    pair of nodes and device types: a 1024-GPU layout has a thousand hops, nearly all alike."""
    links: dict[tuple, Link] = {}
    devs = topology.devices
    for a, b in pairs:
        da, db = devs[a], devs[b]
        key = (da.node, db.node, da.type.name, db.type.name, a == b)
        if key not in links:
            links[key] = _sim_link(topology, a, b)
    return min(links.values(), key=lambda lk: lk.bandwidth_bytes_per_s)


def measured_collectives(cost: Any, topology: Topology, devices: Sequence[int]) -> tuple[CollectiveFit, ...]:
    """The collectives ``cost`` (a calibrated cost model) measured for the devices' type, when all
    ``devices`` sit on one node of one type: the calibration measured them between processes of
    one machine, so a group crossing nodes keeps the ring over its links. Empty otherwise."""
    get = getattr(cost, "collective_fits", None)
    devs = [topology.devices[i] for i in devices]
    if get is None or not devs or len({d.node for d in devs}) > 1 or len({d.type.name for d in devs}) > 1:
        return ()
    return tuple(get(devs[0].type))


def rank_device_type(topology: Topology, place: Placement, rank: int) -> DeviceType:
    """The slowest device type among the replicas of pipeline rank ``rank`` (it sets the pace)."""
    types = [d.type for d in place.rank_devices(topology, rank)]
    return min(types, key=lambda t: (t.achievable_flops("bf16"), t.name))


def _sim_link(topology: Topology, a: int, b: int) -> Link:
    lk = topology.link_between(a, b)
    return Link(name=lk.resource or f"{a}->{b}", latency_s=lk.latency_s, bandwidth_bytes_per_s=lk.bandwidth_bytes_per_s,
                latency_jitter=lk.latency_jitter)


def _group_speed(node_speed: tuple[float, ...], ranks: int, used: int) -> tuple[float, ...]:
    """The node's co-run speed table seen from a group of ``ranks`` pipeline ranks when ``used`` of
    the node's ranks run (data-parallel replicas compute in step: ``k`` of the group computing
    means about ``k * used / ranks`` of the node)."""
    if not node_speed:
        return ()
    g = ComputeGroup(ranks=tuple(range(len(node_speed))), speed=node_speed, sharing="time-slice")
    return tuple(g.rate(max(1, round(k * used / ranks))) for k in range(1, ranks + 1))


def compute_groups(topology: Topology, place: Placement) -> tuple[ComputeGroup, ...]:
    """Pipeline ranks on one CPU node share its cores (only where the node says they share), and
    its caches and memory bandwidth where the node carries a measured ``corun_speed`` (and a
    ``resume_s`` / ``switch_s`` after waits)."""
    groups = []
    by_node: dict[int, list[int]] = {}
    for r in range(place.pp):
        by_node.setdefault(topology.devices[place.devices[0][r]].node, []).append(r)
    for node, ranks in by_node.items():
        spec = topology.nodes[node]
        if spec.cores <= 0 or len(ranks) < 2:
            continue
        per_rank = max(1, topology.devices[place.devices[0][ranks[0]]].type.cores)
        on_node = sum(1 for dev in topology.devices if dev.node == node)
        used = min(on_node, place.pp * place.dp * place.tp)
        capacity = max(1, int(spec.cores // per_rank * len(ranks) // max(used, 1)))
        speed = _group_speed(spec.corun_speed, len(ranks), used)
        if place.tp > 1 and speed:
            # a tp rank's stage times, as a calibration measures them (calibration/tpcost.py), are those of
            # its tp processes computing together: the co-run speed of more is relative to theirs
            alone = _group_speed(spec.corun_speed, 1, place.tp)[0]
            speed = tuple(min(1.0, v / alone) for v in speed)
        if capacity < len(ranks) or any(v < 1.0 for v in speed) or spec.resume_s > 0 or spec.switch_s > 0:
            groups.append(ComputeGroup(ranks=tuple(ranks), capacity=capacity, wakeup_s=spec.wakeup_s, speed=speed,
                                       resume_s=spec.resume_s, switch_s=spec.switch_s))
    return tuple(groups)


# ----- the simulator's input ---------------------------------------------------------------------
def plan_stage_memory(plan: Plan, graph: LayerGraph, schedule: Schedule) -> tuple[StageMemory, ...]:
    """Each stage's memory-model peak as ``plan`` runs it under ``schedule``: ``graph`` is one tp
    rank's view (:func:`pipetrain.program.shard.shard_graph`); the micro-batches between F and the
    backward, and with a split backward those between I and W, at their schedule peaks."""
    fb = peak_in_flight(schedule)
    wh = peak_pending_wgrad(schedule) if schedule.split_backward else (0,) * len(fb)
    kind = "selective" if plan.recompute == "selective" else "full"
    return tuple(stage_memory(graph, st.block_start, st.block_end, in_flight=max(1, fb[st.index]), wgrad_held=wh[st.index],
                              buffers=st.buffers, recompute=st.recompute, recompute_mode=kind, recompute_layers=st.recompute_layers,
                              optimizer=plan.optimizer, precision=plan.precision, zero=plan.zero, dp=plan.dp)
                 for st in plan.stages)


def sim_input(*, tables: StageCosts, topology: Topology, place: Placement, schedule: Schedule,
              ranges: Sequence[tuple[int, int]], buffers: Sequence[int], recompute: Sequence[bool],
              in_flight: Sequence[int], dp_overlap: bool = False, clip_sync: bool = False, recompute_mode: str = "full",
              recompute_layers: Sequence[int] | None = None) -> SimInput:
    """The simulator's input for one split; stage ``s`` runs on pipeline rank ``schedule.stage_to_rank[s]``.

    ``in_flight[s]``: the micro-batches whose activations stage ``s`` holds at its peak (the memory
    model's count); ``clip_sync``: the optimizer steps wait for a global gradient-norm all-reduce
    (as the executor clips); ``recompute_mode`` ("full" | "selective") and ``recompute_layers[s]``
    (full: the stage's first that many layers, 0 all): how the stages with ``recompute[s]`` recompute.
    """
    layers = list(recompute_layers) if recompute_layers is not None else [0] * len(ranges)
    held_w = wgrad_held_bytes(tables.graph) if schedule.split_backward else ()
    g = tables.graph
    stages = []
    dp_bytes = _ALLREDUCE_BYTES_PER_PARAM if tables.precision is None else dp_allreduce_bytes_per_param(
        zero=tables.zero, precision=tables.precision, num_microbatches=schedule.num_microbatches)
    rank_types = [rank_device_type(topology, place, r) for r in range(place.pp)]  # (a rank's replicas: dp lookups each)
    peak_flops = min(t.peak_flops(g.dtype) for t in rank_types)
    for s, (a, b) in enumerate(ranges):
        r = schedule.stage_to_rank[s]
        dt = rank_types[r]
        c = tables.stage_cost(dt, a, b, recompute=recompute[s], recompute_mode=recompute_mode, recompute_layers=layers[s])
        mem = stage_memory(g, a, b, in_flight=max(1, in_flight[s]), buffers=buffers[s], recompute=recompute[s],
                           optimizer=tables.optimizer, precision=tables.precision, zero=tables.zero, dp=tables.dp,
                           recompute_mode=recompute_mode, recompute_layers=layers[s])
        act_per_mb = mem.activation_bytes / max(1, in_flight[s])
        static = mem.total_bytes - mem.activation_bytes
        params = mem.param_count
        # split backward: from a micro-batch's I to its W ("stash") only what W needs, the linear
        # layers' inputs and output gradients (memory.wgrad_held_bytes); the simulator counts the
        # stash apart from the F..I activations
        stash = {"wgrad_stash_bytes": float(sum(held_w[a:b]))} if schedule.split_backward else {}
        stages.append(StageSpec(**stash,
            t_fwd_s=c.t_fwd_s, t_bwd_s=(c.t_bwd_s - c.t_wgrad_s) if schedule.split_backward else c.t_bwd_s,
            t_wgrad_s=c.t_wgrad_s if schedule.split_backward else 0.0, t_recompute_s=c.t_recompute_s,
            recompute=recompute[s], activation_bytes=act_per_mb, static_bytes=static, buffers=buffers[s],
            grad_bytes=float(params * dp_bytes), t_tp_comm_s=tables.tp_comm_s(dt, a, b, recompute=recompute[s], recompute_mode=recompute_mode,
                                                                       recompute_layers=layers[s]),
            # ZeRO >= 1: each replica updates its 1/dp shard of the optimizer state
            t_optimizer_s=tables.cost.optimizer_step_time_s(params // (place.dp if tables.zero else 1), dt, optimizer=tables.optimizer,
                                                            dtype=g.dtype, model=g.model)))
    bounds = []
    for s in range(len(ranges) - 1):
        ra, rb = schedule.stage_to_rank[s], schedule.stage_to_rank[s + 1]
        nbytes = float(stage_output_bytes(g, ranges[s][1]))
        link = _sim_link(topology, place.devices[0][ra], place.devices[0][rb]) if ra != rb else Link(name=f"local{ra}")
        bounds.append(BoundarySpec(fwd_bytes=nbytes, bwd_bytes=nbytes, link=link))
    if place.dp > 1:
        dp_devices = [row[r] for row in place.devices for r in range(place.pp)]
        dpl = DataParallelSpec(width=place.dp, link=dp_link(topology, place), overlap=dp_overlap,
                               fits=measured_collectives(tables.cost, topology, dp_devices))
    else:
        dpl = DataParallelSpec(width=1)
    ties = []
    for t in g.tied:  # a weight shared across ranks: its gradient all-reduced among them (fp32, as the executor keeps it)
        owner = [s for s, (a, b) in enumerate(ranges) if a <= t.owner < b or any(a <= u < b for u in t.users)]
        ranks = tuple(sorted({schedule.stage_to_rank[s] for s in owner}))
        if len(ranks) >= 2:
            link = min((_sim_link(topology, place.devices[0][ra], place.devices[0][rb]) for ra, rb in zip(ranks, ranks[1:])),
                       key=lambda lk: lk.bandwidth_bytes_per_s)
            ties.append(TieSpec(ranks=ranks, nbytes=float(t.param_count * _ALLREDUCE_BYTES_PER_PARAM), link=link,
                                fits=measured_collectives(tables.cost, topology, [place.devices[0][r] for r in ranks])))
    host = getattr(tables.cost, "message_host_s", None)  # a measured cost model: the host CPU per message
    sync = clip_sync and place.pp * place.dp > 1
    return SimInput(ties=tuple(ties), schedule=schedule, stages=tuple(stages), boundaries=tuple(bounds),
                    compute_groups=compute_groups(topology, place), data_parallel=dpl,
                    t_message_host_s=host(g, rank_device_type(topology, place, 0)) if host is not None else 0.0,
                    micro_batch_size=g.micro_batch_size, seq_len=g.seq_len,
                    model_flops_per_sample=(g.fwd_flops + g.bwd_flops) / g.micro_batch_size,
                    peak_flops_per_device=peak_flops,
                    clip_sync_link=_sim_link(topology, place.devices[0][0], place.devices[0][1] if place.pp > 1 else place.devices[1][0])
                    if sync else None,
                    clip_sync_fits=measured_collectives(tables.cost, topology, [d for row in place.devices for d in row]) if sync else ())


# ----- a plan, lowered ---------------------------------------------------------------------------
def _check_graph(plan: Plan, graph: LayerGraph) -> None:
    plan.check_graph(graph.fingerprint, graph.model)
    if graph.micro_batch_size != plan.micro_batch_size or graph.seq_len != plan.seq_len:
        raise PlanError(f"graph was traced at micro-batch {graph.micro_batch_size} x seq {graph.seq_len}, the plan "
                        f"uses {plan.micro_batch_size} x {plan.seq_len}: trace it with those")
    if plan.num_blocks != graph.num_nodes:
        raise PlanError(f"plan covers {plan.num_blocks} blocks but the graph has {graph.num_nodes}")


def lower(plan: Plan, topology: Topology | None = None, cost: CostModel | None = None, *, graph: LayerGraph | None = None,
          as_executed: bool = False) -> Program:
    """The plan's :class:`Program` (module docstring). Without ``graph`` and ``topology`` only the
    schedule and the operations are lowered (``sim_input`` None); with them, also the simulator's
    input, refusing a graph other than the one the plan was made for."""
    buffers = [st.buffers for st in plan.stages]
    sched = make_schedule(plan.schedule, plan.pp, plan.num_microbatches, plan.chunks, buffers=buffers)
    ranks = tuple(st.rank for st in plan.stages)
    if ranks != sched.stage_to_rank:
        raise PlanError(f"the plan places stages on ranks {list(ranks)} but schedule {plan.schedule} runs them on "
                        f"{list(sched.stage_to_rank)}: re-plan, or fix the stages' ranks")
    prog = lower_schedule(sched, buffers)
    if graph is None or topology is None:
        return prog
    _check_graph(plan, graph)
    ranges = [(st.block_start, st.block_end) for st in plan.stages]
    recompute = [st.recompute for st in plan.stages]
    kind = "selective" if plan.recompute == "selective" else "full"
    layers = [st.recompute_layers for st in plan.stages]
    place = placement(topology, plan.pp, plan.dp, plan.tp)
    graph = shard_graph(graph, plan.tp, sequence_parallel=plan.sequence_parallel)
    tp_devices = [first + j for row in place.devices for first in row for j in range(place.tp)]
    tables = StageCosts(graph, cost, optimizer=plan.optimizer, tp_link=tp_link(topology, place), precision=plan.precision,
                        zero=plan.zero, dp=plan.dp, tp_fits=measured_collectives(cost, topology, tp_devices) if plan.tp > 1 else ())
    if not as_executed:
        inp = sim_input(tables=tables, topology=topology, place=place, schedule=sched, ranges=ranges, buffers=buffers,
                        recompute=recompute, in_flight=held_in_flight(sched),
                        recompute_mode=kind, recompute_layers=layers)
        return replace(prog, sim_input=inp)
    inp = sim_input(tables=tables, topology=topology, place=place, schedule=sched, ranges=ranges, buffers=buffers,
                    recompute=recompute, in_flight=peak_in_flight(sched), dp_overlap=False, clip_sync=True,
                    recompute_mode=kind, recompute_layers=layers)
    if inp.compute_groups and all(d.type.kind == "cpu" for d in topology.devices):  # CPU ranks are OS processes: time-sliced
        inp = replace(inp, compute_groups=tuple(replace(g, sharing="time-slice") for g in inp.compute_groups))
    fixed = getattr(tables.cost, "step_overhead_s", None)
    extra = fixed(plan.model, plan.micro_batch_size, plan.seq_len, plan.num_microbatches) if fixed is not None else 0.0
    if extra > 0:  # the executor's measured per-step work besides the update, on every rank
        stages = list(inp.stages)
        for r in range(plan.pp):
            s = min(st.index for st in plan.stages if st.rank == r)
            stages[s] = replace(stages[s], t_optimizer_s=stages[s].t_optimizer_s + extra)
        inp = replace(inp, stages=tuple(stages))
    return replace(prog, sim_input=inp)
