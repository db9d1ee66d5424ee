"""The outer search's grid: candidate points, runnable schedules, and in-flight counts per schedule.

:func:`grid` enumerates the discrete (pp, dp, micro-batch size, schedule, chunks) points a job
allows; :func:`in_flight_1f1b` and :func:`interleaved_in_flight` give each stage's peak number
of micro-batches in flight without building the schedule's action lists (which dominates the
cost for large ``m``); tests check both against :func:`pipetrain.schedules.peak_in_flight`.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipetrain.planner.job import Job
from pipetrain.schedules import make_schedule, peak_in_flight

__all__ = ["RUNNABLE_SCHEDULES", "AUTO_SCHEDULES", "AUTO_SCHEDULES_CPU", "auto_schedules", "BUFFER_LEVELS", "CHUNKS", "Candidate", "runnable_schedules", "grid", "spread",
           "interleaved_in_flight", "interleaved_rule", "in_flight_1f1b", "zb_h1_held_bound"]

#: What the executor runs, unless ``pipetrain.executor`` declares ``RUNNABLE_SCHEDULES`` itself.
RUNNABLE_SCHEDULES = ("gpipe", "1f1b", "interleaved")
#: Schedules the planner picks without being asked. zb-h1's B+W costs what one backward does since
#: the linear layers' weight gradients are deferred (:mod:`pipetrain.executor.wgrad`; it beats
#: torch's Schedule1F1B on resmlp by 3-11%), so on GPUs it is chosen whenever it simulates fastest.
#: On CPU ranks it is chosen only when pinned or when the cost model measured the executor's
#: overheads (``--calibration``): there small models are dominated by per-action dispatch and
#: per-message host work that the analytic and profiled grades do not charge, and its extra W
#: actions can cost more than its bubble saves (the demo, tiny-gpt micro-batch 1 x m=8 on 2 CPU
#: ranks: zb-h1 28.5-36 ms per step, 1F1B 30-33, GPipe 23.5-25, while the analytic grade ranked
#: zb-h1 first).
AUTO_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
#: The auto schedules on CPU device types (see above).
AUTO_SCHEDULES_CPU = ("gpipe", "1f1b", "interleaved")
#: Buffer caps tried, in order, when a 1F1B/ZB-H1 point does not fit with the schedule's full demand.
BUFFER_LEVELS = (4, 2, 1)
#: Virtual stages per rank tried for the interleaved schedule.
CHUNKS = (2, 4)


def runnable_schedules() -> tuple[str, ...]:
    """The executor's own ``RUNNABLE_SCHEDULES`` literal when it declares one, else the default.

    Read from the executor's source with :mod:`ast` so that planning never imports torch.
    """
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent / "executor"
    for path in sorted(pkg.glob("*.py")) if pkg.is_dir() else ():
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "RUNNABLE_SCHEDULES" for t in targets) and node.value is not None:
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                return tuple(str(v) for v in value)
    return RUNNABLE_SCHEDULES


def auto_schedules(runnable: tuple[str, ...], device_kind: str = "gpu") -> tuple[str, ...]:
    """The runnable schedules the planner may choose on its own on devices of ``device_kind``
    ("gpu" | "cpu": CPU ranks without measured executor overheads; see :data:`AUTO_SCHEDULES`)."""
    auto = AUTO_SCHEDULES_CPU if device_kind == "cpu" else AUTO_SCHEDULES
    return tuple(s for s in runnable if s in auto)


@dataclass(frozen=True, kw_only=True, order=True)
class Candidate:
    """One point of the outer grid. ``buffer_level`` None: the schedule's full demand."""

    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    schedule: str
    chunks: int = 1
    buffer_level: int | None = None

    def describe(self) -> str:
        sched = f"interleaved v={self.chunks}" if self.schedule == "interleaved" else self.schedule
        buf = "" if self.buffer_level is None else f" buffers<={self.buffer_level}"
        return f"pp={self.pp} dp={self.dp} mb={self.micro_batch_size} m={self.num_microbatches} {sched}{buf}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def spread(values: list[int], k: int) -> list[int]:
    """At most ``k`` of the sorted ``values``, evenly spaced in log scale, always keeping the ends."""
    if len(values) <= k:
        return values
    logs = np.log(np.asarray(values, dtype=float))
    targets = np.linspace(logs[0], logs[-1], k)
    picked = sorted({values[int(np.argmin(np.abs(logs - t)))] for t in targets})
    return picked


def grid(job: Job, num_devices: int, num_blocks: int, allowed: tuple[str, ...], max_microbatch_size: int,
          max_sizes: int) -> tuple[list[Candidate], list[tuple[str, str]]]:
    bad: list[tuple[str, str]] = []
    pps = [job.pp] if job.pp else [p for p in range(1, min(num_blocks, num_devices) + 1) if job.dp or num_devices % p == 0]
    out = []
    for pp in pps:
        # unpinned dp: every device busy, else the widest dp that divides the global batch
        dps = [job.dp] if job.dp else [max([d for d in range(1, max(1, num_devices // pp) + 1) if job.global_batch % d == 0])]
        for dp in dps:
            if pp * dp > num_devices:
                bad.append((f"pp={pp} dp={dp}", f"needs {pp * dp} devices, topology has {num_devices}"))
                continue
            if job.global_batch % dp:
                bad.append((f"pp={pp} dp={dp}", f"global_batch {job.global_batch} is not divisible by dp={dp}"))
                continue
            per = job.global_batch // dp
            if job.microbatch_size:
                sizes = [job.microbatch_size]
            elif job.microbatches:
                sizes = [per // job.microbatches] if per % job.microbatches == 0 else []
            else:
                sizes = spread([b for b in _divisors(per) if b <= max_microbatch_size], max_sizes)
            if not sizes or per % sizes[0]:
                bad.append((f"pp={pp} dp={dp}", f"batch {per} per replica does not split into the pinned micro-batches"))
                continue
            for b in sizes:
                m = per // b
                if job.microbatches and m != job.microbatches:
                    continue
                for sched in ("gpipe", "1f1b", "interleaved", "zb-h1"):
                    if not job.schedule_allowed(sched, allowed):
                        continue
                    chunk_opts = [1]
                    if sched == "interleaved":
                        chunk_opts = [job.chunks] if job.chunks else [v for v in CHUNKS if pp * v <= num_blocks]
                        if pp == 1:
                            continue
                        if m % pp:
                            bad.append((f"pp={pp} dp={dp} mb={b} m={m} interleaved", f"needs m a multiple of pp={pp}"))
                            continue
                    elif job.chunks not in (None, 1):
                        continue
                    for v in chunk_opts:
                        out.append(Candidate(pp=pp, dp=dp, micro_batch_size=b, num_microbatches=m, schedule=sched, chunks=v))
    return out, bad


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
    return tuple(min(p - s, m, caps[s] if caps else 1 << 60) + min(s + 2, m) for s in range(p))


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
