"""Per-rank telemetry: ``RUN_DIR/telemetry/rank{r}.jsonl``.

Each line is a JSON object with a ``type``:
- ``"meta"``: rank, pipeline rank, replica, stages, host, clock base;
- ``"event"``: an :class:`~pipetrain.events.Event` (its fields, ``start_s``/``end_s`` in seconds
  since the aligned run start): F/B/W per action, SEND/RECV per transfer (bytes; start = posted,
  end = completion observed), ALLREDUCE, OPT;
- ``"step"``: step, loss (last stage only), step time, peak activations in flight per stage,
  receive-buffer allocations and distinct storages used, memory.

Clocks: after a barrier every rank reads ``perf_counter_ns``; the values are all-gathered. On
one host (one monotonic clock) every rank uses rank 0's reading as time zero, so times compare
exactly; across hosts each uses its own barrier-exit reading (aligned to the barrier's skew).
Compute actions (F/B) are timed with CUDA events on GPU (mapped to host time through a reference
event recorded at step start while the GPU is idle) and with ``perf_counter_ns`` on CPU, where
each F/B/W event also carries ``cpu_s``, the CPU time of the thread that ran it: where ranks
share cores, the span less its CPU is time spent waiting for a core, and the CPU against the
profile is what the action really cost (this is how the fixed cost of a wait that
:mod:`pipetrain.calibration.corun` measures was checked in real pipelines; figures:
benchmarks/RESULTS.md).

Collectives inside an action (:meth:`Telemetry.collectives`): with tensor parallelism DTensor
issues its all-reduces (all-gathers, reduce-scatters) inside the module's forward and backward,
and FSDP2 (ZeRO) its parameter all-gather in a step's first forward and its gradient
reduce-scatter in the last backward. A ``TorchDispatchMode`` (:class:`CollectiveTally`'s mode),
entered only around the actions that can communicate, sees both as dispatcher ops: DTensor's
functional collectives (``_c10d_functional``, timed as the wall time inside the call and inside
its ``wait_tensor``: the time the rank spends in them) and FSDP2's ``c10d`` ops (asynchronous:
timed from the call to the work's completion, through its future). The F/B event then carries
``tp_comm_s`` and ``zero_comm_s``, the seconds of each inside its span (and the counts,
``tp_collectives`` and ``zero_collectives``). The torch profiler would see them too, at a cost
per op far above this mode's. On CUDA the times are the host's: a functional collective returns
once enqueued, so ``tp_comm_s`` there is the launch and wait time, not the kernel's.
"""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Any

# the readers are plain JSON parsing and live in the torch-free base; re-exported for callers of this module
from pipetrain.timeline import read_rank_file, read_telemetry

__all__ = ["Telemetry", "CollectiveTally", "rss_bytes", "read_telemetry", "read_rank_file"]


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class CollectiveTally:
    """The collectives one action issued (module docstring): nanoseconds and counts, tensor-parallel
    (DTensor's functional collectives) and ZeRO (FSDP2's c10d collectives, completed asynchronously)."""

    __slots__ = ("tp_ns", "tp_count", "zero_spans")

    def __init__(self) -> None:
        self.tp_ns = 0
        self.tp_count = 0
        self.zero_spans: list[list[int]] = []  # [start_ns, end_ns], end 0 until the work completes

    def fields(self) -> dict[str, Any]:
        """The event's fields; read at step end, when every work the step issued has completed."""
        spans = sorted((a, b) for a, b in self.zero_spans if b > 0)
        zero_ns, reach = 0, 0
        for a, b in spans:  # the union: FSDP2 may overlap two of them
            if b > reach:
                zero_ns += b - max(a, reach)
                reach = b
        return {"tp_comm_s": self.tp_ns * 1e-9, "tp_collectives": self.tp_count,
                "zero_comm_s": zero_ns * 1e-9, "zero_collectives": len(self.zero_spans)}


