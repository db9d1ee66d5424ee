"""The executor's own overhead over the profiled blocks, measured on one rank.

A block profile times each block alone, in a tight loop. The executor runs the same blocks with
more around them: saved-tensor accounting, autograd bookkeeping of a stage's input, fresh data
every micro-batch, telemetry, the clip-norm and optimizer bookkeeping. :func:`measure_runtime_overhead`
runs the real executor with one rank (``pp = dp = 1``: no transfers, no other rank) at two
micro-batch counts ``m1 < m2`` and splits each step of its telemetry into the compute spans, the
end of step and the rest: ``factor`` = the spans' median share per micro-batch over the profile's
``sum(F + B)``, plus the growth of the rest with ``m`` (the host work between a micro-batch's
actions) over ``sum(F + B)``; ``end_of_step_s``: the median time from
the end of a step's last backward to the end of its optimizer step, from the run's telemetry
(gradient norms, clip, update, zeroing, in place: there the parameters, gradients and optimizer
state come from memory after a backward pass, not from the caches a loop over the same calls keeps
warm, so the update in a run is slower than such a loop; figures: benchmarks/RESULTS.md) and
``fixed_s``, the rest at ``m1``
less its per-micro-batch growth (per-step work besides: batches, bookkeeping). The host work at
the step boundary, from the end of a step's optimizer update to the first action of the next
(the loss, zeroing, telemetry records, the next batches, posting receives), is measured apart:
``between_steps_s`` at ``m1`` and ``between_steps_per_microbatch_s``, its growth with ``m``. In a
pipeline it is on the critical path whole (the first stage does it before its first forward and
every later stage waits), where work spread over the micro-batches would partly hide in the
bubbles, so the cost model adds it to each rank's step, not to the blocks. Medians over
steps, not of whole step times, so one slow step moves nothing.
The calibration stores them per model and shape; :class:`~pipetrain.calibration.measured.MeasuredCostModel`
scales the profiled block times by ``factor``, the optimizer fit by ``end_of_step_s`` over the
fit's own prediction for the model, and adds ``fixed_s`` to each rank's end-of-step work.
Nothing in it is fitted to a pipeline: it is measured without one.

:func:`measure_message_host_s` runs the same model as a two-rank pipeline too; besides the host
CPU per message it reads that run's own compute actions and messages (:func:`pipeline_action_costs`,
:func:`pipeline_message_latency`): what a wait costs the next action, the speed of two ranks
computing at once, the latency to a blocked receiver and its distribution (:func:`latency_jitter`:
the simulator samples it), the all-reduce of tied weights between the two ranks as the executor
runs it (:func:`pipeline_allreduce`), and the actions back to back over the profile,
which replaces ``factor``'s spans part in :meth:`~pipetrain.calibration.measured.Calibration.overhead_for`
(a one-rank run computes without a pause, a pipeline's ranks between waits; on a loaded machine
the one-rank run's spans came out several times slower than the pipeline's, figures:
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError

__all__ = ["RuntimeOverhead", "measure_runtime_overhead", "MessageHostCost", "measure_message_host_s", "PipelineActions",
           "pipeline_action_costs", "pipeline_message_latency", "pipeline_allreduce", "latency_jitter", "JITTER_QUANTILES", "HOT_GAP_S", "WAIT_GAP_S"]


@dataclass(frozen=True, kw_only=True)
class RuntimeOverhead:
    """Executor step time over the profile's prediction, one rank, for one model and shape."""

    model: str
    micro_batch_size: int
    seq_len: int
    factor: float
    fixed_s: float
    measured_step_s: tuple[float, float]
    profiled_microbatch_s: float
    num_microbatches: tuple[int, int]
    steps: int
    #: in the run: median seconds from the last backward's end to the optimizer step's end (0: not measured)
    end_of_step_s: float = 0.0
    param_count: int = 0  # the model's parameters, all on the one rank
    #: median seconds from the end of a step's optimizer update to the next step's first action, at m1,
    #: and its growth per micro-batch (0: not measured, an older calibration)
    between_steps_s: float = 0.0
    between_steps_per_microbatch_s: float = 0.0
    #: the compute spans' part of ``factor`` (the rest is the host work between a micro-batch's actions;
    #: 0: not recorded, an older calibration)
    span_factor: float = 0.0

    def __post_init__(self) -> None:
        if not (self.end_of_step_s >= 0 and self.param_count >= 0 and self.between_steps_s >= 0
                and self.between_steps_per_microbatch_s >= 0):
            raise ConfigError(f"runtime overhead of {self.model}: end of step and parameter count must be >= 0")
        if not self.factor > 0:
            raise ConfigError(f"runtime overhead factor of {self.model} must be > 0, got {self.factor}")


