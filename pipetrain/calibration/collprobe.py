"""Measure the backend's all-reduce, all-gather and reduce-scatter per group size, and fit each.

``n`` local processes (torch.multiprocessing, gloo on CPU or NCCL on CUDA, as the executor runs)
repeat each collective on tensors of several sizes; every repetition starts after a barrier and
each rank times its own call (on CUDA up to a synchronize). Per collective and size the time is
the median over the repetitions of the mean over the ranks: what a rank of a tensor-parallel
group or a data-parallel replica waits inside the call, the skew of its peers' arrival included,
as the executor's telemetry times it. ``latency_s + nbytes * per_byte_s`` is then fitted per
collective and group size (:func:`pipetrain.calibration.commprobe.fit_hockney`, relative least
squares) into a :class:`~pipetrain.sharding.CollectiveFit`, which the calibrated cost model uses
in place of the ring formula (:func:`pipetrain.sharding.collective_time_s`).

Sizes are counted as :class:`~pipetrain.sharding.Collective` counts them: the full tensor (an
all-gather's output, a reduce-scatter's input). The default sizes span the tensor-parallel
activations of the zoo's small models (micro-batch x sequence x hidden x 4 bytes: tens to
hundreds of KiB) and their data-parallel gradients (a few MiB).

A probe process whose parent dies stops at its next repetition (its process group's timeout
bounds a call blocked on a peer that left), as the other probes' processes do.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipetrain.calibration.commprobe import _free_port, fit_hockney
from pipetrain.errors import ConfigError, RunError
from pipetrain.sharding import COLLECTIVES, CollectiveFit

__all__ = ["DEFAULT_SIZES_BYTES", "probe_collectives", "fit_collective"]

#: 16 KiB .. 4 MiB: tiny-gpt's per-layer activation at micro-batch 1-8 x 32-128 tokens, and its gradients
DEFAULT_SIZES_BYTES = (16 << 10, 128 << 10, 512 << 10, 1 << 20, 4 << 20)


def fit_collective(kind: str, ranks: int, backend: str, sizes_bytes: tuple[int, ...], seconds: tuple[float, ...]) -> CollectiveFit:
    """The Hockney fit of one collective's measured medians."""
    lat, bw = fit_hockney(sizes_bytes, seconds)
    return CollectiveFit(kind=kind, ranks=ranks, backend=backend, latency_s=lat, per_byte_s=1.0 / bw,
                         sizes_bytes=tuple(int(x) for x in sizes_bytes), seconds=tuple(float(t) for t in seconds))


def _worker(rank: int, world: int, port: int, backend: str, sizes: list[int], repeats: int, out: str, parent: int,
            work_s: float) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn); older torch has only those
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        dev = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(dev)
        bufs = {}
        for n in sizes:
            k = max(1, n // (4 * world))  # elements per rank's shard; the full tensor is world * k
            bufs[n] = (torch.ones(world * k, device=dev), torch.ones(k, device=dev))
        times: dict[str, list[list[float]]] = {c: [[] for _ in sizes] for c in COLLECTIVES}
        for r in range(repeats + 2):
            if os.getppid() != parent:  # orphaned: the calibration that started us is gone
                return
            for kind in COLLECTIVES:  # interleaved: a burst of outside load hits every collective and size alike
                for i, n in enumerate(sizes):
                    full, shard = bufs[n]
                    dist.barrier()
                    t1 = time.perf_counter()
                    while time.perf_counter() - t1 < work_s:  # compute before it, as a layer does before its all-reduce
                        pass
                    if backend == "nccl":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if kind == "all_reduce":
                        dist.all_reduce(full)
                    elif kind == "all_gather":
                        gather(full, shard)
                    else:
                        scatter(shard, full)
                    if backend == "nccl":
                        torch.cuda.synchronize()
                    if r >= 2:
                        times[kind][i].append(time.perf_counter() - t0)
                    if kind == "all_reduce":
                        full.fill_(1.0)  # keep the values bounded over the repetitions
        Path(f"{out}.{rank}").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def probe_collectives(*, backend: str = "gloo", group_sizes: tuple[int, ...] = (2,), sizes_bytes: tuple[int, ...] = DEFAULT_SIZES_BYTES,
                      repeats: int = 12, work_s: float = 2e-3, timeout_s: float = 120.0) -> tuple[CollectiveFit, ...]:
    """All-reduce, all-gather and reduce-scatter over ``n`` local processes for each ``n`` in
    ``group_sizes``, fitted per collective and size (module docstring). Each rank computes
    ``work_s`` between the barrier and the collective, as ranks compute between collectives in a
    run: gloo's threads then wake on busy cores, which costs more than back to back (the p2p
    wake-up probe, :func:`pipetrain.calibration.commprobe.probe_wakeup`, found the same)."""
    import torch.multiprocessing as mp

    if not group_sizes or min(group_sizes) < 2 or repeats < 1 or len(sizes_bytes) < 2 or min(sizes_bytes) < 4:
        raise ConfigError(f"collective probe: group sizes must be >= 2, repeats >= 1 and at least two sizes >= 4 bytes, got "
                          f"{group_sizes}, {repeats}, {sizes_bytes}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fits: list[CollectiveFit] = []
    sizes = sorted(set(int(s) for s in sizes_bytes))
    for n in sorted(set(group_sizes)):
        with tempfile.TemporaryDirectory(prefix="pipetrain-collprobe-") as tmp:
            out = str(Path(tmp) / "times")
            ctx = mp.start_processes(_worker, args=(n, _free_port(), backend, sizes, repeats, out, os.getpid(), work_s),
                                     nprocs=n, join=False, start_method="spawn")
            deadline = time.monotonic() + timeout_s
            try:
                while not ctx.join(timeout=1.0):
                    if time.monotonic() > deadline:
                        raise RunError(f"collective probe on {backend} with {n} ranks did not finish within {timeout_s:.0f} s")
            except mp.ProcessRaisedException as exc:
                raise RunError(f"collective probe on {backend} with {n} ranks failed: {str(exc).strip().splitlines()[-1]}") from None
            except mp.ProcessExitedException as exc:
                raise RunError(f"collective probe on {backend} with {n} ranks: a probe process died ({exc})") from None
            finally:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
            per_rank = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(n)]
        for kind in COLLECTIVES:
            # per size: the median over repetitions of the mean over ranks
            med = tuple(statistics.median(statistics.fmean(pr[kind][i][j] for pr in per_rank) for j in range(repeats))
                        for i in range(len(sizes)))
            # the bytes the fit is in: what each call really moved (the full tensor, rounded to whole shards)
            full = tuple(max(1, s // (4 * n)) * n * 4 for s in sizes)
            fits.append(fit_collective(kind, n, backend, full, med))
    return tuple(fits)
