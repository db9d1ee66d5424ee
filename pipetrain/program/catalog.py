"""Which schedules run, which the planner picks by itself, and how many micro-batches each holds.

The one home of the schedule catalogue and of the in-flight formulas:

* :data:`RUNNABLE_SCHEDULES`: what the executor runs (the planner searches these; any other
  schedule makes a simulation-only plan). :data:`AUTO_SCHEDULES` / :data:`AUTO_SCHEDULES_CPU`:
  what the planner chooses without being asked, on GPU and on CPU ranks.
* :func:`in_flight_1f1b`, :func:`interleaved_in_flight`, :func:`zb_h1_held_bound` and
  :func:`held_in_flight`: each stage's peak micro-batches in flight, the first three without
  building the schedule's action lists (which dominates the planner's cost for large ``m``);
  tests check them against :func:`pipetrain.schedules.peak_in_flight`.
* :func:`pool_sizes`: the receive-buffer pools the executor allocates for a schedule.
* :data:`EXECUTOR_COMBINATIONS` and :func:`executor_supports`: which (schedule, tp, zero,
  recompute) combinations the executor runs; its pre-launch check refuses any other, and the
  planner is to search only these.

Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipetrain.schedules import SCHEDULE_NAMES, SPLIT_BACKWARD_SCHEDULES, Schedule, make_schedule, peak_in_flight, peak_pending_wgrad

__all__ = ["RUNNABLE_SCHEDULES", "AUTO_SCHEDULES", "AUTO_SCHEDULES_CPU", "auto_schedules", "in_flight_1f1b",
           "interleaved_in_flight", "interleaved_rule", "zb_h1_held_bound", "zb_h1_held_bounds",
           "held_in_flight", "rank_peak_in_flight", "rank_peak_activation_bytes",
           "pool_sizes", "ExecutorCombination", "EXECUTOR_COMBINATIONS", "executor_supports"]

#: What the executor runs. zb-h1 runs with the backward split into an input-gradient pass (B) and a
#: weight-gradient pass (W): the linear layers' weight gradients deferred, or for stages with
#: convolutions the generic autograd graph split.
RUNNABLE_SCHEDULES: tuple[str, ...] = SCHEDULE_NAMES
#: Schedules the planner picks without being asked on GPUs. zb-h1's and zbv's I+W cost what one
#: backward does since the linear layers' weight gradients are deferred, so they are chosen whenever
#: they simulate fastest; dualpipev's pairs are priced serially (F + B, their messages overlapping
#: the other half), so it wins where a model has communication to hide.
AUTO_SCHEDULES: tuple[str, ...] = SCHEDULE_NAMES
#: The same on CPU ranks: zb-h1, zbv and dualpipev only when pinned, or when the cost model measured the executor's
#: own overheads (``--calibration``). Small models on CPU are dominated by per-action dispatch and
#: per-message host work that the analytic and profiled cost models do not charge, and zb-h1's
#: extra W actions can then cost more than its bubble saves.
AUTO_SCHEDULES_CPU: tuple[str, ...] = tuple(s for s in SCHEDULE_NAMES if s not in ("zb-h1", "zbv", "dualpipev"))


def auto_schedules(runnable: tuple[str, ...], device_kind: str = "gpu") -> tuple[str, ...]:
    """The runnable schedules the planner may choose on its own on devices of ``device_kind``
    ("gpu" | "cpu": CPU ranks without measured executor overheads; see :data:`AUTO_SCHEDULES_CPU`)."""
    auto = AUTO_SCHEDULES_CPU if device_kind == "cpu" else AUTO_SCHEDULES
    return tuple(s for s in runnable if s in auto)


def in_flight_1f1b(p: int, m: int, caps: list[int] | None = None) -> tuple[int, ...]:
    """Peak in flight per stage of :func:`pipetrain.schedules.one_f_one_b`: its warm-up recurrence.

    Stage ``s`` warms up with ``min(p-1-s, m, caps[s]-1, warm-up of stage s-1)`` forwards, then
    alternates F and B, so ``min(warm-up + 1, m)`` micro-batches are in flight at its peak.
    """
    out, prev = [], m
    for st in range(p):
        warm = min(p - 1 - st, m, (caps[st] if caps else 1 << 60) - 1, prev)
        prev = warm
        out.append(min(warm + 1, m))
    return tuple(out)


def zb_h1_held_bound(p: int, m: int, caps: list[int] | None = None) -> tuple[int, ...]:
    """An upper bound on what ZB-H1 holds per stage: ``min(p-s, m, caps[s]) + min(s+2, m)``.

    :func:`pipetrain.schedules.zb_h1` starts an F only while fewer than ``min(p-s, buffers)``
    micro-batches wait for their B, and runs a W first once more than ``s`` wait for theirs
    (one more may finish meanwhile). Building the schedule (list scheduling, then the
    communication actions) costs far more than the partition, so the planner plans memory with
    this bound and uses the schedule's exact counts for the points it simulates (a test checks
    the bound against the generator).
    """
    fb, w = zb_h1_held_bounds(p, m, caps)
    return tuple(a + b for a, b in zip(fb, w))


def zb_h1_held_bounds(p: int, m: int, caps: list[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """:func:`zb_h1_held_bound`'s two parts per stage: F done and I not, ``min(p-s, m, caps[s])``;
    I done and W not, ``min(s+2, m)`` (what W needs is less than a whole activation)."""
    return (tuple(min(p - s, m, caps[s] if caps else 1 << 60) for s in range(p)), tuple(min(s + 2, m) for s in range(p)))


def _interleaved_order_peaks(p: int, m: int, v: int, full_warmup_when_m_is_p: bool) -> tuple[int, ...]:
    total = m * v
    peak = [0] * (p * v)
    for r in range(p):
        warm = total if (full_warmup_when_m_is_p and m == p) else min(2 * (p - 1 - r) + (v - 1) * p, total)
        cur = [0] * v
        nf = nb = 0
        for step in range(total + (total - warm)):
            if step < warm or (step - warm) % 2 == 0:  # warm-up forwards, then F/B pairs
                if nf >= total:
                    continue
                ch = (nf % (p * v)) // p
                cur[ch] += 1
                peak[ch * p + r] = max(peak[ch * p + r], cur[ch])
                nf += 1
            else:
                cur[v - 1 - (nb % (p * v)) // p] -= 1
                nb += 1
    return tuple(peak)


_RULE: list[bool | None] = []


def interleaved_rule() -> bool | None:
    """Which warm-up rule :func:`pipetrain.schedules.interleaved` uses, checked once on small cases.

    Megatron-LM warms up fully when ``m == p``; torch.distributed.pipelining does not. The
    replay below supports both; None (no rule matches) makes the planner build real schedules.
    """
    if not _RULE:
        cases = [(2, 2, 2), (3, 3, 2), (2, 4, 2), (4, 8, 3), (3, 6, 2)]
        found = None
        for rule in (True, False):
            if all(_interleaved_order_peaks(p, m, v, rule) == peak_in_flight(make_schedule("interleaved", p, m, v))
                   for p, m, v in cases):
                found = rule
                break
        _RULE.append(found)
    return _RULE[0]


def interleaved_in_flight(p: int, m: int, v: int) -> tuple[int, ...]:
    """Peak in flight per virtual stage of :func:`pipetrain.schedules.interleaved`, from its order alone.

    Replays the generator's per-rank order (warm-up forwards, then F/B pairs, then the rest of
    the backwards), counting only, without building the action lists (tests check equality).
    """
    rule = interleaved_rule()
    if rule is None:
        return peak_in_flight(make_schedule("interleaved", p, m, v))
    return _interleaved_order_peaks(p, m, v, rule)


def held_in_flight(schedule: Schedule) -> tuple[int, ...]:
    """Per stage, the micro-batches whose activations the memory model must hold at peak.

    ``peak_in_flight`` (F done, B not); with a split backward also the peak of B done, W not
    (the simulator reports the sum of both peaks, so the planner plans for it).
    """
    held = peak_in_flight(schedule)
    if schedule.split_backward:
        held = tuple(a + b for a, b in zip(held, peak_pending_wgrad(schedule)))
    return tuple(held)


def rank_peak_in_flight(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most (stage, micro-batch) activations held at one instant of its own order: F
    done, backward (B or I) not, summed over the rank's stages. With two half-size chunks per rank
    (the V schedules) ``2p`` here is 1F1B's ``p`` whole-stage micro-batches: the same bytes."""
    return tuple(int(x) for x in _rank_peaks(schedule, [1.0] * schedule.num_stages))


