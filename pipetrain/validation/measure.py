"""What a run measured, in the terms the simulator predicts: medians over its steps.

:func:`measure_run` reads ``RUN_DIR/telemetry`` (one run, or several runs of the same plan pooled)
and takes, over the steps after the warm-up, the median of: step time (slowest rank), pipeline
span (first F to last B of the step), each stage's busy time (sum of its F/B/W) and its bubble
(idle share of the span), plus the peak bytes autograd saved for backward on each rank
(activations in flight) and the peak micro-batches in flight per stage; with tensor parallelism
or ZeRO, each stage's seconds of collectives inside its actions (the telemetry's ``tp_comm_s``
and ``zero_comm_s``). A stage's busy time leaves ZeRO's all-gather and reduce-scatter out: FSDP2
runs them inside the first forward and the last backward, the simulator as the stage's
data-parallel collective after the backward pass (its TP collectives are part of F and B on
both sides).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.plan import Plan

__all__ = ["Measured", "measure_run"]

_COMPUTE = ("F", "B", "W")


@dataclass(frozen=True, kw_only=True)
class Measured:
    """Medians over the measured steps (``steps``), per stage where it says so."""

    steps: tuple[int, ...]
    step_time_s: float
    pipeline_time_s: float
    busy_s_per_stage: tuple[float, ...]
    bubble_fraction_per_stage: tuple[float, ...]
    bubble_fraction: float
    peak_activation_bytes_per_rank: tuple[float, ...]
    peak_in_flight_per_stage: tuple[int, ...]
    step_time_iqr_s: tuple[float, float] = (0.0, 0.0)
    quiet_busy_s_per_stage: tuple[float, ...] = ()  # lower quartile over the steps (least disturbed by other load)
    #: per stage, seconds per step of the tensor-parallel collectives inside its F/B (empty: none measured)
    tp_comm_s_per_stage: tuple[float, ...] = ()
    #: per stage, seconds per step of ZeRO's all-gather and reduce-scatter inside its F/B (empty: none measured)
    zero_comm_s_per_stage: tuple[float, ...] = ()



def _lower_quartile(xs: Sequence[float]) -> float:
    return statistics.quantiles(xs, n=4)[0] if len(xs) >= 2 else xs[0]



def _read_steps(run_dir: str | Path, world: int, warmup_steps: int, first_key: int
                ) -> tuple[dict[int, dict[int, dict[str, Any]]], dict[int, list[dict[str, Any]]], list[int], list[int]]:
    """One run's step records and compute events keyed ``first_key + step``: (steps, events, complete, used)."""
    from pipetrain.executor.telemetry import read_telemetry

    recs = read_telemetry(run_dir)
    if not recs:
        raise RunError(f"{run_dir}/telemetry has no rank files: run with telemetry on (no --no-telemetry)")
    step_recs: dict[int, dict[int, dict[str, Any]]] = {}
    events: dict[int, list[dict[str, Any]]] = {}
    for rank, rs in recs.items():
        for r in rs:
            if r.get("type") == "step":
                step_recs.setdefault(first_key + int(r["step"]), {})[rank] = r
            elif r.get("type") == "event" and r["kind"] in _COMPUTE:
                events.setdefault(first_key + int(r["step"]), []).append(r)
    complete = sorted(k for k, v in step_recs.items() if len(v) == world and k in events)
    if not complete:
        raise RunError(f"{run_dir}: no step has telemetry from all {world} ranks")
    return step_recs, events, complete, complete[warmup_steps:] if len(complete) > warmup_steps else complete


