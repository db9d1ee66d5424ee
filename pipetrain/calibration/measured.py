"""The calibration file and the cost model it defines.

:class:`Calibration` is what ``pipetrain calibrate`` stores (versioned JSON,
:data:`CALIBRATION_FILE_VERSION`; :func:`load_calibration` refuses other versions with the fix):
block profiles, the analytic fit, the point-to-point link, the backend's collectives per group
size, the optimizer step, and on CPU the
executor's overheads, the host CPU per message, the wake-up latency, co-run speeds and the cost of
a wait. :class:`MeasuredCostModel` turns it into a cost model (the profiled block times where a
profile of that model and shape exists, the fitted analytic model elsewhere, the measured
optimizer cost) and :func:`calibrated_topology` puts the measured link and node constants into a
topology; ``pipetrain plan|simulate --calibration FILE`` use both (:func:`calibrated_for`).
The measuring itself is :mod:`pipetrain.calibration.run`.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pipetrain.calibration.commprobe import P2PCost, WakeupCost
from pipetrain.calibration.corun import CoRunSpeed, ResumeCost, mean_corun
from pipetrain.calibration.fit import CalibratedCostModel, CalibrationFit
from pipetrain.calibration.overhead import MessageHostCost, RuntimeOverhead
from pipetrain.calibration.profile import BlockProfile
from pipetrain.calibration.tpcost import TensorParallelCost
from pipetrain.costs import NodeTimes, StageCost, stage_from_node_times
from pipetrain.errors import ConfigError
from pipetrain.graph import LayerGraph
from pipetrain.serde import from_dict, median_merge, to_dict
from pipetrain.sharding import CollectiveFit, find_fit
from pipetrain.topology import DeviceType, Topology

__all__ = ["CALIBRATION_FILE_VERSION", "P2PCost", "OptimizerCost", "Calibration", "MeasuredCostModel",
           "combine_calibrations", "calibrated_cost",
           "calibrated_topology", "load_calibration", "calibrated_for"]

#: 2: ``resume`` entries no longer carry ``slowdown``; 3: the runtime entries measure the host work
#: between steps; 4: ``collectives``, the measured all-reduce, all-gather and reduce-scatter (and
#: ``tensor_parallel``); 5: the two-rank pipeline's latency distribution (``pipeline_latency_jitter``),
#: which the simulator samples: a version-4 file would predict with a fixed latency, so it is measured again
CALIBRATION_FILE_VERSION = 5


@dataclass(frozen=True, kw_only=True)
class OptimizerCost:
    """Seconds of one optimizer step on one rank: ``fixed_s + per_param_s * parameters``."""

    optimizer: str
    fixed_s: float
    per_param_s: float
    params: tuple[int, ...] = ()
    seconds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (self.fixed_s >= 0 and self.per_param_s >= 0):
            raise ConfigError(f"calibration optimizer {self.optimizer}: fixed_s and per_param_s must be >= 0")

    def time_s(self, param_count: float) -> float:
        return self.fixed_s + self.per_param_s * param_count if param_count > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """One calibration run (see module docstring); ``device_type`` names the topology's type it is for."""

    topology: str
    device_type: str
    device: str
    device_kind: str
    threads: int
    cores: int
    p2p: P2PCost
    optimizers: tuple[OptimizerCost, ...]
    fit: CalibrationFit
    profiles: tuple[BlockProfile, ...]
    runtime: tuple[RuntimeOverhead, ...] = ()
    #: host CPU per point-to-point message, per model and shape (CPU ranks; measured with two ranks)
    messages: tuple[MessageHostCost, ...] = ()
    #: CPU: a blocked receiver's wait for a core while all cores compute (None: not measured)
    wakeup: WakeupCost | None = None
    #: CPU: per model and shape, each rank's speed while k ranks compute at once (empty: not measured)
    corun: tuple[CoRunSpeed, ...] = ()
    #: CPU: per model and shape, the next action's slowdown after a wait (empty: not measured)
    resume: tuple[ResumeCost, ...] = ()
    #: the backend's all-reduce, all-gather and reduce-scatter per group size (empty: not measured;
    #: :mod:`pipetrain.calibration.collprobe`)
    collectives: tuple[CollectiveFit, ...] = ()
    #: per model, shape and tp: the executor's tensor-parallel compute over the profile (empty: not measured;
    #: :mod:`pipetrain.calibration.tpcost`)
    tensor_parallel: tuple[TensorParallelCost, ...] = ()
    created_utc: str = ""
    elapsed_s: float = 0.0
    schema_version: int = CALIBRATION_FILE_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != CALIBRATION_FILE_VERSION:
            raise ConfigError(f"calibration file version {self.schema_version} is not supported (this pipetrain reads "
                              f"{CALIBRATION_FILE_VERSION}): re-run `pipetrain calibrate`")
        if not self.profiles:
            raise ConfigError("a calibration needs at least one block profile")

    def optimizer(self, name: str) -> OptimizerCost | None:
        return next((o for o in self.optimizers if o.optimizer == name), None)

    def profile_for(self, graph: LayerGraph) -> BlockProfile | None:
        """The stored profile of this graph's model and shape (block granularity), if any."""
        for p in self.profiles:
            if (p.model, p.micro_batch_size, p.seq_len, p.dtype, len(p.blocks)) == (
                    graph.model, graph.micro_batch_size, graph.seq_len, graph.dtype, graph.num_nodes):
                return p
        return None

    def overhead_for(self, graph: LayerGraph) -> float:
        """The executor's measured overhead factor for this model and shape (1.0 when not measured).

        Its compute spans' part is the two-rank pipeline's back-to-back actions over the profile where
        the calibration ran one (:func:`pipetrain.calibration.overhead.pipeline_action_costs`), else the
        one-rank run's: that rank computes without a pause, a pipeline's ranks between waits, and on a
        busy machine the one-rank spans came out several times the pipeline's (figures:
        benchmarks/RESULTS.md). Plans without a pipeline get the same factor."""
        o = self.runtime_for(graph.model, graph.micro_batch_size, graph.seq_len)
        if o is None:
            return 1.0
        piped = [m.pipeline_hot_ratio for m in self.messages if m.pipeline_hot_actions > 0
                 and (m.model, m.micro_batch_size, m.seq_len) == (graph.model, graph.micro_batch_size, graph.seq_len)]
        if piped and o.span_factor > 0:
            return max(1e-3, o.factor - o.span_factor + statistics.median(piped))
        return o.factor

    def optimizer_scale(self, model: str) -> float:
        """The executor's end of step in its own run over the adamw fit's prediction for the same
        parameters (median over the model's runtime entries; 1.0 when not measured). The fit times the
        update in a loop; in a run it follows a backward pass (see :mod:`pipetrain.calibration.overhead`)."""
        adamw = self.optimizer("adamw")
        ratios = [o.end_of_step_s / adamw.time_s(o.param_count) for o in self.runtime
                  if adamw is not None and o.model == model and o.end_of_step_s > 0 and o.param_count > 0]
        return statistics.median(ratios) if ratios else 1.0

    def corun_speed(self) -> tuple[float, ...]:
        """The node's co-run speed table: per ``k``, the mean over the measured models and shapes
        (the models' tables agree within the machine's noise, so one table serves the node;
        figures: benchmarks/RESULTS.md). The entry for two ranks is the one measured in the
        calibration's two-rank pipeline where it ran (:func:`pipetrain.calibration.overhead.pipeline_action_costs`):
        the probe's processes compute without a pause, a pipeline's ranks about half the time."""
        table = mean_corun(self.corun).speed if self.corun else ()
        piped = [m.pipeline_corun_speed for m in self.messages if m.pipeline_corun_actions > 0]
        if piped and len(table) >= 2:  # two ranks computing at once, as measured in the two-rank pipeline
            table = (table[0], statistics.median(piped), *table[2:])
        return table

    def pipeline_latency_s(self) -> float:
        """The one-way latency of a message to a rank that has been blocked on it while its sender
        computed: on CPU the wake-up probe's one-way time with the cores idle and 2 ms of compute
        between round trips, less the wire time (the receiver's core went idle, and on a virtual
        machine its wake-up can cost far more than a back-to-back ping-pong shows). Pipeline ranks
        receive that way, and simulating with this latency instead of the ping-pong's predicted the
        same measured runs' step times markedly better (figures: benchmarks/RESULTS.md). Without a
        wake-up probe (GPU, --no-probe):
        the ping-pong fit's latency. Where the calibration ran a two-rank pipeline, the latency its
        blocked receivers saw comes first (:func:`pipetrain.calibration.overhead.pipeline_message_latency`):
        the probe's round trips are not a pipeline's pattern of compute and blocking waits, and on a
        loaded machine its wake-ups came out several times the pipeline's (figures: benchmarks/RESULTS.md)."""
        piped = [m.pipeline_latency_s for m in self.messages if m.pipeline_latency_messages > 0]
        if piped:  # measured where pipeline ranks block, end to end: not floored by the ping-pong's fit, which load inflates too
            return statistics.median(piped)
        w = self.wakeup
        if w is None:
            return self.p2p.latency_s
        return max(self.p2p.latency_s, w.idle_one_way_s - w.nbytes / self.p2p.bandwidth_bytes_per_s)

    def pipeline_latency_jitter(self) -> tuple[float, ...]:
        """The distribution of that latency as multipliers of its mean (``Link.latency_jitter``): the
        two-rank pipeline's (:func:`pipetrain.calibration.overhead.latency_jitter`), quantile by
        quantile the median over the measured models, scaled to average 1. Empty without a pipeline
        run (the simulated latency is then fixed)."""
        piped = [m.pipeline_latency_jitter for m in self.messages if m.pipeline_latency_messages > 0 and m.pipeline_latency_jitter]
        if not piped:
            return ()
        k = min(len(j) for j in piped)
        q = [statistics.median(j[i] for j in piped if len(j) == k) for i in range(k)]
        mean = sum(q) / k
        return tuple(v / mean for v in q) if mean > 0 else ()

    def collectives_as_run(self) -> tuple[CollectiveFit, ...]:
        """The measured collectives, the all-reduce of two ranks anchored where the calibration's
        two-rank pipeline ran one (:func:`pipetrain.calibration.overhead.pipeline_allreduce`, the
        tied weights' gradient after the backward pass): ``latency_s`` is that in-run time less the
        probe's per-byte cost at its size, and larger tensors add the probe's per-byte cost (the
        p2p link's without a probe). The probe times collectives between bursts of compute, and its
        small sizes, all latency, moved 2-4x between calibrations minutes apart (0.8 and 3.1 ms at
        16 KiB), where the pipeline's own all-reduce took 0.5-0.9 ms (benchmarks/RESULTS.md); the
        simulator prices the tie and the clipping's scalar with it. Median over the measured models."""
        piped = sorted((m.pipeline_allreduce_s, m.pipeline_allreduce_bytes) for m in self.messages if m.pipeline_allreduce_steps > 0)
        if not piped:
            return self.collectives
        t, n = piped[(len(piped) - 1) // 2]
        probe = find_fit(self.collectives, "all_reduce", 2)
        beta = probe.per_byte_s if probe is not None else 1.0 / self.p2p.bandwidth_bytes_per_s
        fit = CollectiveFit(kind="all_reduce", ranks=2, backend=probe.backend if probe is not None else self.p2p.backend,
                            latency_s=max(0.0, t - n * beta), per_byte_s=beta, sizes_bytes=(n,), seconds=(t,))
        return tuple(f for f in self.collectives if (f.kind, f.ranks) != ("all_reduce", 2)) + (fit,)

    def resume_s(self) -> float:
        """The node's extra seconds of an action after a wait: measured in the calibration's two-rank
        pipeline where it ran (:func:`pipetrain.calibration.overhead.pipeline_action_costs`), else by the
        one-process probe; the median over the measured models (0: not measured). The pipeline's own
        actions come first: they wait as the simulated ones do, for the other rank's message, where
        the probe sleeps (figures: benchmarks/RESULTS.md)."""
        piped = [m.pipeline_resume_s for m in self.messages if m.pipeline_waited_actions > 0]
        if piped:
            return min(0.5, statistics.median(piped))
        return min(0.5, statistics.median(r.resume_s for r in self.resume)) if self.resume else 0.0

    def switch_s(self) -> float:
        """The node's extra seconds of an action after another process ran on its core: the median
        over the measured models (0: not measured)."""
        return min(0.5, statistics.median(r.switch_s for r in self.resume)) if self.resume else 0.0

    def rescaled(self, factor: float) -> Calibration:
        """This calibration on a machine ``factor`` times slower: every measured CPU or device time
        (block profiles, optimizer fit, the executor's per-step and end-of-step times, host work per
        message, the co-run probe's time alone) times ``factor``; links, wake-up latency, co-run
        speeds (ratios) and the analytic fit as they are."""
        if not factor > 0:
            raise ConfigError(f"a calibration rescale factor must be > 0, got {factor}")
        profiles = tuple(replace(p, blocks=tuple(replace(b, fwd_s=b.fwd_s * factor, bwd_s=b.bwd_s * factor) for b in p.blocks))
                         for p in self.profiles)
        opts = tuple(replace(o, fixed_s=o.fixed_s * factor, per_param_s=o.per_param_s * factor,
                             seconds=tuple(t * factor for t in o.seconds)) for o in self.optimizers)
        runtime = tuple(replace(o, fixed_s=o.fixed_s * factor, end_of_step_s=o.end_of_step_s * factor,
                                between_steps_s=o.between_steps_s * factor,
                                between_steps_per_microbatch_s=o.between_steps_per_microbatch_s * factor) for o in self.runtime)
        messages = tuple(replace(m, host_s=m.host_s * factor, pipeline_resume_s=m.pipeline_resume_s * factor) for m in self.messages)
        corun = tuple(replace(c, alone_s=c.alone_s * factor) for c in self.corun)
        resume = tuple(replace(r, hot_s=r.hot_s * factor, cold_s=r.cold_s * factor, after_other_s=r.after_other_s * factor)
                       for r in self.resume)
        # as they are: the collectives (communication) and the tensor-parallel factors (ratios to the profile, which scales)
        return replace(self, profiles=profiles, optimizers=opts, runtime=runtime, messages=messages, corun=corun, resume=resume)

    def tensor_parallel_for(self, graph: LayerGraph) -> TensorParallelCost | None:
        """The measured tensor-parallel compute of this tp view's model and shape, if any."""
        return next((t for t in self.tensor_parallel if (t.model, t.micro_batch_size, t.seq_len, t.tp) == (
            graph.model, graph.micro_batch_size, graph.seq_len, graph.tp)), None)

    def runtime_for(self, model: str, micro_batch_size: int, seq_len: int) -> RuntimeOverhead | None:
        return next((o for o in self.runtime if (o.model, o.micro_batch_size, o.seq_len) == (model, micro_batch_size, seq_len)), None)

    def message_host_s(self, model: str, micro_batch_size: int, seq_len: int) -> float:
        """Host seconds per message for this model and shape: the measured entry, else the mean of the
        model's entries, else of all (0 when none was measured)."""
        exact = [m.host_s for m in self.messages if (m.model, m.micro_batch_size, m.seq_len) == (model, micro_batch_size, seq_len)]
        same = [m.host_s for m in self.messages if m.model == model]
        pick = exact or same or [m.host_s for m in self.messages]
        return sum(pick) / len(pick) if pick else 0.0

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(p)
        return p


def combine_calibrations(cals: Sequence[Calibration]) -> Calibration:
    """Several calibrations of the same topology, models and shapes (taken minutes apart) as one:
    every measured number is the median over them (:func:`pipetrain.serde.median_merge`), the
    time taken their sum. Each run is a snapshot of a machine whose speed drifts (on a shared
    machine the in-run cost of a micro-batch and the host CPU per message move between calibrations
    minutes apart; figures: benchmarks/RESULTS.md); the median of a few spread over time predicts
    better than any one."""
    if not cals:
        raise ConfigError("combine_calibrations needs at least one calibration")
    merged = median_merge(list(cals), "calibration", last=("created_utc",))
    return replace(merged, elapsed_s=sum(c.elapsed_s for c in cals))


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; every mistake is a ConfigError naming what to do."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration file {str(p)!r} does not exist: create it with `pipetrain calibrate --topology local-cpu:N -o {p.name}`")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"calibration file {p} is not valid JSON ({exc}): re-run `pipetrain calibrate`") from None
    if isinstance(data, dict) and data.get("schema_version") != CALIBRATION_FILE_VERSION:
        raise ConfigError(f"calibration file {p} has version {data.get('schema_version')!r}, this pipetrain reads version "
                          f"{CALIBRATION_FILE_VERSION}: re-run `pipetrain calibrate`")
    return from_dict(Calibration, data, where=f"calibration {p.name}")