def measure_runtime_overhead(profile: Any, *, num_microbatches: tuple[int, int] = (2, 8), steps: int = 20,
                             warmup: int = 2, threads: int = 1, timeout_s: float = 120.0) -> RuntimeOverhead:
    """One-rank executor run of ``profile``'s model and shape (module docstring)."""
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.plans import simple_plan
    from pipetrain.planner.trace import trace_graph

    if steps <= warmup:
        raise ConfigError(f"runtime overhead needs more steps ({steps}) than warm-up steps ({warmup})")
    m1, m2 = num_microbatches
    if not 1 <= m1 < m2:
        raise ConfigError(f"runtime overhead needs two micro-batch counts 1 <= m1 < m2, got {num_microbatches}")
    p = profile
    graph = trace_graph(p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype)
    params = sum(n.param_count for n in graph.nodes)
    per_mb = sum(b.fwd_s + b.bwd_s for b in p.blocks)
    runs = []
    for m in (m1, m2):
        plan = simple_plan(p.model, pp=1, m=m, mbs=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype)
        with tempfile.TemporaryDirectory(prefix="pipetrain-overhead-") as tmp:
            plan_path = plan.save(Path(tmp) / "plan.json")
            res = launch(RunConfig(plan_path=str(plan_path), run_dir=str(Path(tmp) / "run"), steps=steps, threads=threads,
                                   timeout_s=timeout_s))
            runs.append((m, _step_parts(Path(tmp) / "run", warmup), statistics.median(res.step_times_s[warmup:])))
    # (period, busy, end of step, between steps) per step: the spans' share per micro-batch, pooled over both runs
    span_factor = statistics.median(b / (m * per_mb) for m, parts, _ in runs for _, b, _, _ in parts)
    end = statistics.median(e for _, parts, _ in runs for _, _, e, _ in parts)
    between = [statistics.median(w for _, _, _, w in parts) for _, parts, _ in runs]
    outside = [statistics.median(t - b - e - w for t, b, e, w in parts) for _, parts, _ in runs]
    gap = max(0.0, (outside[1] - outside[0]) / (m2 - m1))  # between a micro-batch's actions: grows with m
    factor = max(span_factor + gap / per_mb, 1e-3)
    fixed = max(0.0, outside[0] - m1 * gap)
    grow = max(0.0, (between[1] - between[0]) / (m2 - m1))
    return RuntimeOverhead(model=p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, factor=factor, fixed_s=fixed,
                           measured_step_s=(runs[0][2], runs[1][2]), profiled_microbatch_s=per_mb, num_microbatches=(m1, m2),
                           steps=steps, end_of_step_s=end, param_count=params, between_steps_s=max(0.0, between[0] - m1 * grow),
                           between_steps_per_microbatch_s=grow, span_factor=span_factor)


