"""Measure the point-to-point latency and bandwidth of a torch.distributed backend, and the
wake-up latency of a blocked receiver on oversubscribed cores.

Two processes (torch.multiprocessing, gloo on CPU or NCCL on CUDA) ping-pong tensors of
increasing size; the one-way time ``t(bytes) = latency_s + bytes / bandwidth`` is fitted by
least squares (the Hockney model: R. Hockney, "The communication challenge for MPP", Parallel
Computing 20(3), 1994). The calibration step stores the fit; the simulator's links use it.

:func:`probe_wakeup` ping-pongs one message size again while ``cores`` other processes keep
every core busy, as the other ranks do when more ranks than cores compute: a receiver that
blocked must then wait for the OS scheduler to give it a core (a running process's time slice
to end) before it sees its message. The mean one-way time with the cores busy less the mean
with them idle is that wait; the simulator adds it to a receive that blocked while all the
cores of its compute group were busy (:class:`pipetrain.simulator.ComputeGroup`).

:func:`probe_p2p_node` is one end of the same ping-pong between two nodes (a link between
machines, or between network namespaces): each node runs it, node rank 0 listens and fits. From a
shell, on each node: ``pipetrain calibrate --inter-node-rank R --inter-node-master HOST:PORT``
(node rank 0 prints the fit as JSON); the simulator takes the result as the topology's
``inter_node`` link.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.errors import ConfigError, RunError

__all__ = ["P2PCost", "WakeupCost", "fit_hockney", "probe_p2p", "probe_p2p_node", "probe_wakeup"]


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


@dataclass(frozen=True, kw_only=True)
class WakeupCost:
    """Mean one-way ping-pong time of ``nbytes`` with the cores idle and with ``busy_processes``
    others computing; ``wakeup_s`` is the difference (0 when not slower)."""

    nbytes: int
    busy_processes: int
    idle_one_way_s: float
    busy_one_way_s: float

    def __post_init__(self) -> None:
        if not (self.idle_one_way_s >= 0 and self.busy_one_way_s >= 0 and self.busy_processes >= 0):
            raise ConfigError("wake-up probe: times and process count must be >= 0")

    @property
    def wakeup_s(self) -> float:
        return max(0.0, self.busy_one_way_s - self.idle_one_way_s)


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


def _worker(rank: int, port: int, backend: str, sizes: list[int], repeats: int, out: str, work_s: float = 0.0,
            addr: str = "127.0.0.1") -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        dev = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        results = []
        for n in sizes:
            buf = torch.zeros(max(1, n // 4), dtype=torch.float32, device=dev)
            times: list[float] = []
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
                t1 = time.perf_counter()
                while time.perf_counter() - t1 < work_s:  # compute between messages, as a pipeline rank does
                    pass
            results.append(times)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def probe_p2p(*, backend: str = "gloo", sizes_bytes: tuple[int, ...] = (4, 4096, 65536, 1 << 20, 4 << 20),
              repeats: int = 20, timeout_s: float = 120.0) -> P2PCost:
    """Ping-pong between two local processes and fit the Hockney model."""
    times = tuple(statistics.median(ts) for ts in _ping_pong(backend, list(sizes_bytes), repeats, timeout_s))
    lat, bw = fit_hockney(sizes_bytes, times)
    return P2PCost(backend=backend, latency_s=lat, bandwidth_bytes_per_s=bw, sizes_bytes=tuple(sizes_bytes), one_way_s=times)


def probe_p2p_node(*, rank: int, master_addr: str, port: int, backend: str = "gloo",
                   sizes_bytes: tuple[int, ...] = (4, 4096, 65536, 1 << 20, 4 << 20), repeats: int = 20) -> P2PCost | None:
    """One end of a ping-pong between two nodes (module docstring): node rank 0 listens on
    ``master_addr:port`` and returns the Hockney fit, node rank 1 returns None. Gloo is bound to
    the interface on the route to ``master_addr`` (as ``pipetrain run`` binds it), unless
    ``GLOO_SOCKET_IFNAME`` says otherwise: the host name's address need not be on that link."""
    from pipetrain.executor.launch import iface_of, route_addr

    if rank not in (0, 1) or repeats < 1 or not sizes_bytes or min(sizes_bytes) < 1:
        raise ConfigError(f"node probe: rank must be 0 or 1, repeats >= 1 and sizes >= 1 byte, got {rank}, {repeats}, {sizes_bytes}")
    iface = iface_of(route_addr(master_addr, port))
    if iface and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = iface
    with tempfile.TemporaryDirectory(prefix="pipetrain-probe-") as tmp:
        out = str(Path(tmp) / "times.json")
        _worker(rank, port, backend, list(sizes_bytes), repeats, out, 0.0, master_addr)
        if rank != 0:
            return None
        all_times = json.loads(Path(out).read_text())
    times = tuple(statistics.median(float(t) for t in ts) for ts in all_times)
    lat, bw = fit_hockney(sizes_bytes, times)
    return P2PCost(backend=backend, latency_s=lat, bandwidth_bytes_per_s=bw, sizes_bytes=tuple(sizes_bytes), one_way_s=times)


