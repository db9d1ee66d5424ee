"""Profiled cost grade: each block's forward and backward timed on this machine's device.

:func:`profile_model` builds a zoo model with real weights (``ModelSpec.build(device, seed)``),
runs one micro-batch through it to capture every block's input, then times each block's
forward and backward (``warmup`` runs, then the median of ``repeats``). The last block's
timing includes the loss, as the last pipeline stage computes it. Blocks with the same
``trace_signature`` and input shape (GPT-2's twelve identical layers) share one measurement
when ``share_identical``. On CUDA every block is timed inside one unsynchronized forward and
backward of the whole model, by CUDA events, as the executor runs a stage (``_Setup.chain_once``).
Results are cached as JSON keyed by model, micro-batch size, sequence length, dtype and device (:func:`load_or_profile`). :class:`ProfiledCostModel` answers the
:class:`~pipetrain.costs.CostModel` interface from a profile.

This module imports torch only inside the functions that measure; the profile types and
:class:`ProfiledCostModel` work without it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.costs import NodeTimes, NodeTimesCostModel
from pipetrain.errors import ConfigError
from pipetrain.graph import LayerGraph
from pipetrain.serde import from_dict, parse_json, to_dict
from pipetrain.topology import DeviceType

__all__ = [
    "PROFILE_SCHEMA_VERSION", "BlockTiming", "BlockProfile", "ProfiledCostModel", "profile_model", "profile_and_measure", "profile_shapes",
    "load_or_profile",
    "measure_stage", "measure_saved_bytes", "default_cache_dir", "local_device_name",
]

PROFILE_SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class BlockTiming:
    """Median seconds of one block's forward and backward for one micro-batch."""

    name: str
    kind: str
    fwd_s: float
    bwd_s: float
    measured_as: int = -1  # index of the identical block whose measurement this shares (-1: own)

    def __post_init__(self) -> None:
        if not (self.fwd_s >= 0 and self.bwd_s >= 0):
            raise ConfigError(f"block {self.name!r}: times must be >= 0, got fwd {self.fwd_s}, bwd {self.bwd_s}")


@dataclass(frozen=True, kw_only=True)
class BlockProfile:
    model: str
    micro_batch_size: int
    seq_len: int
    dtype: str
    device: str  # e.g. "cpu:AMD EPYC:1thr" or "cuda:NVIDIA H100 80GB HBM3"
    device_kind: str  # "cpu" | "gpu"
    warmup: int
    repeats: int
    blocks: tuple[BlockTiming, ...]
    schema_version: int = PROFILE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.device_kind not in ("cpu", "gpu"):
            raise ConfigError(f"profile device_kind must be 'cpu' or 'gpu', got {self.device_kind!r}")
        if not self.blocks:
            raise ConfigError("a profile needs at least one block")

    @property
    def key(self) -> str:
        return profile_key(self.model, self.micro_batch_size, self.seq_len, self.dtype, self.device)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> BlockProfile:
        data = parse_json(text, what="profile file")
        if isinstance(data, dict) and data.get("schema_version") != PROFILE_SCHEMA_VERSION:
            raise ConfigError(f"profile schema_version {data.get('schema_version')!r} is not supported; delete the cache file to re-profile")
        return from_dict(cls, data, where="profile")

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> BlockProfile:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"profile file {str(p)!r} does not exist")
        return cls.from_json(p.read_text())


def profile_key(model: str, micro_batch_size: int, seq_len: int, dtype: str, device: str) -> str:
    raw = f"{model}_mbs{micro_batch_size}_seq{seq_len}_{dtype}_{device}"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", raw)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPETRAIN_PROFILE_CACHE", Path.home() / ".cache" / "pipetrain" / "profiles"))