# ----- the cost model --------------------------------------------------------------------------
class MeasuredCostModel(CalibratedCostModel):
    """Cost model from a :class:`Calibration`.

    Block times: the stored profile of the graph's model and shape when there is one (sum of
    measured block medians, times the executor's measured overhead factor for that shape when
    the calibration ran the executor; W is each block's FLOP share of its backward), else the
    fitted analytic model; for a tensor-parallel view of that model and shape, the profile times the
    executor's measured tensor-parallel compute factors (:mod:`pipetrain.calibration.tpcost`) where
    the calibration has them (without them, the one-rank times). Optimizer step: the measured
    ``fixed + per-param`` fit, scaled to the executor's own end of step for the model (:meth:`Calibration.optimizer_scale`). Transfers: the
    analytic formulas over the links, which :func:`calibrated_topology` sets to the measured ones.
    Collectives (tensor-parallel, data-parallel and ZeRO): the measured fit of that collective and
    group size (:meth:`collective_fits`, which the lowering passes on), else the ring formula.
    """

    name = "calibrated"

    def __init__(self, calibration: Calibration) -> None:
        super().__init__(calibration.fit)
        self.calibration = calibration

    def _matches(self, device_type: DeviceType) -> bool:
        return device_type.name == self.calibration.device_type and device_type.kind == self.calibration.device_kind

    @property
    def models_executor_overhead(self) -> bool:
        """Whether the executor's measured overheads (one rank; host CPU per message) are in the costs."""
        return bool(self.calibration.runtime or self.calibration.messages)

    def collective_fits(self, device_type: DeviceType) -> tuple[CollectiveFit, ...]:
        """The measured collectives (:meth:`Calibration.collectives_as_run`), for groups of the
        calibrated device type (empty elsewhere)."""
        return self.calibration.collectives_as_run() if self._matches(device_type) else ()

    def tp_comm_per_layer_s(self, graph: LayerGraph, device_type: DeviceType) -> tuple[float, float] | None:
        """Seconds of one transformer layer's tensor-parallel collectives per micro-batch, in F and in
        B, as the calibration's tp run measured them for this model, shape and tp (None: not measured)."""
        tpc = self.calibration.tensor_parallel_for(graph) if graph.tp > 1 and self._matches(device_type) else None
        layers = sum(1 for n in graph.nodes if n.layer is not None)
        if tpc is None or layers == 0 or tpc.tp_comm_fwd_s + tpc.tp_comm_bwd_s <= 0:
            return None
        return tpc.tp_comm_fwd_s / layers, tpc.tp_comm_bwd_s / layers

    def message_host_s(self, graph: LayerGraph, device_type: DeviceType) -> float:
        """Host CPU seconds per point-to-point message on CPU ranks of the calibrated type (0 elsewhere)."""
        if not self._matches(device_type) or device_type.kind != "cpu":
            return 0.0
        return self.calibration.message_host_s(graph.model, graph.micro_batch_size, graph.seq_len)

    def step_overhead_s(self, model: str, micro_batch_size: int, seq_len: int, num_microbatches: int = 0) -> float:
        """The executor's measured per-step work besides the optimizer update, per rank (0: not measured):
        the rest of its one-rank step and the host work between two steps at ``num_microbatches``."""
        rt = self.calibration.runtime_for(model, micro_batch_size, seq_len)
        if rt is None:
            return 0.0
        return rt.fixed_s + rt.between_steps_s + rt.between_steps_per_microbatch_s * num_microbatches

    def node_times(self, graph: LayerGraph, device_type: DeviceType) -> NodeTimes:
        prof = self.calibration.profile_for(graph) if self._matches(device_type) else None
        if prof is None:
            return super().node_times(graph, device_type)
        f, b, w = [], [], []
        k = kb = self.calibration.overhead_for(graph)
        tpc = self.calibration.tensor_parallel_for(graph) if graph.tp > 1 else None
        if tpc is not None:  # a tp view: the executor's measured compute on tp ranks over the one-rank profile
            k, kb = tpc.fwd_factor, tpc.bwd_factor
        for node, t in zip(graph.nodes, prof.blocks):
            f.append(t.fwd_s * k)
            b.append(t.bwd_s * kb)
            w.append(kb * min(t.bwd_s, t.bwd_s * node.wgrad_flops / node.bwd_flops) if node.bwd_flops > 0 else 0.0)
        return NodeTimes(fwd_s=tuple(f), bwd_s=tuple(b), wgrad_s=tuple(w))

    def stage_costs(self, graph: LayerGraph, start: int, end: int, device_type: DeviceType, *, recompute: bool = False) -> StageCost:
        if not 0 <= start < end <= graph.num_nodes:
            raise ConfigError(f"stage range [{start}, {end}) is not within the graph's {graph.num_nodes} nodes")
        return stage_from_node_times(self.node_times(graph, device_type), start, end, recompute=recompute)

    def optimizer_step_time_s(self, param_count: int, device_type: DeviceType, *, optimizer: str = "adamw", dtype: str = "fp32",
                              model: str = "") -> float:
        oc = self.calibration.optimizer(optimizer)
        if oc is None or not self._matches(device_type):
            return super().optimizer_step_time_s(param_count, device_type, optimizer=optimizer, dtype=dtype, model=model)
        return oc.time_s(param_count) * self.calibration.optimizer_scale(model)