def _ping_pong(backend: str, sizes: list[int], repeats: int, timeout_s: float, work_s: float = 0.0) -> list[list[float]]:
    """One-way seconds of every round trip, per size, from two fresh processes."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="pipetrain-probe-") as tmp:
        out = str(Path(tmp) / "times.json")
        ctx = mp.start_processes(_worker, args=(_free_port(), backend, sizes, repeats, out, work_s),
                                 nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RunError(f"p2p probe on {backend} did not finish within {timeout_s:.0f} s")
        return [[float(t) for t in ts] for ts in json.loads(Path(out).read_text())]


def _spin(stop: Any, parent: int, until: float) -> None:
    """Keep one core busy until ``stop`` is set, the ``parent`` process is gone or ``time.monotonic()``
    passes ``until``: a parent killed by a signal never sets ``stop``, and a spinner left behind
    would take a core from everything after it."""
    x = 0
    while not stop.is_set() and os.getppid() == parent and time.monotonic() < until:
        for _ in range(10000):
            x += 1


def probe_wakeup(*, cores: int, nbytes: int = 16384, repeats: int = 200, rounds: int = 2, work_s: float = 2e-3,
                 timeout_s: float = 120.0) -> WakeupCost:
    """Gloo ping-pong of ``nbytes`` with the cores idle and with ``cores`` busy processes, in
    alternating ``rounds`` (module docstring); means over all round trips. Both ends compute
    ``work_s`` between round trips, as pipeline ranks do between messages: a process that only
    sleeps gets a core back sooner (the scheduler favours it), which halved the wait here."""
    import multiprocessing

    if cores < 1 or repeats < 1 or rounds < 1:
        raise ConfigError(f"wake-up probe needs cores, repeats and rounds >= 1, got {cores}, {repeats}, {rounds}")
    ctx = multiprocessing.get_context("spawn")
    idle: list[float] = []
    busy: list[float] = []
    for _ in range(rounds):
        idle += _ping_pong("gloo", [nbytes], repeats, timeout_s, work_s)[0]
        stop = ctx.Event()
        spinners = [ctx.Process(target=_spin, args=(stop, os.getpid(), time.monotonic() + timeout_s), daemon=True)
                    for _ in range(cores)]
        for p in spinners:
            p.start()
        try:
            time.sleep(0.2)
            busy += _ping_pong("gloo", [nbytes], repeats, timeout_s, work_s)[0]
        finally:
            stop.set()
            for p in spinners:
                p.join(timeout=5.0)
                if p.is_alive():
                    p.kill()
    return WakeupCost(nbytes=nbytes, busy_processes=cores, idle_one_way_s=statistics.fmean(idle), busy_one_way_s=statistics.fmean(busy))

