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

__all__ = ["Telemetry", "rss_bytes", "read_telemetry", "read_rank_file"]


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Telemetry:
    """Collects events in memory during a step and appends them to the rank's JSONL file at step end."""

    def __init__(self, run_dir: Path, rank: int, *, enabled: bool = True) -> None:
        self.rank = rank
        self.enabled = enabled
        self.base_ns = time.perf_counter_ns()
        self.events: list[tuple] = []  # (kind, stage, mb, t0_ns, t1_ns, bytes[, cpu_ns])
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
        self._cuda_spans: list[tuple[str, int, int, Any, Any]] = []

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

    def add_span(self, kind: str, stage: int, microbatch: int, a: Any, b: Any) -> None:
        if not self.enabled:
            return
        if isinstance(a, tuple):  # CPU: (wall, this thread's CPU) nanoseconds
            self.events.append((kind, stage, microbatch, a[0], b[0], 0, b[1] - a[1]))
        else:
            self._cuda_spans.append((kind, stage, microbatch, a, b))

    def _resolve_cuda(self) -> None:
        spans = getattr(self, "_cuda_spans", None)
        if not spans:
            return
        import torch

        torch.cuda.synchronize()
        for kind, stage, mb, a, b in spans:
            t0 = self._ref_ns + int(self._ref_ev.elapsed_time(a) * 1e6)
            t1 = self._ref_ns + int(self._ref_ev.elapsed_time(b) * 1e6)
            self.events.append((kind, stage, mb, t0, t1, 0))
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
        for kind, stage, mb, t0, t1, nb, *cpu in self.events:
            rec = {"type": "event", "stage": stage, "rank": r, "kind": kind, "microbatch": mb,
                   "start_s": (t0 - b) * 1e-9, "end_s": (max(t1, t0) - b) * 1e-9, "bytes": nb, "step": step}
            if cpu:
                rec["cpu_s"] = cpu[0] * 1e-9
            w(json.dumps(rec) + "\n")
        self.events.clear()
        w(json.dumps({"type": "step", "rank": r, "step": step, **summary}) + "\n")
        self._f.flush()

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:  # pragma: no cover
            pass