def measure_run(run_dir: str | Path | Sequence[str | Path], plan: Plan, *, warmup_steps: int = 1) -> Measured:
    """Medians over the steps after ``warmup_steps`` (all steps if there are no more) of RUN_DIR's
    telemetry; several run directories of the same plan (runs spread over time, so that a drift of
    the machine's speed hits every configuration alike) pool their steps, each leaving out its own
    warm-up. ``steps`` then numbers them ``1_000_000 * run + step``."""
    dirs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    if not dirs:
        raise RunError("measure_run needs at least one run directory")
    world = plan.world_size
    step_recs: dict[int, dict[int, dict[str, Any]]] = {}
    events: dict[int, list[dict[str, Any]]] = {}
    complete: list[int] = []
    use: list[int] = []
    for i, d in enumerate(dirs):
        sr, ev, comp, used = _read_steps(d, world, warmup_steps, 1_000_000 * i)
        step_recs.update(sr)
        events.update(ev)
        complete += comp
        use += used
    n_st, pp, tp = plan.num_stages, plan.pp, plan.tp
    # a "lane" is one pipeline: replica d's pipeline ranks at tp rank t, global ranks (d*pp + p)*tp + t
    # (the executor's mesh order); each lane's stages are timed on their own, then averaged over lanes
    lanes = [(d, t) for d in range(plan.dp) for t in range(tp)]

    def grank(lane: tuple[int, int], p: int) -> int:
        return (lane[0] * pp + p) * tp + lane[1]

    steps_t: list[float] = []
    spans: list[float] = []
    busy: list[list[float]] = [[] for _ in range(n_st)]
    bub: list[list[float]] = [[] for _ in range(n_st)]
    tp_comm: list[list[float]] = [[] for _ in range(n_st)]
    zero_comm: list[list[float]] = [[] for _ in range(n_st)]
    for k in use:
        steps_t.append(max(float(r["step_time_s"]) for r in step_recs[k].values()))
        per_rep_span: list[float] = []
        per_stage: list[list[float]] = [[] for _ in range(n_st)]
        per_tp: list[list[float]] = [[] for _ in range(n_st)]
        per_zero: list[list[float]] = [[] for _ in range(n_st)]
        per_rank_busy: dict[int, float] = {}
        for lane in lanes:
            members = {grank(lane, p) for p in range(pp)}
            evs = [e for e in events[k] if e["rank"] in members]
            span = max(e["end_s"] for e in evs) - min(e["start_s"] for e in evs)
            per_rep_span.append(span)
            for s in range(n_st):
                mine = [e for e in evs if e["stage"] == s]
                z = sum(float(e.get("zero_comm_s") or 0.0) for e in mine)
                b = sum(e["end_s"] - e["start_s"] for e in mine) - z
                per_stage[s].append(b)
                per_tp[s].append(sum(float(e.get("tp_comm_s") or 0.0) for e in mine))
                per_zero[s].append(z)
                r = grank(lane, plan.stages[s].rank)
                per_rank_busy[r] = per_rank_busy.get(r, 0.0) + b
        span = statistics.fmean(per_rep_span)
        spans.append(span)
        for s in range(n_st):
            busy[s].append(statistics.fmean(per_stage[s]))
            tp_comm[s].append(statistics.fmean(per_tp[s]))
            zero_comm[s].append(statistics.fmean(per_zero[s]))
            ranks = [grank(lane, plan.stages[s].rank) for lane in lanes]
            bub[s].append(statistics.fmean(max(0.0, 1.0 - per_rank_busy[r] / sp) for r, sp in zip(ranks, per_rep_span)))
    peak_act = []  # per pipeline rank, as replica 0's tp rank 0 measured it
    for p in range(pp):
        r = grank((0, 0), p)
        peak_act.append(float(max(int(step_recs[k][r]["memory"].get("activation_bytes_peak", 0)) for k in complete)))
    in_flight = [0] * n_st
    for k in complete:
        for rec in step_recs[k].values():
            for s, v in rec.get("in_flight_peak", {}).items():
                in_flight[int(s)] = max(in_flight[int(s)], int(v))
    bubble_stage = tuple(statistics.median(b) for b in bub)
    rank_bubble = {plan.stages[s].rank: bubble_stage[s] for s in range(n_st)}
    q = statistics.quantiles(steps_t, n=4) if len(steps_t) >= 2 else [steps_t[0]] * 3
    return Measured(steps=tuple(use), step_time_s=statistics.median(steps_t), pipeline_time_s=statistics.median(spans),
                    busy_s_per_stage=tuple(statistics.median(b) for b in busy), bubble_fraction_per_stage=bubble_stage,
                    bubble_fraction=statistics.fmean(rank_bubble.values()), peak_activation_bytes_per_rank=tuple(peak_act),
                    peak_in_flight_per_stage=tuple(in_flight), step_time_iqr_s=(q[0], q[2]),
                    quiet_busy_s_per_stage=tuple(_lower_quartile(b) for b in busy),
                    tp_comm_s_per_stage=tuple(statistics.median(t) for t in tp_comm) if plan.tp > 1 else (),
                    zero_comm_s_per_stage=tuple(statistics.median(z) for z in zero_comm) if plan.zero > 0 else ())
