"""The calibration run: measure this device and backend, fit the cost model, store it as JSON.

:func:`run_calibration` measures, on the device a topology's ranks use (this CPU with one
thread per rank, as the executor runs; or the GPU):

* every block's forward and backward of each model at each micro-batch size
  (:func:`pipetrain.calibration.profile.profile_model`), the median of several rounds;
* on CPU, the host CPU time per point-to-point message: the executor on one rank and on two
  (:func:`pipetrain.calibration.overhead.measure_message_host_s`; the simulator holds a rank's core
  that long per message sent or received);
* the point-to-point latency and bandwidth of the backend in use (gloo on loopback, NCCL on
  GPU) by ping-pong and a Hockney fit (:func:`pipetrain.calibration.commprobe.probe_p2p`); on CPU
  also the wake-up latency of a blocked receiver while every core computes
  (:func:`pipetrain.calibration.commprobe.probe_wakeup`), which the topology's node then carries,
  and with the cores idle, which sets the link's latency (:meth:`Calibration.pipeline_latency_s`);
* on CPU, how fast a rank computes while ``k`` others of the node compute too (``k`` up to the
  topology's ranks per node; :func:`pipetrain.calibration.corun.probe_corun`), which the node
  carries as ``corun_speed``, and what a wait costs the next action (cold caches;
  :func:`pipetrain.calibration.corun.probe_resume`; the node's ``resume_s``) and what another process
  running on its core meanwhile costs it (the node's ``switch_s``);
* on CPU, the executor's own overhead over the profiled blocks: a one-rank executor run of each
  model and shape (:mod:`pipetrain.calibration.overhead`);
* the optimizer step as the executor runs it (global-norm clipping, the update, zeroing the
  gradients) on the model's own parameters, fitted as ``fixed_s + per_param_s * params``
  (non-negative least squares);

then fits the analytic roofline's factors to the block profiles with ``scipy.optimize``
(:func:`pipetrain.calibration.fit.fit_calibration`). :class:`Calibration` is the stored
result; :func:`calibrated_cost` turns it into a cost model (the profiled block times where a
profile of that model and shape exists, the fitted analytic model elsewhere, the measured
optimizer cost) and :func:`calibrated_topology` puts the measured link into the topology.
``pipetrain plan|simulate --calibration FILE`` use both. Torch is imported only to measure.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipetrain.calibration.commprobe import P2PCost, WakeupCost
from pipetrain.calibration.corun import CoRunSpeed, ResumeCost, mean_corun
from pipetrain.calibration.fit import CalibratedCostModel, CalibrationFit
from pipetrain.calibration.overhead import MessageHostCost, RuntimeOverhead
from pipetrain.calibration.profile import BlockProfile
from pipetrain.costs import NodeTimes, StageCost, stage_from_node_times
from pipetrain.errors import ConfigError
from pipetrain.graph import LayerGraph
from pipetrain.serde import from_dict, median_merge, to_dict
from pipetrain.topology import DeviceType, Topology

__all__ = ["CALIBRATION_FILE_VERSION", "P2PCost", "OptimizerCost", "Calibration", "MeasuredCostModel",
           "run_calibration", "combine_calibrations", "typical_profile", "describe", "measure_optimizer", "calibrated_cost",
           "calibrated_topology", "load_calibration", "calibrated_for"]

#: 2: ``resume`` entries no longer carry ``slowdown``
CALIBRATION_FILE_VERSION = 2


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
        """The executor's measured overhead factor for this model and shape (1.0 when not measured)."""
        o = self.runtime_for(graph.model, graph.micro_batch_size, graph.seq_len)
        return o.factor if o is not None else 1.0

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
        figures: benchmarks/RESULTS.md)."""
        return mean_corun(self.corun).speed if self.corun else ()

    def pipeline_latency_s(self) -> float:
        """The one-way latency of a message to a rank that has been blocked on it while its sender
        computed: on CPU the wake-up probe's one-way time with the cores idle and 2 ms of compute
        between round trips, less the wire time (the receiver's core went idle, and on a virtual
        machine its wake-up can cost far more than a back-to-back ping-pong shows). Pipeline ranks
        receive that way, and simulating with this latency instead of the ping-pong's predicted the
        same measured runs' step times markedly better (figures: benchmarks/RESULTS.md). Without a
        wake-up probe (GPU, --no-probe):
        the ping-pong fit's latency."""
        w = self.wakeup
        if w is None:
            return self.p2p.latency_s
        return max(self.p2p.latency_s, w.idle_one_way_s - w.nbytes / self.p2p.bandwidth_bytes_per_s)

    def resume_s(self) -> float:
        """The node's extra seconds of an action after a wait: the median over the measured models (0: not measured)."""
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
        runtime = tuple(replace(o, fixed_s=o.fixed_s * factor, end_of_step_s=o.end_of_step_s * factor) for o in self.runtime)
        messages = tuple(replace(m, host_s=m.host_s * factor) for m in self.messages)
        corun = tuple(replace(c, alone_s=c.alone_s * factor) for c in self.corun)
        resume = tuple(replace(r, hot_s=r.hot_s * factor, cold_s=r.cold_s * factor, after_other_s=r.after_other_s * factor)
                       for r in self.resume)
        return replace(self, profiles=profiles, optimizers=opts, runtime=runtime, messages=messages, corun=corun, resume=resume)

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
    fitted analytic model. Optimizer step: the measured ``fixed + per-param`` fit, scaled to the
    executor's own end of step for the model (:meth:`Calibration.optimizer_scale`). Transfers: the
    analytic formulas over the links, which :func:`calibrated_topology` sets to the measured ones.
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

    def message_host_s(self, graph: LayerGraph, device_type: DeviceType) -> float:
        """Host CPU seconds per point-to-point message on CPU ranks of the calibrated type (0 elsewhere)."""
        if not self._matches(device_type) or device_type.kind != "cpu":
            return 0.0
        return self.calibration.message_host_s(graph.model, graph.micro_batch_size, graph.seq_len)

    def step_overhead_s(self, model: str, micro_batch_size: int, seq_len: int) -> float:
        """The executor's measured per-step work besides the optimizer update, per rank (0: not measured)."""
        rt = self.calibration.runtime_for(model, micro_batch_size, seq_len)
        return rt.fixed_s if rt is not None and rt.fixed_s > 0 else 0.0

    def node_times(self, graph: LayerGraph, device_type: DeviceType) -> NodeTimes:
        prof = self.calibration.profile_for(graph) if self._matches(device_type) else None
        if prof is None:
            return super().node_times(graph, device_type)
        f, b, w = [], [], []
        k = self.calibration.overhead_for(graph)
        for node, t in zip(graph.nodes, prof.blocks):
            f.append(t.fwd_s * k)
            b.append(t.bwd_s * k)
            w.append(k * min(t.bwd_s, t.bwd_s * node.wgrad_flops / node.bwd_flops) if node.bwd_flops > 0 else 0.0)
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

    The link's latency is the one a pipeline sees (:meth:`Calibration.pipeline_latency_s`)."""
    nodes = []
    for node in topology.nodes:
        if all(t == calibration.device_type for t in node.device_types):
            link = replace(node.link, latency_s=calibration.pipeline_latency_s(),
                           bandwidth_bytes_per_s=calibration.p2p.bandwidth_bytes_per_s)
            node = replace(node, link=link)
            if calibration.wakeup is not None and node.cores > 0:
                node = replace(node, wakeup_s=calibration.wakeup.wakeup_s)
            if calibration.corun and node.cores > 0:
                node = replace(node, corun_speed=calibration.corun_speed())
            if calibration.resume and node.cores > 0:
                node = replace(node, resume_s=calibration.resume_s(), switch_s=calibration.switch_s())
        nodes.append(node)
    return replace(topology, nodes=tuple(nodes))


