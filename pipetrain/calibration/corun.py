"""Measure how fast a rank computes while others compute on the same CPU node, and after it waited.

The block profile times a model alone on an idle machine. In a pipeline on a CPU node every
rank is a process, and while ``k`` of them compute at once each gets less than a whole core's
worth of work done: beyond ``k > cores`` the OS time-slices them (the fluid share
``cores / k``), and at any ``k`` they contend for the shared caches, memory bandwidth and, on
a virtual machine, the host's scheduling of its virtual CPUs. So a rank's speed is neither 1
below ``cores`` nor the fair share ``cores / k`` above it, and it drifts: it has to be measured,
repeatedly (figures: benchmarks/RESULTS.md).

:func:`probe_corun` measures that directly: ``max_jobs`` spawned processes each build the
model and run its forward and backward (one micro-batch, all blocks, one thread) back to back;
in each phase the first ``k`` of them run together for ``phase_s`` seconds, and the median
iteration time of the ``k`` against the median alone is the per-job speed ``speed[k - 1]``.
Phases cycle ``k = 1 .. max_jobs`` for ``rounds`` rounds, so a drift of the machine's speed
hits every ``k`` alike. The simulator's time-sliced compute groups progress each computing rank
at ``speed[k - 1]`` of full speed (:class:`pipetrain.simulator.ComputeGroup`); the topology's
node carries the table (``corun_speed``).

:func:`probe_resume` measures what a wait costs the next action: a pipeline rank that blocks on
a message leaves its core idle, the core's caches go cold (on a virtual machine the host may run
other work there), and the action it then runs is slower than the same action back to back. It
alternates, in one process, a forward and backward right after another with one after sleeping
``gap_s`` and one right after another process ran the same blocks on the same core (both pinned
to it). The differences of the medians are the node's ``resume_s`` and ``switch_s``: fixed costs,
not factors: the extra time measured this way is about the same for an embedding, one
transformer block and a whole model, whose own times differ many times over, and the
thread CPU time of a pipeline's actions sits above their profile by about that much where they
follow a wait (1F1B) and by less where they mostly follow one another (GPipe)
(figures: benchmarks/RESULTS.md).

Both probes are the fallback: where the calibration also ran a two-rank pipeline of the model, the
node's ``resume_s`` and its speed with two ranks computing come from that run's own actions
(:func:`pipetrain.calibration.overhead.pipeline_action_costs`). The probes' processes sleep or
compute without a pause; a pipeline's ranks block on each other's messages and compute about half
the time, and on a loaded machine the co-run probe put two ranks at a third of their speed where
the pipeline's co-running actions ran as fast as its others (figures: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipetrain.errors import ConfigError, RunError

__all__ = ["CoRunSpeed", "CoRunProbe", "probe_corun", "mean_corun", "ResumeCost", "probe_resume"]


@dataclass(frozen=True, kw_only=True)
class CoRunSpeed:
    """Per-job speed, relative to alone, of ``k = 1 .. len(speed)`` processes computing at once on
    ``cores`` cores (``speed[0]`` is 1 by definition); ``alone_s`` is the median iteration alone."""

    model: str
    micro_batch_size: int
    seq_len: int
    cores: int
    speed: tuple[float, ...]
    alone_s: float
    iterations: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.speed or not all(0 < s <= 1.5 for s in self.speed):
            raise ConfigError(f"co-run speed table must be non-empty with values in (0, 1.5], got {self.speed}")
        if self.cores < 1 or not self.alone_s > 0:
            raise ConfigError(f"co-run speed: cores must be >= 1 and alone_s > 0, got {self.cores}, {self.alone_s}")


def _job(model: str, micro_batch_size: int, seq_len: int | None, threads: int, conn: Any, blocks: int = 0,
         core: int | None = None) -> None:
    """A probe process: build the model, then per command ``(start, until)`` run forward+backward back
    to back from monotonic time ``start`` until ``until`` and send the iteration times (``None`` ends it);
    ``until`` already past runs one. ``blocks`` > 0: only the first that many blocks; ``core``: pinned to it."""
    import os

    import torch

    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(threads)
    from pipetrain.calibration.profile import _Setup

    s = _Setup(model, micro_batch_size, seq_len, "fp32", "cpu", 0)
    end = blocks or s.n
    grads: dict[tuple[int, int], Any] = {}
    for _ in range(2):  # warm-up: allocator and autograd caches
        s._once(0, end, grads)
    parent = os.getppid()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        start, until = cmd
        while time.monotonic() < start:
            time.sleep(min(1e-3, max(0.0, start - time.monotonic())))
        times = []
        while True:
            f, b = s._once(0, end, grads)
            # a killed parent (SIGKILL, or SIGTERM, which skips multiprocessing's clean-up of daemonic
            # children) leaves this loop computing with no one to stop it: an orphan is re-parented
            if time.monotonic() > until or os.getppid() != parent:
                break
            times.append(f + b)
        if os.getppid() != parent:
            return
        conn.send(times)


def _answer(conn: Any, deadline: float, what: str) -> Any:
    """The next message from a probe process, or a RunError if it died or the time is up."""
    try:
        if conn.poll(max(0.0, deadline - time.monotonic())):
            return conn.recv()
    except (EOFError, OSError):
        raise RunError(f"co-run probe: a probe process died before it could {what} (see its error above)") from None
    raise RunError(f"co-run probe: a probe process did not {what} before the time limit")


class CoRunProbe:
    """``max_jobs`` probe processes of one model and shape, alive for the ``with`` block;
    :meth:`measure` runs the phases (module docstring) and may be called again without
    starting the processes anew."""

    def __init__(self, model: str, *, micro_batch_size: int, seq_len: int | None = None, max_jobs: int, cores: int,
                 threads: int = 1, timeout_s: float = 180.0) -> None:
        from pipetrain.planner.zoo import get_model_spec

        if max_jobs < 1 or cores < 1:
            raise ConfigError(f"co-run probe needs max_jobs and cores >= 1, got {max_jobs}, {cores}")
        self.model, self.micro_batch_size, self.max_jobs, self.cores = model, micro_batch_size, max_jobs, cores
        self.seq_len = get_model_spec(model).check_shape(micro_batch_size, seq_len)
        self.threads, self.timeout_s = threads, timeout_s
        self._pipes: list[Any] = []
        self._procs: list[Any] = []

    def __enter__(self) -> CoRunProbe:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        deadline = time.monotonic() + self.timeout_s
        try:
            for _ in range(self.max_jobs):
                here, there = ctx.Pipe()
                p = ctx.Process(target=_job, args=(self.model, self.micro_batch_size, self.seq_len, self.threads, there), daemon=True)
                p.start()
                self._pipes.append(here)
                self._procs.append(p)
            for here in self._pipes:
                _answer(here, deadline, "start")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def measure(self, *, phase_s: float = 1.0, rounds: int = 3) -> CoRunSpeed:
        """Cycle ``k = 1 .. max_jobs`` processes computing at once, ``rounds`` times."""
        if rounds < 1 or not phase_s > 0:
            raise ConfigError(f"co-run probe needs rounds >= 1 and phase_s > 0, got {rounds}, {phase_s}")
        if not self._pipes:
            raise RunError("co-run probe: measure() outside its `with` block (no probe processes)")
        deadline = time.monotonic() + self.timeout_s + rounds * self.max_jobs * phase_s
        samples: list[list[float]] = [[] for _ in range(self.max_jobs)]
        for _ in range(rounds):
            for k in range(1, self.max_jobs + 1):
                start = time.monotonic() + 0.05
                for here in self._pipes[:k]:
                    here.send((start, start + phase_s))
                for here in self._pipes[:k]:
                    ts = _answer(here, deadline, f"run {phase_s} s with {k} jobs")
                    samples[k - 1] += ts[1:]  # the first iteration may start before the others are running
        for i, ts in enumerate(samples):
            if not ts:
                raise RunError(f"co-run probe: no iteration of {self.model} finished with {i + 1} jobs in {phase_s} s; raise phase_s")
        med = [statistics.median(ts) for ts in samples]
        return CoRunSpeed(model=self.model, micro_batch_size=self.micro_batch_size, seq_len=self.seq_len, cores=self.cores,
                          speed=tuple(min(1.5, med[0] / m) for m in med), alone_s=med[0],
                          iterations=tuple(len(ts) for ts in samples))

    def close(self) -> None:
        for here in self._pipes:
            try:
                here.send(None)
            except (OSError, BrokenPipeError):
                pass
        for p in self._procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
        self._pipes, self._procs = [], []


def probe_corun(model: str, *, micro_batch_size: int, seq_len: int | None = None, max_jobs: int, cores: int,
                threads: int = 1, phase_s: float = 1.0, rounds: int = 3, timeout_s: float = 180.0) -> CoRunSpeed:
    """Per-job speed with ``k = 1 .. max_jobs`` processes computing ``model`` at once (module docstring)."""
    with CoRunProbe(model, micro_batch_size=micro_batch_size, seq_len=seq_len, max_jobs=max_jobs, cores=cores,
                    threads=threads, timeout_s=timeout_s) as probe:
        return probe.measure(phase_s=phase_s, rounds=rounds)


def mean_corun(measurements: Sequence[CoRunSpeed]) -> CoRunSpeed:
    """Per ``k``, the mean speed of several measurements of one model and shape (and their mean alone time)."""
    if not measurements:
        raise ConfigError("mean_corun needs at least one measurement")
    n = min(len(c.speed) for c in measurements)
    first = measurements[0]
    return CoRunSpeed(model=first.model, micro_batch_size=first.micro_batch_size, seq_len=first.seq_len, cores=first.cores,
                      speed=tuple(statistics.fmean(c.speed[k] for c in measurements) for k in range(n)),
                      alone_s=statistics.fmean(c.alone_s for c in measurements),
                      iterations=tuple(sum(c.iterations[k] for c in measurements if len(c.iterations) > k) for k in range(n)))


@dataclass(frozen=True, kw_only=True)
class ResumeCost:
    """Median forward+backward of the first half of a model's blocks right after another (``hot_s``),
    after ``gap_s`` of sleep (``cold_s``) and right after another process ran the same on the same
    core (``after_other_s``; 0: not measured, e.g. where processes cannot be pinned to a core)."""

    model: str
    micro_batch_size: int
    seq_len: int
    gap_s: float
    hot_s: float
    cold_s: float
    pairs: int
    after_other_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.gap_s > 0 and self.hot_s > 0 and self.cold_s > 0 and self.pairs >= 1 and self.after_other_s >= 0):
            raise ConfigError(f"resume cost of {self.model}: times and pairs must be > 0 (after_other_s >= 0)")

    @property
    def resume_s(self) -> float:
        """Extra seconds of the action after a wait (the node's ``resume_s``)."""
        return max(0.0, self.cold_s - self.hot_s)

    @property
    def switch_s(self) -> float:
        """Extra seconds of the action after another process ran on its core (the node's ``switch_s``;
        ``resume_s`` where not measured)."""
        return max(0.0, self.after_other_s - self.hot_s) if self.after_other_s > 0 else self.resume_s


def _pinnable() -> int | None:
    """A core this process may run on, if processes can be pinned here (Linux), else None."""
    import os

    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        return min(os.sched_getaffinity(0))
    except (OSError, ValueError):
        return None


def probe_resume(model: str, *, micro_batch_size: int, seq_len: int | None = None, gap_s: float = 3e-3, pairs: int = 60,
                 threads: int = 1, timeout_s: float = 120.0) -> ResumeCost:
    """Paired hot / after-a-wait / after-another-process timings of the first half of ``model``'s
    blocks (module docstring). For the last, this process and a spawned one that runs the same
    blocks are pinned to one core and take turns; this process's affinity is restored after."""
    import multiprocessing
    import os

    import torch

    from pipetrain.calibration.profile import _Setup

    if pairs < 1 or not gap_s > 0:
        raise ConfigError(f"resume probe needs pairs >= 1 and gap_s > 0, got {pairs}, {gap_s}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    core = _pinnable()
    affinity = os.sched_getaffinity(0) if core is not None else None
    here = proc = None
    try:
        s = _Setup(model, micro_batch_size, seq_len, "fp32", "cpu", 0)
        end = max(1, s.n // 2)
        deadline = time.monotonic() + timeout_s
        if core is not None:
            ctx = multiprocessing.get_context("spawn")
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_job, args=(model, micro_batch_size, s.seq_len, threads, there, end, core), daemon=True)
            proc.start()
            _answer(here, deadline, "start")
            os.sched_setaffinity(0, {core})
        grads: dict[tuple[int, int], Any] = {}
        for _ in range(3):
            s._once(0, end, grads)
        hot, cold, other = [], [], []
        for _ in range(pairs):
            s._once(0, end, grads)  # the one before: caches warm
            hot.append(sum(s._once(0, end, grads)))
            time.sleep(gap_s)
            cold.append(sum(s._once(0, end, grads)))
            if here is not None:
                here.send((0.0, 0.0))  # the other process runs the same blocks once on this core
                _answer(here, deadline, "run the blocks")
                other.append(sum(s._once(0, end, grads)))
    finally:
        torch.set_num_threads(old)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        if here is not None:
            try:
                here.send(None)
            except (OSError, BrokenPipeError):
                pass
        if proc is not None:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
    return ResumeCost(model=model, micro_batch_size=micro_batch_size, seq_len=s.seq_len, gap_s=gap_s, hot_s=statistics.median(hot),
                      cold_s=statistics.median(cold), pairs=pairs,
                      after_other_s=statistics.median(other) if other else 0.0)