def _step_parts(run_dir: Path, warmup: int) -> list[tuple[float, float, float, float]]:
    """Per step after ``warmup`` with a next step: (its period: first action to the next step's first
    action, seconds in F/B/W spans, from the end of the last of them to the end of the OPT event,
    from the end of the OPT event to the next step's first action)."""
    from pipetrain.executor.telemetry import read_telemetry

    out = []
    for _rank, recs in read_telemetry(run_dir).items():
        busy: dict[int, float] = {}
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        opt: dict[int, float] = {}
        for e in recs:
            if e["type"] != "event" or e.get("step", -1) < warmup:
                continue
            k = e["step"]
            first[k] = min(first.get(k, e["start_s"]), e["start_s"])
            if e["kind"] in ("F", "B", "W"):
                busy[k] = busy.get(k, 0.0) + e["end_s"] - e["start_s"]
                last[k] = max(last.get(k, 0.0), e["end_s"])
            elif e["kind"] == "OPT":
                opt[k] = e["end_s"]
        out += [(first[k + 1] - first[k], busy[k], opt[k] - last[k], first[k + 1] - opt[k])
                for k in sorted(opt) if k in last and k + 1 in first]
    if not out:
        raise ConfigError(f"{run_dir}: no two complete steps after step {warmup}")
    return out


@dataclass(frozen=True, kw_only=True)
class MessageHostCost:
    """Host CPU seconds per point-to-point message a rank sends or receives (see :func:`measure_message_host_s`)."""

    model: str
    micro_batch_size: int
    seq_len: int
    host_s: float
    #: per rank and step: (CPU outside the compute spans with one rank, with two), seconds
    outside_one_rank_s: float
    outside_two_ranks_s: tuple[float, ...]
    messages_per_rank: int
    #: the same two-rank run's compute actions, as the simulator's compute groups price them
    #: (:func:`pipeline_action_costs`): the total span over the profile of the actions that follow
    #: another at once, the extra seconds of an action after a wait, and how many actions of each
    #: kind were measured (0: not measured, an older calibration)
    pipeline_hot_ratio: float = 0.0
    pipeline_resume_s: float = 0.0
    pipeline_hot_actions: int = 0
    pipeline_waited_actions: int = 0
    #: the same run's speed of a rank while both compute (0: too few co-running actions)
    pipeline_corun_speed: float = 0.0
    pipeline_corun_actions: int = 0
    #: the same run's latency of a message to a blocked receiver (:func:`pipeline_message_latency`; 0: none)
    pipeline_latency_s: float = 0.0
    pipeline_latency_messages: int = 0
    #: their distribution: :data:`JITTER_QUANTILES` quantiles over the mean (:func:`latency_jitter`; empty: not measured)
    pipeline_latency_jitter: tuple[float, ...] = ()
    #: the same run's all-reduce of the tied weights' gradient between its two ranks (:func:`pipeline_allreduce`):
    #: seconds, at that many bytes, over that many steps (0: not measured)
    pipeline_allreduce_s: float = 0.0
    pipeline_allreduce_bytes: int = 0
    pipeline_allreduce_steps: int = 0


#: an action that starts within this long of its rank's previous action ran "right after another"
HOT_GAP_S = 1e-4
#: an action that starts this long or longer after its rank's previous action ran "after a wait":
#: the simulator's threshold for the extra compute after a wait (``ComputeGroup.resume_after_s``)
WAIT_GAP_S = 1e-3
#: an action counts as computing alone below this share of its span overlapped by other ranks'
#: actions, and as co-running from this share up
ALONE_OVERLAP, CORUN_OVERLAP = 0.1, 0.5
#: fewest co-running actions for a co-run speed (fewer: not measured)
MIN_CORUN_ACTIONS = 8


@dataclass(frozen=True, kw_only=True)
class PipelineActions:
    """What a pipeline's compute actions cost against their profile (see :func:`pipeline_action_costs`)."""

    hot_ratio: float
    resume_s: float
    hot_actions: int
    waited_actions: int
    corun_speed: float = 0.0  # 0: too few co-running actions
    corun_actions: int = 0


def _overlap_s(a: float, b: float, spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, e) - max(a, s)) for s, e in spans if e > a and s < b)


