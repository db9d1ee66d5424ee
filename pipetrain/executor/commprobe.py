"""Measure the point-to-point latency and bandwidth of a torch.distributed backend.

Two processes (torch.multiprocessing, gloo on CPU or NCCL on CUDA) ping-pong tensors of
increasing size; the one-way time ``t(bytes) = latency_s + bytes / bandwidth`` is fitted by
least squares (the Hockney model: R. Hockney, "The communication challenge for MPP", Parallel
Computing 20(3), 1994). The calibration step stores the fit; the simulator's links use it.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipetrain.errors import ConfigError, RunError

__all__ = ["P2PCost", "fit_hockney", "probe_p2p"]


@dataclass(frozen=True, kw_only=True)
class P2PCost:
    """One-way point-to-point time ``latency_s + bytes / bandwidth_bytes_per_s``, with the
    measurements it was fitted to (empty when taken from a topology's datasheet figures)."""

    backend: str
    latency_s: float
    bandwidth_bytes_per_s: float
    sizes_bytes: tuple[int, ...] = ()
    one_way_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and self.bandwidth_bytes_per_s > 0):
            raise ConfigError(f"p2p cost: latency_s must be >= 0 and bandwidth > 0, got {self.latency_s}, {self.bandwidth_bytes_per_s}")

    def time_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


def fit_hockney(sizes_bytes: list[int] | tuple[int, ...], one_way_s: list[float] | tuple[float, ...]) -> tuple[float, float]:
    """Least-squares ``t = a + b * bytes`` with a, b >= 0; returns (latency_s, bandwidth_bytes_per_s)."""
    from scipy.optimize import lsq_linear

    x = np.asarray(sizes_bytes, dtype=float)
    t = np.asarray(one_way_s, dtype=float)
    scale = 1.0 / np.maximum(t, 1e-9)  # relative error: small messages matter as much as big ones
    a = np.stack([np.ones_like(x), x], axis=1) * scale[:, None]
    res = lsq_linear(a, t * scale, bounds=([0.0, 1e-15], [np.inf, np.inf]))
    lat, inv_bw = float(res.x[0]), float(res.x[1])
    return lat, 1.0 / inv_bw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, backend: str, sizes: list[int], repeats: int, out: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        dev = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        results = []
        for n in sizes:
            buf = torch.zeros(max(1, n // 4), dtype=torch.float32, device=dev)
            times = []
            for r in range(repeats + 2):
                if backend == "nccl":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                if backend == "nccl":
                    torch.cuda.synchronize()
                if r >= 2:
                    times.append((time.perf_counter() - t0) / 2)
            results.append(statistics.median(times))
        if rank == 0:
            Path(out).write_text(",".join(repr(t) for t in results))
    finally:
        dist.destroy_process_group()


def probe_p2p(*, backend: str = "gloo", sizes_bytes: tuple[int, ...] = (4, 4096, 65536, 1 << 20, 4 << 20),
              repeats: int = 20, timeout_s: float = 120.0) -> P2PCost:
    """Ping-pong between two local processes and fit the Hockney model."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="pipetrain-probe-") as tmp:
        out = str(Path(tmp) / "times.txt")
        ctx = mp.start_processes(_worker, args=(_free_port(), backend, list(sizes_bytes), repeats, out),
                                 nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RunError(f"p2p probe on {backend} did not finish within {timeout_s:.0f} s")
        times = tuple(float(v) for v in Path(out).read_text().split(","))
    lat, bw = fit_hockney(sizes_bytes, times)
    return P2PCost(backend=backend, latency_s=lat, bandwidth_bytes_per_s=bw, sizes_bytes=tuple(sizes_bytes), one_way_s=times)