def local_device_name(device: str = "cpu", threads: int | None = None) -> str:
    """A stable name for the device a profile was measured on (part of the cache key)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "cpu")
    except OSError:
        pass
    return f"cpu:{cpu}:{threads or torch.get_num_threads()}thr"


# ----- measuring (torch) -------------------------------------------------------------------
_BUILT: dict[tuple[str, str, int], Any] = {}


def _built(model_name: str, device: str, seed: int) -> Any:
    """The model with real weights; the last one built is kept (gpt2 takes seconds to build)."""
    key = (model_name, device, seed)
    if key not in _BUILT:
        _BUILT.clear()
        from pipetrain.planner.zoo import get_model_spec

        _BUILT[key] = get_model_spec(model_name).build(device, seed=seed)
    return _BUILT[key]


class _Setup:
    """A built model on a device, every block's input for one micro-batch, and the target."""

    def __init__(self, model_name: str, micro_batch_size: int, seq_len: int | None, dtype: str, device: str, seed: int) -> None:
        import torch

        from pipetrain.planner.zoo import get_model_spec

        if dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype {dtype!r} is unknown; choose one of fp32, bf16, fp16")
        self.torch = torch
        self.spec = get_model_spec(model_name)
        self.seq_len = self.spec.check_shape(micro_batch_size, seq_len)
        self.micro_batch_size = micro_batch_size
        self.device = torch.device(device)
        self.model = _built(model_name, str(self.device), seed)
        self.model.train()
        for prm in self.model.parameters():
            prm.grad = None
        gen = torch.Generator().manual_seed(seed)
        x = self.spec.example_input(micro_batch_size, self.seq_len, self.device, generator=gen)
        self.target = self.spec.example_target(micro_batch_size, self.seq_len, self.device, generator=gen)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.inputs = []
        with torch.no_grad(), self.autocast():
            for block in self.model.blocks:
                self.inputs.append(x.detach())
                x = block(x)
        self.n = len(self.model.blocks)

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return self.torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def leaf(self, i: int) -> Any:
        x = self.inputs[i]
        return x.detach().requires_grad_(True) if x.is_floating_point() else x

    def _once(self, start: int, end: int, grads: dict[tuple[int, int], Any]) -> tuple[float, float]:
        """One forward and backward of blocks [start, end): (seconds, seconds)."""
        torch = self.torch
        last = end == self.n
        x = self.leaf(start)
        self.sync()
        t0 = time.perf_counter()
        with self.autocast():
            for b in self.model.blocks[start:end]:
                x = b(x)
            if last:
                x = self.spec.loss(x, self.target)
        self.sync()
        t1 = time.perf_counter()
        grad = None
        if not last:
            grad = grads.get((start, end))
            if grad is None:
                gen = torch.Generator().manual_seed(1)
                grad = grads[(start, end)] = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
        x.backward(grad)
        self.sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    def chain_once(self) -> list[tuple[float, float]]:
        """One forward and backward of the whole model as the executor runs a stage on CUDA:
        blocks back to back with no host sync between them, each block timed by CUDA events
        (forward: after each block; backward: a hook on each block's input fires when that
        block's backward is done). Syncing around every block instead adds the kernel-launch
        latency and the autograd engine's start-up to every block, a large share of a short GPU
        block's time (figures: benchmarks/RESULTS.md).

        The GPU is held by a spin kernel while the host queues the chain, so the events time
        the GPU's work, which is what bounds a pipeline rank whose host runs ahead (as it did for
        gpt2 on an H100; figures: benchmarks/RESULTS.md). A model small enough for the host to be
        the bound is not modelled."""
        torch = self.torch
        n = self.n

        cuda = self.device.type == "cuda"

        def event() -> Any:  # on CPU (tests) host time stands in for an event
            if not cuda:
                return time.perf_counter()
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def secs(a: Any, b: Any) -> float:
            return a.elapsed_time(b) * 1e-3 if cuda else b - a

        bwd: list[Any] = [None] * n
        x = self.leaf(0)
        self.sync()
        if cuda:  # hold the GPU while the host queues the whole chain: the events then time the GPU's work alone
            torch.cuda._sleep(GPU_HOLD_CYCLES)
        fwd = [event()]
        with self.autocast():
            for i, b in enumerate(self.model.blocks):
                if i > 0 and x.requires_grad:
                    x.register_hook(lambda g, i=i: bwd.__setitem__(i, event()))
                x = b(x)
                if i == n - 1:
                    x = self.spec.loss(x, self.target)
                fwd.append(event())
        start = event()
        x.backward()
        bwd[0] = event()
        self.sync()
        ends = [bwd[i] if bwd[i] is not None else bwd[0] for i in range(n)]
        out = []
        for i in range(n):
            after = start if i == n - 1 else ends[i + 1]
            out.append((secs(fwd[i], fwd[i + 1]), max(0.0, secs(after, ends[i]))))
        return out

    def time_ranges(self, ranges: Sequence[tuple[int, int]], warmup: int, repeats: int) -> list[tuple[float, float]]:
        """Median forward and backward seconds of each block range run as one stage (see _time_jobs)."""
        return _time_jobs([(self, a, b) for a, b in ranges], warmup, repeats)