def pipeline_action_costs(records: dict[int, list[dict[str, Any]]], profiled_s: dict[tuple[int, str], float], *,
                          warmup: int, hot_gap_s: float = HOT_GAP_S, wait_gap_s: float = WAIT_GAP_S,
                          min_corun: int = MIN_CORUN_ACTIONS) -> PipelineActions | None:
    """The F and B actions of a real pipeline run (telemetry ``records`` per rank) against their
    profiled seconds ``profiled_s[(stage, kind)]``, priced as the simulator's compute groups price
    them. Each action has a gap (from its rank's previous compute action in the same step to its
    start; the first action of a step follows the step's boundary work and is left out) and an
    overlap (the share of its span during which another rank computed):

    * ``hot_ratio``: the actions computing alone with a gap under ``hot_gap_s`` (back to back, as
      the profile runs them): their total span over their total profile;
    * ``resume_s``: the mean of ``span - hot_ratio * profiled`` over the actions computing alone
      with a gap of ``wait_gap_s`` or more (their rank waited for a message or a buffer): what a
      wait costs the next action in this pipeline (the simulator's ``resume_s``);
    * ``corun_speed``: the speed of a rank while both compute (the simulator's ``speed[1]``), from
      the co-running actions: their total extra time ``span - resume - hot_ratio * profiled`` over
      their total work while overlapped ``hot_ratio * profiled * overlap`` is the slowdown, and
      ``1 / (1 + slowdown)`` the speed (the time-sliced simulator stretches overlapped work so).

    All come from one run, so a drift of the machine's speed between windows cancels in them. Totals
    and means, not medians: a step is the sum of the actions and messages on its critical path, and where other
    processes share the cores these have heavy tails (an action or a wake-up now and then held back
    by milliseconds); the typical step of such a sum is near the sum of their means, where the sum of
    their medians leaves the tails out (figures: benchmarks/RESULTS.md). The
    probes of :mod:`pipetrain.calibration.corun` measure the same two costs with one process that
    sleeps and with processes that compute without a pause; a pipeline's ranks wait for each other's
    messages and compute about half the time. None when hot or waited actions are missing."""
    hot: list[tuple[float, float]] = []  # (span, profiled)
    acts: list[tuple[float, float, float, float]] = []  # (span, profiled, gap, overlap share)
    computing = {r: [(e["start_s"], e["end_s"]) for e in recs if e.get("type") == "event" and e.get("kind") in ("F", "B", "W")]
                 for r, recs in records.items()}
    for r, recs in records.items():
        others = [sp for q, spans in computing.items() if q != r for sp in spans]
        seq = sorted((e for e in recs if e.get("type") == "event" and e.get("kind") in ("F", "B", "W", "OPT")),
                     key=lambda e: e["start_s"])
        prev: dict[str, Any] | None = None
        for e in seq:
            before, prev = prev, e
            if e["kind"] not in ("F", "B") or e["step"] < warmup or before is None or before["step"] != e["step"]:
                continue
            base = profiled_s.get((e["stage"], e["kind"]), 0.0)
            span = e["end_s"] - e["start_s"]
            if not (base > 0 and span > 0):
                continue
            gap = e["start_s"] - before["end_s"]
            ov = _overlap_s(e["start_s"], e["end_s"], others) / span
            acts.append((span, base, gap, ov))
            if gap < hot_gap_s and ov < ALONE_OVERLAP:
                hot.append((span, base))
    waited_alone = [(span, base) for span, base, gap, ov in acts if gap >= wait_gap_s and ov < ALONE_OVERLAP]
    if not hot or not waited_alone:
        return None
    ratio = sum(span for span, _ in hot) / sum(base for _, base in hot)
    resume = max(0.0, statistics.fmean(span - ratio * base for span, base in waited_alone))
    co = [(span - (resume if gap >= wait_gap_s else 0.0) - ratio * base, ratio * base * ov)
          for span, base, gap, ov in acts if ov >= CORUN_OVERLAP]
    speed = 0.0
    if len(co) >= min_corun:
        slowdown = sum(extra for extra, _ in co) / sum(shared for _, shared in co)
        speed = min(1.0, max(0.05, 1.0 / (1.0 + slowdown)))  # co-running faster than alone is noise: 1
    return PipelineActions(hot_ratio=ratio, resume_s=resume, hot_actions=len(hot), waited_actions=len(waited_alone),
                           corun_speed=speed, corun_actions=len(co) if speed else 0)