def rank_peak_activation_bytes(schedule: Schedule, stage_bytes: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Per rank, the most activation bytes held at one instant of its own order, a micro-batch of
    stage ``s`` holding ``stage_bytes[s]`` from its F to its backward (B or I). The sum of each
    stage's own peak over-counts a rank whose stages peak at different moments (ZB-V's do)."""
    if len(stage_bytes) != schedule.num_stages:
        raise ValueError(f"stage_bytes has {len(stage_bytes)} values for {schedule.num_stages} stages")
    return _rank_peaks(schedule, stage_bytes)


def _rank_peaks(schedule: Schedule, w: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    out = []
    for acts in schedule.actions:
        cur = peak = 0.0
        for a in acts:
            if a.kind == "F":
                cur += w[a.stage]
                peak = max(peak, cur)
            elif a.kind in ("B", "I"):
                cur -= w[a.stage]
        out.append(peak)
    return tuple(out)


def pool_sizes(schedule: Schedule, buffers: tuple[int, ...] | list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input-activation slots, output-gradient slots) per stage, as the executor allocates them.

    A stage keeps ``buffers[s]`` slots of each. With a split backward a micro-batch keeps its input
    from its B until its W, so the activation pool also gets the schedule's peak of micro-batches
    waiting for their W.
    """
    stash = peak_pending_wgrad(schedule)
    return tuple(int(b) + int(w) for b, w in zip(buffers, stash)), tuple(int(b) for b in buffers)