def _time_jobs(jobs: Sequence[tuple[_Setup, int, int]], warmup: int, repeats: int) -> list[tuple[float, float]]:
    """Median (fwd, bwd) seconds of each (setup, start, end) job.

    Rounds interleave the jobs (round r runs every job once), so a burst of load from other
    processes on a shared machine hits all of them alike.
    """
    grads: list[dict[tuple[int, int], Any]] = [{} for _ in jobs]
    samples: list[list[tuple[float, float]]] = [[] for _ in jobs]
    for r in range(warmup + repeats):
        for k, (s, a, b) in enumerate(jobs):
            t = s._once(a, b, grads[k])
            if r >= warmup:
                samples[k].append(t)
    return [(statistics.median(f for f, _ in ss), statistics.median(b for _, b in ss)) for ss in samples]


def _threads(threads: int | None) -> Any:
    """Context manager: run with ``threads`` torch intra-op threads, then restore."""
    import torch

    class _Ctx:
        def __enter__(self) -> None:
            self.old = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)

        def __exit__(self, *exc: object) -> None:
            torch.set_num_threads(self.old)

    return _Ctx()


def _blocks_to_measure(s: _Setup, share_identical: bool) -> tuple[list[int], dict[int, int]]:
    """Blocks to time, and for each other block the identical block whose time it shares."""
    measure: list[int] = []
    shared: dict[int, int] = {}
    seen: dict[Any, int] = {}
    for i, block in enumerate(s.model.blocks):
        sig = getattr(block, "trace_signature", None)
        key = (sig, tuple(s.inputs[i].shape), str(s.inputs[i].dtype), i == s.n - 1) if sig is not None else None
        if share_identical and key is not None and key in seen:
            shared[i] = seen[key]
            continue
        measure.append(i)
        if key is not None:
            seen[key] = i
    return measure, shared


def _assemble(s: _Setup, model: str, dtype: str, device: str, threads: int | None, warmup: int, repeats: int,
              measure: list[int], shared: dict[int, int], times: Sequence[tuple[float, float]]) -> BlockProfile:
    own = dict(zip(measure, times))
    timings = []
    for i in range(s.n):
        src = shared.get(i, i)
        f, b = own[src]
        timings.append(BlockTiming(name=s.model.block_names[i], kind=s.model.block_kinds[i], fwd_s=f, bwd_s=b,
                                   measured_as=src if src != i else -1))
    return BlockProfile(model=model, micro_batch_size=s.micro_batch_size, seq_len=s.seq_len, dtype=dtype,
                        device=local_device_name(device, threads), device_kind="gpu" if s.device.type == "cuda" else "cpu",
                        warmup=warmup, repeats=repeats, blocks=tuple(timings))