def pipeline_message_latency(records: dict[int, list[dict[str, Any]]], *, warmup: int) -> tuple[float, int, tuple[float, ...]]:
    """(mean seconds, count, each latency over the mean) from a SEND's start to the end of its RECV's
    wait, over the messages of a real pipeline run (telemetry ``records`` per rank) whose receiver
    was blocked on them: its rank's last compute action ended before the send started. That is the
    latency the simulator gives a message to a blocked receiver (the link's ``latency_s``), measured
    where a pipeline's receivers block: on a core that went idle while the sender computed. A mean,
    as :func:`pipeline_action_costs`'s figures are; the ratios (in the records' order) give its
    distribution (:func:`latency_jitter`). ``(0.0, 0, ())`` when none."""
    sends: dict[tuple[int, int, int], list[tuple[float, int]]] = {}  # (step, mb, to stage) -> [(start, from stage)]
    for recs in records.values():
        for e in recs:
            if e.get("type") == "event" and e.get("kind") == "SEND" and e["step"] >= warmup:
                for to in (e["stage"] - 1, e["stage"] + 1):
                    sends.setdefault((e["step"], e["microbatch"], to), []).append((e["start_s"], e["stage"]))
    lat = []
    for recs in records.values():
        ends = sorted(e["end_s"] for e in recs if e.get("type") == "event" and e.get("kind") in ("F", "B", "W", "OPT"))
        for e in recs:
            if not (e.get("type") == "event" and e.get("kind") == "RECV" and e["step"] >= warmup):
                continue
            cands = [t for t, _ in sends.get((e["step"], e["microbatch"], e["stage"]), []) if t <= e["end_s"]]
            if not cands:
                continue
            sent = max(cands)
            idle_since = max((t for t in ends if t <= e["end_s"]), default=None)
            if idle_since is not None and idle_since <= sent:
                lat.append(e["end_s"] - sent)
    if not lat:
        return 0.0, 0, ()
    mean = statistics.fmean(lat)
    return mean, len(lat), tuple(t / mean for t in lat) if mean > 0 else ()


def pipeline_allreduce(records: dict[int, list[dict[str, Any]]], *, warmup: int) -> tuple[float, int, int]:
    """(median seconds, steps, bytes) of an all-reduce among the pipeline's ranks as the executor runs
    it after the backward pass (the tied embedding/head's gradient, telemetry ``ALLREDUCE``): per
    step after ``warmup`` where every rank ran one of the same size, the span of the rank that
    entered last, whose partners were already waiting, so the span is the collective's own cost
    and none of the pipeline's skew. ``(0.0, 0, 0)`` without such steps (a model without ties)."""
    per_step: dict[int, list[dict[str, Any]]] = {}
    for recs in records.values():
        for e in recs:
            if e.get("type") == "event" and e.get("kind") == "ALLREDUCE" and e["step"] >= warmup:
                per_step.setdefault(e["step"], []).append(e)
    spans, sizes = [], set()
    for evs in per_step.values():
        if len(evs) == len(records) >= 2 and len({e["bytes"] for e in evs}) == 1:
            last = max(evs, key=lambda e: e["start_s"])
            spans.append(last["end_s"] - last["start_s"])
            sizes.add(int(last["bytes"]))
    if not spans or len(sizes) != 1:
        return 0.0, 0, 0
    return statistics.median(spans), len(spans), sizes.pop()


#: a latency distribution is kept as this many quantiles (multipliers of the mean)
JITTER_QUANTILES = 32


