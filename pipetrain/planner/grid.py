"""The outer search's grid: the candidate points a job allows.

:func:`grid` enumerates the discrete (pp, dp, micro-batch size, schedule, chunks) points; which
schedules are runnable and how many micro-batches each keeps in flight is
:mod:`pipetrain.program.catalog`'s. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipetrain.planner.job import Job
from pipetrain.schedules import SCHEDULE_NAMES, V_SCHEDULES

__all__ = ["BUFFER_LEVELS", "CHUNKS", "MAX_IDLE_SHARE", "Candidate", "Parallelism", "grid", "spread"]

#: Buffer caps tried, in order, when a 1F1B/ZB-H1 point does not fit with the schedule's full demand.
BUFFER_LEVELS = (4, 2, 1)
#: The largest share of the devices an unpinned pipeline depth may leave idle.
MAX_IDLE_SHARE = 0.1
#: Virtual stages per rank tried for the interleaved schedule.
CHUNKS = (2, 4)


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
    tp: int = 1
    sequence_parallel: bool = False
    zero: int = 0
    recompute_mode: str = "full"  # the granularity of the stages that recompute

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        sched = f"interleaved v={self.chunks}" if self.schedule == "interleaved" else self.schedule
        buf = "" if self.buffer_level is None else f" buffers<={self.buffer_level}"
        tp = "" if self.tp == 1 else f"tp={self.tp}{'+sp' if self.sequence_parallel else ''} "
        zero = f" zero={self.zero}" if self.zero else ""
        rec = " selective" if self.recompute_mode == "selective" else ""
        return f"{tp}pp={self.pp} dp={self.dp}{zero} mb={self.micro_batch_size} m={self.num_microbatches} {sched}{buf}{rec}"


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


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    """The (tp, sequence parallel, zero, recompute granularity) combinations a job allows."""

    tps: tuple[int, ...] = (1,)
    sequence_parallel: tuple[bool, ...] = (False,)
    zeros: tuple[int, ...] = (0,)
    recompute_modes: tuple[str, ...] = ("full",)


def grid(job: Job, num_devices: int, num_blocks: int, allowed: tuple[str, ...], max_microbatch_size: int,
         max_sizes: int, par: Parallelism = Parallelism()) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Every point the job allows. Pipeline depths are not only divisors of the device count:
    any ``pp`` up to the block count, with the widest ``dp`` that fits and divides the global
    batch, may leave devices idle (``pp=20 dp=3`` on 64 GPUs). Unpinned, a depth that leaves more
    than :data:`MAX_IDLE_SHARE` of the devices idle is skipped unless every device is busy at
    no depth of that tp (a deeper pipeline of the same width then does the same work on more
    devices)."""
    bad: list[tuple[str, str]] = []
    out: list[Candidate] = []
    for tp in par.tps:
        per_tp = num_devices // tp
        if per_tp < 1:
            bad.append((f"tp={tp}", f"needs {tp} devices, topology has {num_devices}"))
            continue
        pps = [job.pp] if job.pp else list(range(1, min(num_blocks, per_tp // (job.dp or 1)) + 1))
        for pp in pps:
            # unpinned dp: the widest that fits and divides the global batch
            fit = [d for d in range(1, max(1, per_tp // pp) + 1) if job.global_batch % d == 0]
            dps = [job.dp] if job.dp else fit[-1:]
            if not job.pp and not job.dp and tp * pp * dps[0] < (1 - MAX_IDLE_SHARE) * num_devices and pp > 1:
                continue
            for dp in dps:
                for sp in (par.sequence_parallel if tp > 1 else (False,)):
                    for zero in (par.zeros if dp > 1 else (0,)):
                        for mode in par.recompute_modes:
                            _points(job, out, bad, num_devices=num_devices, num_blocks=num_blocks, allowed=allowed,
                                    max_microbatch_size=max_microbatch_size, max_sizes=max_sizes, tp=tp, pp=pp, dp=dp, sp=sp,
                                    zero=zero, mode=mode)
    return out, bad


def _points(job: Job, out: list[Candidate], bad: list[tuple[str, str]], *, num_devices: int, num_blocks: int,
            allowed: tuple[str, ...], max_microbatch_size: int, max_sizes: int, tp: int, pp: int, dp: int, sp: bool, zero: int,
            mode: str) -> None:
    if tp * pp * dp > num_devices:
        bad.append((f"tp={tp} pp={pp} dp={dp}", f"needs {tp * pp * dp} devices, topology has {num_devices}"))
        return
    if job.global_batch % dp:
        bad.append((f"pp={pp} dp={dp}", f"global_batch {job.global_batch} is not divisible by dp={dp}"))
        return
    per = job.global_batch // dp
    if job.microbatch_size:
        sizes = [job.microbatch_size]
    elif job.microbatches:
        sizes = [per // job.microbatches] if per % job.microbatches == 0 else []
    else:
        sizes = spread([b for b in _divisors(per) if b <= max_microbatch_size], max_sizes)
    if not sizes or per % sizes[0]:
        bad.append((f"pp={pp} dp={dp}", f"batch {per} per replica does not split into the pinned micro-batches"))
        return
    for b in sizes:
        m = per // b
        if job.microbatches and m != job.microbatches:
            continue
        for sched in SCHEDULE_NAMES:
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
            elif sched in V_SCHEDULES:
                chunk_opts = [2]  # two chunks per rank, in a V
                if job.chunks not in (None, 1, 2) or 2 * pp > num_blocks:
                    continue
                if sched == "dualpipev" and m < 2 * pp:
                    bad.append((f"pp={pp} dp={dp} mb={b} m={m} dualpipev", f"needs m >= 2 pp = {2 * pp}"))
                    continue
            elif job.chunks not in (None, 1):
                continue
            for v in chunk_opts:
                out.append(Candidate(pp=pp, dp=dp, micro_batch_size=b, num_microbatches=m, schedule=sched, chunks=v, tp=tp,
                                     sequence_parallel=sp, zero=zero, recompute_mode=mode))