def profile_shapes(model: str, shapes: Sequence[tuple[int, int | None]], *, stages: Sequence[tuple[int, int]] = (),
                   dtype: str = "fp32", device: str = "cpu", warmup: int = 2, repeats: int = 7, seed: int = 0,
                   share_identical: bool = True, threads: int | None = None) -> tuple[list[BlockProfile], list[tuple[float, float]]]:
    """Profiles of one model at several (micro-batch size, seq-len) shapes, plus fresh (fwd, bwd)
    medians of whole ``stages`` at the first shape, all in the same interleaved rounds.

    On a shared machine every measurement then sees the same load: a calibration across
    shapes does not fit the load of the moment each shape was measured in, and a stage's
    fresh measurement is comparable with the per-block profile.
    """
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"profiling needs warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    if not shapes:
        raise ConfigError("profile_shapes needs at least one (micro-batch size, seq-len) shape")
    with _threads(threads):
        setups = [_Setup(model, mbs, seq, dtype, device, seed) for mbs, seq in shapes]
        for a, b in stages:
            if not 0 <= a < b <= setups[0].n:
                raise ConfigError(f"stage range [{a}, {b}) is not within the model's {setups[0].n} blocks")
        if setups[0].device.type == "cuda":  # blocks timed in one unsynchronized chain (see _Setup.chain_once)
            out = [_assemble(s, model, dtype, device, threads, warmup, repeats, list(range(s.n)), {}, _time_chain(s, warmup, repeats))
                   for s in setups]
            return out, _time_jobs([(setups[0], a, b) for a, b in stages], warmup, repeats)
        plans = [_blocks_to_measure(s, share_identical) for s in setups]
        jobs = [(s, i, i + 1) for s, (measure, _) in zip(setups, plans) for i in measure]
        jobs += [(setups[0], a, b) for a, b in stages]
        times = _time_jobs(jobs, warmup, repeats)
        out, k = [], 0
        for s, (measure, shared) in zip(setups, plans):
            out.append(_assemble(s, model, dtype, device, threads, warmup, repeats, measure, shared, times[k:k + len(measure)]))
            k += len(measure)
        return out, times[k:]


#: spin-kernel length that holds the GPU while the host queues a profiled chain (about 0.1 s at 2 GHz)
GPU_HOLD_CYCLES = 200_000_000

#: extra untimed chains on a GPU: it idles at a low clock (345 MHz seen on an H100) until loaded
GPU_EXTRA_WARMUP = 3


def _time_chain(s: _Setup, warmup: int, repeats: int) -> list[tuple[float, float]]:
    """Median (fwd, bwd) seconds of every block from ``warmup + GPU_EXTRA_WARMUP + repeats`` chains."""
    runs = [s.chain_once() for _ in range(warmup + GPU_EXTRA_WARMUP + repeats)][warmup + GPU_EXTRA_WARMUP:]
    return [(statistics.median(r[i][0] for r in runs), statistics.median(r[i][1] for r in runs)) for i in range(s.n)]


def profile_model(model: str, *, micro_batch_size: int, seq_len: int | None = None, dtype: str = "fp32",
                  device: str = "cpu", warmup: int = 2, repeats: int = 7, seed: int = 0, share_identical: bool = True,
                  threads: int | None = None) -> BlockProfile:
    """Time every block of zoo model ``model`` on ``device`` (see module docstring)."""
    return profile_and_measure(model, (), micro_batch_size=micro_batch_size, seq_len=seq_len, dtype=dtype, device=device,
                               warmup=warmup, repeats=repeats, seed=seed, share_identical=share_identical, threads=threads)[0]


def profile_and_measure(model: str, stages: Sequence[tuple[int, int]], *, micro_batch_size: int, seq_len: int | None = None,
                        dtype: str = "fp32", device: str = "cpu", warmup: int = 2, repeats: int = 7, seed: int = 0,
                        share_identical: bool = True, threads: int | None = None) -> tuple[BlockProfile, list[tuple[float, float]]]:
    """A profile and, in the same interleaved rounds, fresh (fwd, bwd) medians of whole stages.

    Each stage ``(start, end)`` runs blocks [start, end) as one unit, as a pipeline stage would;
    comparing it with the profile's per-block sum checks the profiled grade on a shared, noisy
    machine (load bursts hit the blocks and the stages alike).
    """
    profs, times = profile_shapes(model, [(micro_batch_size, seq_len)], stages=stages, dtype=dtype, device=device, warmup=warmup,
                                  repeats=repeats, seed=seed, share_identical=share_identical, threads=threads)
    return profs[0], times


def load_or_profile(model: str, *, micro_batch_size: int, seq_len: int | None = None, dtype: str = "fp32", device: str = "cpu",
                    threads: int | None = None, cache_dir: str | Path | None = None, refresh: bool = False, **kw: Any) -> BlockProfile:
    """The cached profile for this model, shape, dtype and device, measuring it when absent."""
    from pipetrain.planner.zoo import get_model_spec

    seq = get_model_spec(model).check_shape(micro_batch_size, seq_len)
    path = Path(cache_dir or default_cache_dir()) / (profile_key(model, micro_batch_size, seq, dtype, local_device_name(device, threads)) + ".json")
    if path.is_file() and not refresh:
        return BlockProfile.load(path)
    prof = profile_model(model, micro_batch_size=micro_batch_size, seq_len=seq, dtype=dtype, device=device, threads=threads, **kw)
    prof.save(path)
    return prof