def latency_jitter(ratios: list[float] | tuple[float, ...], k: int = JITTER_QUANTILES) -> tuple[float, ...]:
    """``k`` quantiles (at the midpoints ``(i + 1/2) / k``, nearest rank) of latencies given as
    ratios to their mean, scaled to average exactly 1 and rounded to 4 decimals: drawing uniformly
    among them reproduces the measured distribution's shape around the link's mean latency
    (``Link.latency_jitter``). A blocked receiver's latency on shared CPU cores is bimodal: most
    messages in tens of microseconds, a sixth or so near a millisecond (a descheduled receiver;
    benchmarks/RESULTS.md), so the mean alone misstates a pipeline's critical path. Empty without
    ratios or when all are 0."""
    xs = sorted(ratios)
    if not xs or k < 1:
        return ()
    q = [xs[min(len(xs) - 1, int((i + 0.5) / k * len(xs)))] for i in range(k)]
    mean = sum(q) / k
    if mean <= 0:
        return ()
    return tuple(round(v / mean, 4) for v in q)


def _median_actions(runs: list[PipelineActions]) -> PipelineActions | None:
    """Each figure of :class:`PipelineActions` as its median over ``runs`` (counts summed); the
    co-run speed over the runs that measured one. None without runs."""
    if not runs:
        return None
    corun = [a for a in runs if a.corun_speed > 0]
    return PipelineActions(hot_ratio=statistics.median(a.hot_ratio for a in runs), resume_s=statistics.median(a.resume_s for a in runs),
                           hot_actions=sum(a.hot_actions for a in runs), waited_actions=sum(a.waited_actions for a in runs),
                           corun_speed=statistics.median(a.corun_speed for a in corun) if corun else 0.0,
                           corun_actions=sum(a.corun_actions for a in corun))


def _outside_spans_s(run_dir: Path, warmup: int) -> list[float]:
    """Per rank: median over the steps after ``warmup`` of the process's CPU time outside its compute spans
    (their thread CPU time where the telemetry has it, else their wall time)."""
    from pipetrain.executor.telemetry import read_telemetry

    out = []
    for _rank, recs in sorted(read_telemetry(run_dir).items()):
        spans: dict[int, float] = {}
        for e in recs:
            if e["type"] == "event" and e["kind"] in ("F", "B", "W", "OPT"):
                # the span's own CPU where recorded: on shared cores a span's wall time also holds the
                # time it waited for a core, which is no CPU of the process's (its CPU less the spans'
                # walls came out negative under load)
                spans[e["step"]] = spans.get(e["step"], 0.0) + e.get("cpu_s", e["end_s"] - e["start_s"])
        gaps = [r["cpu_process_s"] - spans.get(r["step"], 0.0) for r in recs
                if r["type"] == "step" and r["step"] >= warmup and "cpu_process_s" in r]
        if not gaps:
            raise ConfigError(f"{run_dir}: no step records with CPU times after step {warmup}")
        out.append(statistics.median(gaps))
    return out