@dataclass(frozen=True, kw_only=True)
class ExecutorCombination:
    """One row of what the executor runs: any of ``schedules`` with any of ``zero`` and ``recompute``,
    with tensor parallelism (``tp > 1``) when ``tensor_parallel``, else with ``tp == 1``."""

    schedules: tuple[str, ...]
    tensor_parallel: bool
    zero: tuple[int, ...]
    recompute: tuple[str, ...]


#: What the executor runs (schedule x tp x zero x recompute), the one place that says so; the
#: executor's pre-launch check (:func:`executor_supports`) refuses anything else. Recompute is
#: layer by layer under ``torch.utils.checkpoint``: whole blocks (``full``) or the attention core
#: (``selective``), the stage's first ``recompute_layers`` blocks. Why the gaps:
#:
#: * a split backward (zb-h1, zbv, dualpipev) cannot replay a checkpointed graph in two halves;
#: * ZeRO is FSDP2 (``fully_shard`` over dp): one FSDP unit per stage, so one stage per rank (not
#:   interleaved or the V schedules), and the split backward's deferred weight gradients would
#:   bypass FSDP's post-backward;
#: * tensor parallelism (``parallelize_module``) runs with a full backward: the deferred weight
#:   gradients of the split backward are not DTensor-aware; with several stages per rank
#:   (interleaved) only without ZeRO (one FSDP unit per rank).
EXECUTOR_COMBINATIONS: tuple[ExecutorCombination, ...] = (
    ExecutorCombination(schedules=("gpipe", "1f1b", "interleaved"), tensor_parallel=False, zero=(0,),
                        recompute=("none", "selective", "full")),
    ExecutorCombination(schedules=SPLIT_BACKWARD_SCHEDULES, tensor_parallel=False, zero=(0,), recompute=("none",)),
    ExecutorCombination(schedules=("gpipe", "1f1b"), tensor_parallel=False, zero=(1, 2, 3), recompute=("none", "selective", "full")),
    ExecutorCombination(schedules=("gpipe", "1f1b"), tensor_parallel=True, zero=(0, 1, 2, 3), recompute=("none", "selective", "full")),
    ExecutorCombination(schedules=("interleaved",), tensor_parallel=True, zero=(0,), recompute=("none", "selective", "full")),
)


def executor_supports(schedule: str, tp: int = 1, zero: int = 0, recompute: str = "none") -> str | None:
    """None when the executor runs this combination, else why not and what to change."""
    rows = [c for c in EXECUTOR_COMBINATIONS if schedule in c.schedules and c.tensor_parallel == (tp > 1)]
    if any(zero in c.zero and recompute in c.recompute for c in rows):
        return None
    what = f"schedule {schedule} with tp={tp}, zero={zero}, recompute {recompute}"
    if schedule not in SCHEDULE_NAMES:
        return f"schedule {schedule!r} is unknown; choose one of {', '.join(SCHEDULE_NAMES)}"
    if not any(zero in c.zero for c in EXECUTOR_COMBINATIONS):
        done = ", ".join(str(z) for z in sorted({z for c in EXECUTOR_COMBINATIONS for z in c.zero}))
        return f"the executor does not run {what}: ZeRO-{zero} is not implemented; use zero {done}"
    if not rows:
        ok = sorted({s for c in EXECUTOR_COMBINATIONS if c.tensor_parallel == (tp > 1) for s in c.schedules}, key=SCHEDULE_NAMES.index)
        return f"the executor does not run {what}: with tp={tp} use schedule {' or '.join(ok)}"
    allowed = "; ".join(f"zero {'/'.join(map(str, c.zero))} with recompute {'/'.join(c.recompute)}" for c in rows)
    others = sorted({s for c in EXECUTOR_COMBINATIONS if c.tensor_parallel == (tp > 1) and zero in c.zero and recompute in c.recompute
                     for s in c.schedules}, key=SCHEDULE_NAMES.index)
    alt = f", or schedule {' or '.join(others)}" if others else ""
    return f"the executor does not run {what}: with {schedule} and tp={tp} it runs {allowed}{alt}"
