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

__all__ = ["BUFFER_LEVELS", "CHUNKS", "Candidate", "grid", "spread"]

#: Buffer caps tried, in order, when a 1F1B/ZB-H1 point does not fit with the schedule's full demand.
BUFFER_LEVELS = (4, 2, 1)
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
                        out.append(Candidate(pp=pp, dp=dp, micro_batch_size=b, num_microbatches=m, schedule=sched, chunks=v))
    return out, bad