def measure_message_host_s(profile: Any, *, num_microbatches: int = 8, steps: int = 30, warmup: int = 2, threads: int = 1,
                           timeout_s: float = 120.0, pipeline_runs: int = 3) -> MessageHostCost:
    """Host CPU per message: the executor on one rank and on two (a 1F1B pipeline of the same model,
    shape and ``m``), each rank's CPU time (all its threads) outside its F/B/OPT spans per step.

    With two ranks each rank runs ``m`` F and ``m`` B, as the single rank does, and in addition
    sends ``m`` messages and receives ``m``; so ``host_s = (outside(two) - outside(one)) / 2m``,
    averaged over the two ranks. It is the posting, copying and completing of messages that gloo's
    and the executor's host code do, which holds a CPU core (:attr:`SimInput.t_message_host_s`).
    The two-rank run also gives what a wait costs the next action in a pipeline and the speed of two
    ranks computing at once (:func:`pipeline_action_costs`), and the latency of a message to a
    blocked receiver (:func:`pipeline_message_latency`). Its ``steps`` give those means a few
    hundred actions and messages: under load they have heavy tails, and the run costs a second or two.
    The two-rank pipeline is launched ``pipeline_runs`` times and each figure is the median over
    the launches: on shared cores a launch of the same plan lands in a slow or a fast regime as a
    whole (its blocked-receiver latency and co-run speed both move, by about 2x and 1.5x; figures:
    benchmarks/RESULTS.md), so one launch would calibrate whichever regime it happened to get.
    """
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.plans import simple_plan

    if steps <= warmup:
        raise ConfigError(f"message host cost needs more steps ({steps}) than warm-up steps ({warmup})")
    if pipeline_runs < 1:
        raise ConfigError(f"message host cost needs at least one two-rank pipeline run, got {pipeline_runs}")
    p = profile
    from pipetrain.executor.telemetry import read_telemetry

    outside: list[list[float]] = []
    runs_actions: list[PipelineActions] = []
    latencies: list[tuple[float, int]] = []
    ratios: list[float] = []  # each launch's latencies over its own mean, pooled: the shape, not the regime's level
    allreduces: list[tuple[float, int, int]] = []
    for pp in (1, *([2] * pipeline_runs)):
        plan = simple_plan(p.model, pp=pp, m=num_microbatches, mbs=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype)
        with tempfile.TemporaryDirectory(prefix="pipetrain-msgcost-") as tmp:
            plan_path = plan.save(Path(tmp) / "plan.json")
            launch(RunConfig(plan_path=str(plan_path), run_dir=str(Path(tmp) / "run"), steps=steps, threads=threads,
                             timeout_s=timeout_s))
            outside.append(_outside_spans_s(Path(tmp) / "run", warmup))
            if pp == 2:
                profiled = {}
                for st in plan.stages:
                    blocks = p.blocks[st.block_start:st.block_end]
                    profiled[(st.index, "F")] = sum(b.fwd_s for b in blocks)
                    profiled[(st.index, "B")] = sum(b.bwd_s for b in blocks)
                recs = read_telemetry(Path(tmp) / "run")
                got = pipeline_action_costs(recs, profiled, warmup=warmup)
                if got is not None:
                    runs_actions.append(got)
                mean, count, rel = pipeline_message_latency(recs, warmup=warmup)
                if count:
                    latencies.append((mean, count))
                    ratios.extend(rel)
                ar = pipeline_allreduce(recs, warmup=warmup)
                if ar[1]:
                    allreduces.append(ar)
    actions = _median_actions(runs_actions)
    latency = (statistics.median(t for t, _ in latencies), sum(n for _, n in latencies)) if latencies else (0.0, 0)
    # per rank, the median over the pipeline launches of its CPU outside the spans
    outside = [outside[0], [statistics.median(run[r] for run in outside[1:]) for r in range(len(outside[1]))]]
    one, two = outside[0][0], tuple(outside[1])
    msgs = 2 * num_microbatches
    host = max(0.0, statistics.mean(t - one for t in two) / msgs)
    extra: dict[str, Any] = {"pipeline_latency_s": latency[0], "pipeline_latency_messages": latency[1],
                             "pipeline_latency_jitter": latency_jitter(ratios)}
    if allreduces:  # the launches ran the same plan: one size
        extra |= {"pipeline_allreduce_s": statistics.median(t for t, _, _ in allreduces), "pipeline_allreduce_bytes": allreduces[0][2],
                  "pipeline_allreduce_steps": sum(n for _, n, _ in allreduces)}
    extra |= {} if actions is None else {
        "pipeline_hot_ratio": actions.hot_ratio, "pipeline_resume_s": actions.resume_s,
        "pipeline_hot_actions": actions.hot_actions, "pipeline_waited_actions": actions.waited_actions,
        "pipeline_corun_speed": actions.corun_speed, "pipeline_corun_actions": actions.corun_actions}
    return MessageHostCost(model=p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, host_s=host,
                           outside_one_rank_s=one, outside_two_ranks_s=two, messages_per_rank=msgs, **extra)