def measure_stage(model: str, start: int, end: int, *, micro_batch_size: int, seq_len: int | None = None, dtype: str = "fp32",
                  device: str = "cpu", warmup: int = 2, repeats: int = 7, seed: int = 0, threads: int | None = None) -> tuple[float, float]:
    """A fresh measurement: median forward and backward seconds of blocks [start, end) as one stage."""
    with _threads(threads):
        s = _Setup(model, micro_batch_size, seq_len, dtype, device, seed)
        if not 0 <= start < end <= s.n:
            raise ConfigError(f"stage range [{start}, {end}) is not within the model's {s.n} blocks")
        return s.time_ranges([(start, end)], warmup, repeats)[0]


def measure_saved_bytes(model: str, *, micro_batch_size: int, seq_len: int | None = None, dtype: str = "fp32",
                        device: str = "cpu", seed: int = 0) -> tuple[int, ...]:
    """Bytes autograd really saves for backward in each block's forward, on real tensors.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor packed during the
    block's forward, deduplicated by storage (views of one buffer count once, as the buffer is
    what stays alive), excluding the model's parameters (they are not activations).
    """
    import torch

    s = _Setup(model, micro_batch_size, seq_len, dtype, device, seed)
    param_ptrs = {p.untyped_storage().data_ptr() for p in s.model.parameters()}
    out = []
    for i, block in enumerate(s.model.blocks):
        storages: dict[int, int] = {}

        def pack(t: Any) -> Any:
            st = t.untyped_storage()
            if st.data_ptr() not in param_ptrs:
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())  # noqa: B023 (the hook runs in this iteration)
            return t

        x = s.leaf(i)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), s.autocast():
            y = block(x)
        out.append(sum(storages.values()))
        del y
    return tuple(out)


# ----- the cost model ----------------------------------------------------------------------
class ProfiledCostModel(NodeTimesCostModel):
    """Cost model answering from a :class:`BlockProfile` (one graph node per profiled block).

    Stage time is the sum of its blocks' medians; W is the FLOP share of B
    (``wgrad_flops / bwd_flops`` of each node); recompute reruns the forward. Transfers and the
    optimizer step are not profiled: they use the analytic formulas of
    :mod:`pipetrain.costs`.
    """

    name = "profiled"

    def __init__(self, profile: BlockProfile) -> None:
        self.profile = profile

    def _check(self, graph: LayerGraph, device_type: DeviceType) -> None:
        p = self.profile
        if graph.model != p.model or graph.num_nodes != len(p.blocks):
            raise ConfigError(f"profile is of model {p.model!r} with {len(p.blocks)} blocks but the graph is {graph.model!r} "
                              f"with {graph.num_nodes} nodes: profile this model at block granularity")
        if (graph.micro_batch_size, graph.seq_len, graph.dtype) != (p.micro_batch_size, p.seq_len, p.dtype):
            raise ConfigError(f"profile was measured at micro-batch {p.micro_batch_size}, seq-len {p.seq_len}, {p.dtype} but the "
                              f"graph is at {graph.micro_batch_size}, {graph.seq_len}, {graph.dtype}: re-profile at that shape")
        if device_type.kind != p.device_kind:
            raise ConfigError(f"profile was measured on {p.device} but the stage runs on {device_type.name} ({device_type.kind}): "
                              "use the analytic or calibrated cost model for other devices")

    def node_times(self, graph: LayerGraph, device_type: DeviceType) -> NodeTimes:
        """Per-node (fwd, bwd, wgrad) seconds, the planner's fast path (as AnalyticCostModel's)."""
        self._check(graph, device_type)
        blocks = self.profile.blocks
        wgrad = tuple(min(t.bwd_s, t.bwd_s * node.wgrad_flops / node.bwd_flops) if node.bwd_flops > 0 else 0.0
                      for node, t in zip(graph.nodes, blocks))
        return NodeTimes(fwd_s=tuple(t.fwd_s for t in blocks), bwd_s=tuple(t.bwd_s for t in blocks), wgrad_s=wgrad)