# ----- measuring --------------------------------------------------------------------------------
def measure_optimizer(model: str | Sequence[str], optimizer: str, *, device: str = "cpu", threads: int = 1, clip_norm: float = 1.0,
                      repeats: int = 15, seed: int = 0) -> OptimizerCost:
    """Time the executor's end-of-step update on growing prefixes of each model's blocks and fit
    ``fixed + per_param * params`` over all of them (the calibrated models span the sizes used).

    The work timed is the executor's own end of step on one rank, the same calls:
    :meth:`pipetrain.executor.optim.GradSync.sync` (the squared gradient norms, the clip scale),
    the optimizer's step (as :func:`~pipetrain.executor.optim.make_optimizer` builds it) and
    zeroing the gradients (:func:`~pipetrain.executor.optim.grads_to_none`). Each round gives the
    parameters fresh gradients first, as the next step's backward does (untimed).
    """
    import numpy as np
    import torch
    from scipy.optimize import lsq_linear

    from pipetrain.executor.optim import GradSync, OptimConfig, grads_to_none, make_optimizer, unique_params
    from pipetrain.planner.zoo import get_model_spec

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        groups = []
        for name in [model] if isinstance(model, str) else list(model):
            blocks = list(get_model_spec(name).build(torch.device(device), seed=seed).blocks)
            for k in sorted({1, max(1, len(blocks) // 2), len(blocks)}):
                params = unique_params(blocks[:k])
                cfg = OptimConfig(name=optimizer, clip_norm=clip_norm)
                sync = GradSync(params, dp_group=None, pp_group=None, ties=[], clip_norm=clip_norm, telemetry=None, stage=0)
                groups.append((params, make_optimizer(params, cfg), sync))
        samples: list[list[float]] = [[] for _ in groups]

        to_none = grads_to_none(device)

        def once(params: list, opt: Any, sync: GradSync) -> float:
            for p in params:  # what the next step's backward leaves (untimed)
                if p.grad is None:
                    p.grad = torch.randn_like(p).mul_(1e-3)
                else:
                    p.grad.normal_(0.0, 1e-3)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sync.sync()
            opt.step()
            opt.zero_grad(set_to_none=to_none)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        for r in range(repeats + 3):  # rounds interleave the sizes: a burst of outside load hits all alike
            for i, (params, opt, sync) in enumerate(groups):
                t = once(params, opt, sync)
                if r >= 3:
                    samples[i].append(t)
        sizes = [sum(p.numel() for p in params) for params, _, _ in groups]
        secs = [statistics.median(ts) for ts in samples]
    finally:
        torch.set_num_threads(old)
    x = np.asarray(sizes, dtype=float)
    y = np.asarray(secs)
    w = 1.0 / y  # relative error: the small stage matters as much as the big one
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    res = lsq_linear(a, y * w, bounds=([0.0, 0.0], [np.inf, np.inf]))
    return OptimizerCost(optimizer=optimizer, fixed_s=float(res.x[0]), per_param_s=float(res.x[1]),
                         params=tuple(int(v) for v in sizes), seconds=tuple(float(v) for v in secs))


def typical_profile(profiles: Sequence[BlockProfile]) -> BlockProfile:
    """Per block, the median over the rounds of its forward and of its backward median."""
    if not profiles:
        raise ConfigError("typical_profile needs at least one profile")
    first = profiles[0]
    blocks = []
    for i, b in enumerate(first.blocks):
        blocks.append(replace(b, fwd_s=statistics.median(p.blocks[i].fwd_s for p in profiles),
                              bwd_s=statistics.median(p.blocks[i].bwd_s for p in profiles)))
    return replace(first, blocks=tuple(blocks), repeats=first.repeats * len(profiles))


def run_calibration(topology: str, *, models: Sequence[str] = ("tiny-gpt",), micro_batch_sizes: Sequence[int] = (1, 4),
                    seq_len: int | None = None, dtype: str = "fp32", threads: int = 1, warmup: int = 2, repeats: int = 7,
                    optimizers: Sequence[str] = ("adamw", "sgd"), probe: bool = True, rounds: int = 5,
                    shapes: Sequence[tuple[str, int]] = (), runtime: bool = True,
                    progress: Callable[[str], None] | None = None) -> Calibration:
    """Measure and fit (module docstring). ``probe`` False skips the p2p probe (keeps the topology's link).

    Each block is profiled in ``rounds`` independent rounds (each the median of ``repeats``) and
    the median over the rounds is kept (:func:`typical_profile`): a machine's speed can wander
    between windows of a few seconds even with nothing else running, with little correlation from
    one window to the next (figures: benchmarks/RESULTS.md), and the runs it predicts see the
    typical speed, not the best moment (the smallest round, kept before, made the simulation fast
    by about that wander).
    ``shapes`` (model, micro-batch size) pairs replace ``models`` x ``micro_batch_sizes``.
    ``runtime`` runs the executor on one rank per shape to measure its overhead over the profile
    (:mod:`pipetrain.calibration.overhead`; CPU only here).
    """
    from pipetrain.calibration.fit import fit_calibration
    from pipetrain.calibration.profile import local_device_name, profile_model
    from pipetrain.planner.trace import trace_graph
    from pipetrain.topology import resolve_topology

    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    topo = resolve_topology(topology)
    dt = topo.devices[0].type
    if any(d.type.name != dt.name for d in topo.devices):
        raise ConfigError(f"topology {topo.name} mixes device types; calibrate one type at a time (a topology of that type only)")
    pairs = list(shapes) or [(m, b) for m in models for b in micro_batch_sizes]
    if not pairs:
        raise ConfigError("calibrate needs at least one model and one micro-batch size")
    models = list(dict.fromkeys(m for m, _ in pairs))
    if threads < 1 or warmup < 0 or repeats < 1 or rounds < 1:
        raise ConfigError(f"calibrate needs threads, repeats and rounds >= 1 and warmup >= 0, got {threads}, {repeats}, {rounds}, {warmup}")
    from pipetrain.planner.zoo import get_model_spec

    for model, mbs in pairs:  # every mistake before the first measurement
        get_model_spec(model).check_shape(mbs, seq_len)
    if dt.kind == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"topology {topo.name} is made of GPUs ({dt.name}) but this machine has none: calibrate a local-cpu:N topology here")
        device, backend = "cuda", "nccl"
    else:
        device, backend = "cpu", "gloo"
    samples: list[tuple[LayerGraph, BlockProfile]] = []
    for model, mbs in pairs:
        say(f"profiling {model} blocks at micro-batch {mbs} on {device} ({threads} thread(s))")
        graph = trace_graph(model, micro_batch_size=mbs, seq_len=seq_len, dtype=dtype)
        # no saved-tensor hooks: the executor counts activations with them in its first step only
        profs = [profile_model(model, micro_batch_size=mbs, seq_len=seq_len, dtype=dtype, device=device, threads=threads,
                               warmup=warmup, repeats=repeats) for _ in range(rounds)]
        samples.append((graph, typical_profile(profs)))
    opts = []
    for name in optimizers:
        say(f"timing the {name} step on {', '.join(models)}'s parameters")
        opts.append(measure_optimizer(models, name, device=device, threads=threads))
    if probe:
        from pipetrain.calibration.commprobe import probe_p2p

        say(f"probing {backend} point-to-point latency and bandwidth")
        p2p = probe_p2p(backend=backend)
    else:
        link = topo.nodes[0].link
        p2p = P2PCost(backend=backend, latency_s=link.latency_s, bandwidth_bytes_per_s=link.bandwidth_bytes_per_s)
    wakeup = None
    if probe and device == "cpu":
        from pipetrain.calibration.commprobe import probe_wakeup

        say(f"probing the wake-up latency of a blocked receiver with all {os.cpu_count() or 1} cores busy")
        wakeup = probe_wakeup(cores=os.cpu_count() or 1)
    corun, resume = [], []
    if probe and device == "cpu":
        from pipetrain.calibration.corun import probe_corun, probe_resume

        jobs = max(sum(1 for d in topo.devices if d.node == n) for n in range(len(topo.nodes)))
        for _g, prof in samples:
            say(f"measuring the speed of 1..{jobs} ranks computing {prof.model} micro-batch {prof.micro_batch_size} at once")
            corun.append(probe_corun(prof.model, micro_batch_size=prof.micro_batch_size, seq_len=prof.seq_len, max_jobs=jobs,
                                     cores=os.cpu_count() or 1, threads=threads))
            say(f"timing {prof.model} micro-batch {prof.micro_batch_size} right after another action and after a wait")
            resume.append(probe_resume(prof.model, micro_batch_size=prof.micro_batch_size, seq_len=prof.seq_len, threads=threads))
    overheads, messages = [], []
    if runtime and device == "cpu":
        from pipetrain.calibration.overhead import measure_message_host_s, measure_runtime_overhead

        for _g, prof in samples:
            say(f"running the executor on one rank: {prof.model} micro-batch {prof.micro_batch_size}")
            overheads.append(measure_runtime_overhead(prof, threads=threads))
            say(f"running the executor on one and two ranks for the host cost of a message: {prof.model} micro-batch {prof.micro_batch_size}")
            messages.append(measure_message_host_s(prof, threads=threads))
    say("fitting the analytic cost model (scipy.optimize.least_squares)")
    fit = fit_calibration(samples, dt)
    return Calibration(topology=topo.name, device_type=dt.name, device=local_device_name(device, threads), device_kind=dt.kind,
                       threads=threads, cores=os.cpu_count() or 1, p2p=p2p, optimizers=tuple(opts), fit=fit,
                       profiles=tuple(p for _, p in samples), runtime=tuple(overheads), messages=tuple(messages), wakeup=wakeup,
                       corun=tuple(corun), resume=tuple(resume),
                       created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       elapsed_s=time.perf_counter() - t_start)


def describe(cal: Calibration) -> list[tuple[str, str]]:
    """(what, value) rows for a terminal table."""
    rows = [("device", f"{cal.device} ({cal.device_type}, {cal.cores} cores)"),
            (f"p2p ({cal.p2p.backend})", f"latency {cal.p2p.latency_s * 1e6:.1f} us back to back, {cal.pipeline_latency_s() * 1e6:.1f} us "
                                         f"to a blocked receiver; bandwidth {cal.p2p.bandwidth_bytes_per_s / 1e9:.3g} GB/s")]
    for o in cal.optimizers:
        rows.append((f"{o.optimizer} step", f"{o.fixed_s * 1e3:.3f} ms + {o.per_param_s * 1e9:.3f} ns/param"))
    for p in cal.profiles:
        f = sum(b.fwd_s for b in p.blocks)
        b = sum(b.bwd_s for b in p.blocks)
        rows.append((f"{p.model} mbs {p.micro_batch_size} seq {p.seq_len}", f"F {f * 1e3:.3f} ms, B {b * 1e3:.3f} ms ({len(p.blocks)} blocks)"))
    for ro in cal.runtime:
        rows.append((f"executor overhead {ro.model} mbs {ro.micro_batch_size}",
                     f"x{ro.factor:.3f} per micro-batch + {ro.fixed_s * 1e3:.2f} ms per step; end of step {ro.end_of_step_s * 1e3:.2f} ms "
                     f"(one rank, m={ro.num_microbatches[0]}, {ro.num_microbatches[1]}: {ro.measured_step_s[0] * 1e3:.1f}, "
                     f"{ro.measured_step_s[1] * 1e3:.1f} ms)"))
    for mc in cal.messages:
        rows.append((f"host CPU per message {mc.model} mbs {mc.micro_batch_size}",
                     f"{mc.host_s * 1e6:.0f} us (outside compute per step: one rank {mc.outside_one_rank_s * 1e3:.2f} ms, "
                     f"two ranks {', '.join(f'{t * 1e3:.2f}' for t in mc.outside_two_ranks_s)} ms; {mc.messages_per_rank} messages)"))
    if cal.wakeup is not None:
        w = cal.wakeup
        rows.append(("wake-up on busy cores", f"{w.wakeup_s * 1e6:.0f} us ({w.nbytes} B ping-pong one way: {w.idle_one_way_s * 1e6:.0f} us "
                                              f"idle, {w.busy_one_way_s * 1e6:.0f} us with {w.busy_processes} busy processes)"))
    for c in cal.corun:
        rows.append((f"co-run speed {c.model} mbs {c.micro_batch_size}",
                     f"{', '.join(f'{v:.2f}' for v in c.speed)} with 1..{len(c.speed)} ranks computing on {c.cores} cores "
                     f"(alone {c.alone_s * 1e3:.1f} ms per micro-batch)"))
    for r in cal.resume:
        rows.append((f"after a wait {r.model} mbs {r.micro_batch_size}",
                     f"+{r.resume_s * 1e3:.2f} ms after a wait, +{r.switch_s * 1e3:.2f} ms after another process on its core "
                     f"({r.hot_s * 1e3:.2f} ms right after another, {r.cold_s * 1e3:.2f} ms after {r.gap_s * 1e3:.0f} ms idle, "
                     + (f"{r.after_other_s * 1e3:.2f} ms after the other process; " if r.after_other_s > 0 else "")
                     + f"half the blocks, {r.pairs} pairs)"))
    rows.append(("analytic fit", f"mean |error| {cal.fit.error_before * 100:.1f}% -> {cal.fit.error_after * 100:.1f}% "
                                 f"over {cal.fit.num_samples} block times"))
    return rows


def calibrated_for(topology: str, path: str | Path, *, world_size: int = 1) -> tuple[Topology, MeasuredCostModel]:
    """(topology with the measured link, cost model) for ``plan|simulate --calibration FILE``.

    ``topology`` is a preset or YAML path (``local``/empty: ``local-cpu:world_size``); it must
    contain the calibrated device type.
    """
    from pipetrain.topology import resolve_topology

    cal = load_calibration(path)
    topo = resolve_topology(topology if topology not in ("", "local") else f"local-cpu:{world_size}")
    if not any(d.type.name == cal.device_type for d in topo.devices):
        types = sorted({d.type.name for d in topo.devices})
        raise ConfigError(f"calibration {Path(path).name} is for device type {cal.device_type!r} but topology {topo.name} has "
                          f"{', '.join(types)}: run `pipetrain calibrate --topology {topo.name}` on that hardware")
    return calibrated_topology(topo, cal), MeasuredCostModel(cal)