def calibrated_cost(calibration: Calibration) -> MeasuredCostModel:
    return MeasuredCostModel(calibration)


def calibrated_topology(topology: Topology, calibration: Calibration) -> Topology:
    """``topology`` with the measured p2p link inside every node whose devices are the calibrated
    type, and on such nodes with shared cores the measured wake-up latency and co-run speed.

    The link's latency is the one a pipeline sees (:meth:`Calibration.pipeline_latency_s`), with its
    measured distribution where the calibration has one (:meth:`Calibration.pipeline_latency_jitter`)."""
    nodes = []
    for node in topology.nodes:
        if all(t == calibration.device_type for t in node.device_types):
            link = replace(node.link, latency_s=calibration.pipeline_latency_s(), latency_jitter=calibration.pipeline_latency_jitter(),
                           bandwidth_bytes_per_s=calibration.p2p.bandwidth_bytes_per_s)
            node = replace(node, link=link)
            if calibration.wakeup is not None and node.cores > 0:
                node = replace(node, wakeup_s=calibration.wakeup.wakeup_s)
            if calibration.corun and node.cores > 0:
                node = replace(node, corun_speed=calibration.corun_speed())
            if (calibration.resume or calibration.resume_s() > 0) and node.cores > 0:
                node = replace(node, resume_s=calibration.resume_s(), switch_s=calibration.switch_s())
        nodes.append(node)
    return replace(topology, nodes=tuple(nodes))


def calibrated_for(topology: str, path: str | Path, *, world_size: int = 1) -> tuple[Topology, MeasuredCostModel]:
    """(topology with the measured link, cost model) for ``plan|simulate --calibration FILE``.

    ``topology`` is a preset or YAML path (``local``/empty: ``local-cpu:world_size``); it must
    contain the calibrated device type.
    """
    from pipetrain.topology import resolve_topology

    cal = load_calibration(path)
    topo = resolve_topology(topology, world_size=world_size)
    if not any(d.type.name == cal.device_type for d in topo.devices):
        types = sorted({d.type.name for d in topo.devices})
        raise ConfigError(f"calibration {Path(path).name} is for device type {cal.device_type!r} but topology {topo.name} has "
                          f"{', '.join(types)}: run `pipetrain calibrate --topology {topo.name}` on that hardware")
    return calibrated_topology(topo, cal), MeasuredCostModel(cal)