def _collective_mode() -> Any:
    """The dispatch mode class (built on first use: torch is imported only in workers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _CollectiveMode(TorchDispatchMode):
        tally: CollectiveTally

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            ns = func.namespace
            if ns == "_c10d_functional":
                t0 = time.perf_counter_ns()
                out = func(*args, **(kwargs or {}))
                self.tally.tp_ns += time.perf_counter_ns() - t0
                if "wait" not in func.__name__ and "wrap" not in func.__name__:
                    self.tally.tp_count += 1
                return out
            if ns == "c10d" and "barrier" not in func.__name__:
                span = [time.perf_counter_ns(), 0]
                out = func(*args, **(kwargs or {}))
                work: Any = out[-1] if isinstance(out, tuple) and out else None
                self.tally.zero_spans.append(span)
                try:
                    fut = work.get_future() if hasattr(work, "get_future") else None
                except RuntimeError:  # a backend whose works have no future: the call's own time
                    fut = None
                if fut is None:
                    span[1] = time.perf_counter_ns()
                else:
                    def done(_f: Any, span: list[int] = span) -> None:
                        span[1] = max(time.perf_counter_ns(), span[0])

                    fut.then(done)
                return out
            return func(*args, **(kwargs or {}))

    return _CollectiveMode


class Telemetry:
    """Collects events in memory during a step and appends them to the rank's JSONL file at step end."""

    def __init__(self, run_dir: Path, rank: int, *, enabled: bool = True) -> None:
        self.rank = rank
        self.enabled = enabled
        self.base_ns = time.perf_counter_ns()
        self.events: list[tuple] = []  # (kind, stage, mb, t0_ns, t1_ns, bytes[, cpu_ns | None[, CollectiveTally]])
        self._mode: Any = None
        self.path = Path(run_dir) / "telemetry" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1 << 16)
        self.step = 0

    def align(self, dist: Any, group: Any = None) -> None:
        """Barrier, then agree on time zero (see module docstring)."""
        import torch

        dist.barrier(group=group)
        now = time.perf_counter_ns()
        host = zlib.crc32(socket.gethostname().encode())
        # NCCL collectives take CUDA tensors only; gloo takes CPU ones
        dev = f"cuda:{torch.cuda.current_device()}" if dist.get_backend(group) == "nccl" else "cpu"
        mine = torch.tensor([now, host], dtype=torch.int64, device=dev)
        world = dist.get_world_size(group)
        allv = [torch.zeros(2, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(allv, mine, group=group)
        allv = [v.cpu() for v in allv]
        same_host = len({int(v[1]) for v in allv}) == 1
        self.base_ns = int(allv[0][0]) if same_host else now
        self.same_host = same_host

    def now(self) -> int:
        return time.perf_counter_ns()

    # ----- compute timing: CUDA events on GPU, perf_counter_ns on CPU -------------------
    def use_cuda(self, device: Any) -> None:
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self._cuda_spans: list[tuple[str, int, int, Any, Any, CollectiveTally | None]] = []

    def begin_step(self) -> None:
        """On CUDA: a reference event recorded while the GPU is idle (the previous step synchronized)."""
        if getattr(self, "cuda", False) and self.enabled:
            import torch

            torch.cuda.synchronize()
            self._ref_ev = torch.cuda.Event(enable_timing=True)
            self._ref_ev.record()
            self._ref_ns = time.perf_counter_ns()

    def mark(self) -> Any:
        if getattr(self, "cuda", False) and self.enabled:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter_ns(), time.thread_time_ns()

    def collectives(self, active: bool) -> Any:
        """A context that tallies the collectives issued inside it (module docstring); pass what it
        returns to :meth:`add_span`. Inactive (or with telemetry off) it is free and tallies nothing."""
        from contextlib import nullcontext

        if not (active and self.enabled):
            return nullcontext(None)
        if self._mode is None:
            self._mode = _collective_mode()()
        self._mode.tally = CollectiveTally()
        return _Tallying(self._mode)

    def add_span(self, kind: str, stage: int, microbatch: int, a: Any, b: Any, tally: CollectiveTally | None = None) -> None:
        if not self.enabled:
            return
        if isinstance(a, tuple):  # CPU: (wall, this thread's CPU) nanoseconds
            self.events.append((kind, stage, microbatch, a[0], b[0], 0, b[1] - a[1], tally))
        else:
            self._cuda_spans.append((kind, stage, microbatch, a, b, tally))

    def _resolve_cuda(self) -> None:
        spans = getattr(self, "_cuda_spans", None)
        if not spans:
            return
        import torch

        torch.cuda.synchronize()
        for kind, stage, mb, a, b, tally in spans:
            t0 = self._ref_ns + int(self._ref_ev.elapsed_time(a) * 1e6)
            t1 = self._ref_ns + int(self._ref_ev.elapsed_time(b) * 1e6)
            self.events.append((kind, stage, mb, t0, t1, 0, None, tally))
        spans.clear()

    def add(self, kind: str, stage: int, microbatch: int, t0_ns: int, t1_ns: int, nbytes: int = 0) -> None:
        if self.enabled:
            self.events.append((kind, stage, microbatch, t0_ns, t1_ns, nbytes))

    def record(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj) + "\n")

    def flush_step(self, step: int, summary: dict[str, Any]) -> None:
        self._resolve_cuda()
        b = self.base_ns
        r = self.rank
        w = self._f.write
        for kind, stage, mb, t0, t1, nb, *extra in self.events:
            rec = {"type": "event", "stage": stage, "rank": r, "kind": kind, "microbatch": mb,
                   "start_s": (t0 - b) * 1e-9, "end_s": (max(t1, t0) - b) * 1e-9, "bytes": nb, "step": step}
            if extra and extra[0] is not None:
                rec["cpu_s"] = extra[0] * 1e-9
            if len(extra) > 1 and extra[1] is not None:
                rec.update(extra[1].fields())
            w(json.dumps(rec) + "\n")
        self.events.clear()
        w(json.dumps({"type": "step", "rank": r, "step": step, **summary}) + "\n")
        self._f.flush()

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:  # pragma: no cover
            pass


class _Tallying:
    """Enters the dispatch mode and yields its tally (a class, not a generator: entered per action)."""

    __slots__ = ("mode",)

    def __init__(self, mode: Any) -> None:
        self.mode = mode

    def __enter__(self) -> CollectiveTally:
        self.mode.__enter__()
        return self.mode.tally  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
