"""The calibration run: measure this device and backend, fit the cost model (stored by :mod:`.measured`).

:func:`run_calibration` measures, on the device a topology's ranks use (this CPU with one
thread per rank, as the executor runs; or the GPU):

* every block's forward and backward of each model at each micro-batch size
  (:func:`pipetrain.calibration.profile.profile_model`), the median of several rounds;
* on CPU, the host CPU time per point-to-point message: the executor on one rank and on two
  (:func:`pipetrain.calibration.overhead.measure_message_host_s`; the simulator holds a rank's core
  that long per message sent or received);
* the point-to-point latency and bandwidth of the backend in use (gloo on loopback, NCCL on
  GPU) by ping-pong and a Hockney fit (:func:`pipetrain.calibration.commprobe.probe_p2p`), and its
  all-reduce, all-gather and reduce-scatter over 2, 4, .. ranks up to a node's devices, each fitted
  the same way (:func:`pipetrain.calibration.collprobe.probe_collectives`); on CPU
  also the wake-up latency of a blocked receiver while every core computes
  (:func:`pipetrain.calibration.commprobe.probe_wakeup`), which the topology's node then carries,
  and with the cores idle, which sets the link's latency (:meth:`Calibration.pipeline_latency_s`);
* on CPU, how fast a rank computes while ``k`` others of the node compute too (``k`` up to the
  topology's ranks per node; :func:`pipetrain.calibration.corun.probe_corun`), which the node
  carries as ``corun_speed``, and what a wait costs the next action (cold caches;
  :func:`pipetrain.calibration.corun.probe_resume`; the node's ``resume_s``) and what another process
  running on its core meanwhile costs it (the node's ``switch_s``);
* on CPU, the executor's own overhead over the profiled blocks: a one-rank executor run of each
  model and shape (:mod:`pipetrain.calibration.overhead`);
* the optimizer step as the executor runs it (global-norm clipping, the update, zeroing the
  gradients) on the model's own parameters, fitted as ``fixed_s + per_param_s * params``
  (non-negative least squares);

then fits the analytic roofline's factors to the block profiles with ``scipy.optimize``
(:func:`pipetrain.calibration.fit.fit_calibration`). :class:`Calibration` is the stored
result; :func:`calibrated_cost` turns it into a cost model (the profiled block times where a
profile of that model and shape exists, the fitted analytic model elsewhere, the measured
optimizer cost) and :func:`calibrated_topology` puts the measured link into the topology.
``pipetrain plan|simulate --calibration FILE`` use both. Torch is imported only to measure.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from pipetrain.calibration.commprobe import P2PCost
from pipetrain.calibration.measured import Calibration, OptimizerCost
from pipetrain.calibration.profile import BlockProfile
from pipetrain.calibration.tpcost import TensorParallelCost
from pipetrain.errors import ConfigError
from pipetrain.graph import LayerGraph
from pipetrain.sharding import CollectiveFit

__all__ = ["measure_optimizer", "typical_profile", "run_calibration", "describe"]


def measure_optimizer(model: str | Sequence[str], optimizer: str, *, device: str = "cpu", threads: int = 1, clip_norm: float = 1.0,
                      repeats: int = 15, seed: int = 0) -> OptimizerCost:
    """Time the executor's end-of-step update on growing prefixes of each model's blocks and fit
    ``fixed + per_param * params`` over all of them (the calibrated models span the sizes used).

    The work timed is the executor's own end of step on one rank, the same calls:
    :meth:`pipetrain.executor.optim.GradSync.sync` (the squared gradient norms, the clip scale),
    the optimizer's step (as :func:`~pipetrain.executor.optim.make_optimizer` builds it) and
    zeroing the gradients (:func:`~pipetrain.executor.optim.grads_to_none`). Each round gives the
    parameters fresh gradients first, as the next step's backward does (untimed).
    """
    import numpy as np
    import torch
    from scipy.optimize import lsq_linear

    from pipetrain.executor.optim import GradSync, OptimConfig, grads_to_none, make_optimizer, unique_params
    from pipetrain.planner.zoo import get_model_spec

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        groups = []
        for name in [model] if isinstance(model, str) else list(model):
            blocks = list(get_model_spec(name).build(torch.device(device), seed=seed).blocks)
            for k in sorted({1, max(1, len(blocks) // 2), len(blocks)}):
                params = unique_params(blocks[:k])
                cfg = OptimConfig(name=optimizer, clip_norm=clip_norm)
                sync = GradSync(params, dp_group=None, pp_group=None, ties=[], clip_norm=clip_norm, telemetry=None, stage=0)
                groups.append((params, make_optimizer(params, cfg), sync))
        samples: list[list[float]] = [[] for _ in groups]

        to_none = grads_to_none(device)

        def once(params: list, opt: Any, sync: GradSync) -> float:
            for p in params:  # what the next step's backward leaves (untimed)
                if p.grad is None:
                    p.grad = torch.randn_like(p).mul_(1e-3)
                else:
                    p.grad.normal_(0.0, 1e-3)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sync.sync()
            opt.step()
            opt.zero_grad(set_to_none=to_none)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        for r in range(repeats + 3):  # rounds interleave the sizes: a burst of outside load hits all alike
            for i, (params, opt, sync) in enumerate(groups):
                t = once(params, opt, sync)
                if r >= 3:
                    samples[i].append(t)
        sizes = [sum(p.numel() for p in params) for params, _, _ in groups]
        secs = [statistics.median(ts) for ts in samples]
    finally:
        torch.set_num_threads(old)
    x = np.asarray(sizes, dtype=float)
    y = np.asarray(secs)
    w = 1.0 / y  # relative error: the small stage matters as much as the big one
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    res = lsq_linear(a, y * w, bounds=([0.0, 0.0], [np.inf, np.inf]))
    return OptimizerCost(optimizer=optimizer, fixed_s=float(res.x[0]), per_param_s=float(res.x[1]),
                         params=tuple(int(v) for v in sizes), seconds=tuple(float(v) for v in secs))


def typical_profile(profiles: Sequence[BlockProfile]) -> BlockProfile:
    """Per block, the median over the rounds of its forward and of its backward median."""
    if not profiles:
        raise ConfigError("typical_profile needs at least one profile")
    first = profiles[0]
    blocks = []
    for i, b in enumerate(first.blocks):
        blocks.append(replace(b, fwd_s=statistics.median(p.blocks[i].fwd_s for p in profiles),
                              bwd_s=statistics.median(p.blocks[i].bwd_s for p in profiles)))
    return replace(first, blocks=tuple(blocks), repeats=first.repeats * len(profiles))


def run_calibration(topology: str, *, models: Sequence[str] = ("tiny-gpt",), micro_batch_sizes: Sequence[int] = (1, 4),
                    seq_len: int | None = None, dtype: str = "fp32", threads: int = 1, warmup: int = 2, repeats: int = 7,
                    optimizers: Sequence[str] = ("adamw", "sgd"), probe: bool = True, rounds: int = 5,
                    shapes: Sequence[tuple[str, int]] = (), runtime: bool = True, tensor_parallel: Sequence[int] = (),
                    progress: Callable[[str], None] | None = None) -> Calibration:
    """Measure and fit (module docstring). ``probe`` False skips the p2p probe (keeps the topology's link).

    Each block is profiled in ``rounds`` independent rounds (each the median of ``repeats``) and
    the median over the rounds is kept (:func:`typical_profile`): a machine's speed can wander
    between windows of a few seconds even with nothing else running, with little correlation from
    one window to the next (figures: benchmarks/RESULTS.md), and the runs it predicts see the
    typical speed, not the best moment (the smallest round, kept before, made the simulation fast
    by about that wander).
    ``shapes`` (model, micro-batch size) pairs replace ``models`` x ``micro_batch_sizes``.
    ``runtime`` runs the executor on one rank per shape to measure its overhead over the profile
    (:mod:`pipetrain.calibration.overhead`; CPU only here). ``tensor_parallel``: tp degrees at which
    to run the executor per transformer model and shape (:mod:`pipetrain.calibration.tpcost`).
    """
    from pipetrain.calibration.fit import fit_calibration
    from pipetrain.calibration.profile import local_device_name, profile_model
    from pipetrain.planner.trace import trace_graph
    from pipetrain.topology import resolve_topology

    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    topo = resolve_topology(topology)
    dt = topo.devices[0].type
    if any(d.type.name != dt.name for d in topo.devices):
        raise ConfigError(f"topology {topo.name} mixes device types; calibrate one type at a time (a topology of that type only)")
    pairs = list(shapes) or [(m, b) for m in models for b in micro_batch_sizes]
    if not pairs:
        raise ConfigError("calibrate needs at least one model and one micro-batch size")
    models = list(dict.fromkeys(m for m, _ in pairs))
    if threads < 1 or warmup < 0 or repeats < 1 or rounds < 1:
        raise ConfigError(f"calibrate needs threads, repeats and rounds >= 1 and warmup >= 0, got {threads}, {repeats}, {rounds}, {warmup}")
    from pipetrain.planner.zoo import get_model_spec

    for model, mbs in pairs:  # every mistake before the first measurement
        get_model_spec(model).check_shape(mbs, seq_len)
    for tp in tensor_parallel:
        if not 2 <= tp <= topo.num_devices:
            raise ConfigError(f"--tp {tp}: needs 2 <= tp <= the topology's {topo.num_devices} devices")
    if dt.kind == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"topology {topo.name} is made of GPUs ({dt.name}) but this machine has none: calibrate a local-cpu:N topology here")
        device, backend = "cuda", "nccl"
    else:
        device, backend = "cpu", "gloo"
    samples: list[tuple[LayerGraph, BlockProfile]] = []
    for model, mbs in pairs:
        say(f"profiling {model} blocks at micro-batch {mbs} on {device} ({threads} thread(s))")
        graph = trace_graph(model, micro_batch_size=mbs, seq_len=seq_len, dtype=dtype)
        # no saved-tensor hooks: the executor counts activations with them in its first step only
        profs = [profile_model(model, micro_batch_size=mbs, seq_len=seq_len, dtype=dtype, device=device, threads=threads,
                               warmup=warmup, repeats=repeats) for _ in range(rounds)]
        samples.append((graph, typical_profile(profs)))
    opts = []
    for name in optimizers:
        say(f"timing the {name} step on {', '.join(models)}'s parameters")
        opts.append(measure_optimizer(models, name, device=device, threads=threads))
    if probe:
        from pipetrain.calibration.commprobe import probe_p2p

        say(f"probing {backend} point-to-point latency and bandwidth")
        p2p = probe_p2p(backend=backend)
    else:
        link = topo.nodes[0].link
        p2p = P2PCost(backend=backend, latency_s=link.latency_s, bandwidth_bytes_per_s=link.bandwidth_bytes_per_s)
    collectives = _probe_collectives(topo, backend, say) if probe else ()
    wakeup = None
    if probe and device == "cpu":
        from pipetrain.calibration.commprobe import probe_wakeup

        say(f"probing the wake-up latency of a blocked receiver with all {os.cpu_count() or 1} cores busy")
        wakeup = probe_wakeup(cores=os.cpu_count() or 1)
    corun, resume = [], []
    if probe and device == "cpu":
        from pipetrain.calibration.corun import probe_corun, probe_resume

        jobs = max(sum(1 for d in topo.devices if d.node == n) for n in range(len(topo.nodes)))
        for _g, prof in samples:
            say(f"measuring the speed of 1..{jobs} ranks computing {prof.model} micro-batch {prof.micro_batch_size} at once")
            corun.append(probe_corun(prof.model, micro_batch_size=prof.micro_batch_size, seq_len=prof.seq_len, max_jobs=jobs,
                                     cores=os.cpu_count() or 1, threads=threads))
            say(f"timing {prof.model} micro-batch {prof.micro_batch_size} right after another action and after a wait")
            resume.append(probe_resume(prof.model, micro_batch_size=prof.micro_batch_size, seq_len=prof.seq_len, threads=threads))
    overheads, messages = [], []
    if runtime and device == "cpu":
        from pipetrain.calibration.overhead import measure_message_host_s, measure_runtime_overhead

        for _g, prof in samples:
            say(f"running the executor on one rank: {prof.model} micro-batch {prof.micro_batch_size}")
            overheads.append(measure_runtime_overhead(prof, threads=threads))
            say(f"running the executor on one and two ranks for the host cost of a message: {prof.model} micro-batch {prof.micro_batch_size}")
            messages.append(measure_message_host_s(prof, threads=threads))
    tp_costs = _measure_tensor_parallel(samples, tensor_parallel, threads, say)
    say("fitting the analytic cost model (scipy.optimize.least_squares)")
    fit = fit_calibration(samples, dt)
    return Calibration(topology=topo.name, device_type=dt.name, device=local_device_name(device, threads), device_kind=dt.kind,
                       threads=threads, cores=os.cpu_count() or 1, p2p=p2p, optimizers=tuple(opts), fit=fit,
                       profiles=tuple(p for _, p in samples), runtime=tuple(overheads), messages=tuple(messages), wakeup=wakeup,
                       corun=tuple(corun), resume=tuple(resume), collectives=collectives, tensor_parallel=tp_costs,
                       created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       elapsed_s=time.perf_counter() - t_start)


def _probe_collectives(topo: Any, backend: str, say: Callable[[str], None]) -> tuple[CollectiveFit, ...]:
    """The backend's all-reduce, all-gather and reduce-scatter over 2, 4, 8.. ranks, up to the
    topology's devices per node (:mod:`pipetrain.calibration.collprobe`): the groups a tensor-parallel
    or data-parallel collective inside a node can have."""
    from pipetrain.calibration.collprobe import probe_collectives

    per_node = max(sum(1 for d in topo.devices if d.node == n) for n in range(len(topo.nodes)))
    if backend == "nccl":  # one process per GPU: NCCL refuses two ranks on one device
        import torch

        per_node = min(per_node, torch.cuda.device_count())
    sizes = tuple(2 ** k for k in range(1, 8) if 2 ** k <= per_node)
    if not sizes:
        return ()
    say(f"probing {backend} all-reduce, all-gather and reduce-scatter over {', '.join(map(str, sizes))} ranks")
    return probe_collectives(backend=backend, group_sizes=sizes)


def _measure_tensor_parallel(samples: Sequence[tuple[LayerGraph, BlockProfile]], degrees: Sequence[int], threads: int,
                             say: Callable[[str], None]) -> tuple[TensorParallelCost, ...]:
    """The executor on each of ``degrees`` tensor-parallel ranks, per profiled model and shape that can split so."""
    from pipetrain.calibration.tpcost import measure_tensor_parallel
    from pipetrain.program.shard import tp_block

    out = []
    for tp in sorted(set(degrees)):  # (checked against the topology before measuring anything)
        for graph, prof in samples:
            if tp_block(graph, tp) is not None:
                continue
            say(f"running the executor on {tp} tensor-parallel ranks: {prof.model} micro-batch {prof.micro_batch_size}")
            out.append(measure_tensor_parallel(prof, tp, threads=threads))
    return tuple(out)


def describe(cal: Calibration) -> list[tuple[str, str]]:
    """(what, value) rows for a terminal table."""
    rows = [("device", f"{cal.device} ({cal.device_type}, {cal.cores} cores)"),
            (f"p2p ({cal.p2p.backend})", f"latency {cal.p2p.latency_s * 1e6:.1f} us back to back, {cal.pipeline_latency_s() * 1e6:.1f} us "
                                         f"to a blocked receiver; bandwidth {cal.p2p.bandwidth_bytes_per_s / 1e9:.3g} GB/s")]
    for o in cal.optimizers:
        rows.append((f"{o.optimizer} step", f"{o.fixed_s * 1e3:.3f} ms + {o.per_param_s * 1e9:.3f} ns/param"))
    for p in cal.profiles:
        f = sum(b.fwd_s for b in p.blocks)
        b = sum(b.bwd_s for b in p.blocks)
        rows.append((f"{p.model} mbs {p.micro_batch_size} seq {p.seq_len}", f"F {f * 1e3:.3f} ms, B {b * 1e3:.3f} ms ({len(p.blocks)} blocks)"))
    for ro in cal.runtime:
        rows.append((f"executor overhead {ro.model} mbs {ro.micro_batch_size}",
                     f"x{ro.factor:.3f} per micro-batch + {ro.fixed_s * 1e3:.2f} ms per step; end of step {ro.end_of_step_s * 1e3:.2f} ms "
                     f"(one rank, m={ro.num_microbatches[0]}, {ro.num_microbatches[1]}: {ro.measured_step_s[0] * 1e3:.1f}, "
                     f"{ro.measured_step_s[1] * 1e3:.1f} ms)"))
    for mc in cal.messages:
        rows.append((f"host CPU per message {mc.model} mbs {mc.micro_batch_size}",
                     f"{mc.host_s * 1e6:.0f} us (outside compute per step: one rank {mc.outside_one_rank_s * 1e3:.2f} ms, "
                     f"two ranks {', '.join(f'{t * 1e3:.2f}' for t in mc.outside_two_ranks_s)} ms; {mc.messages_per_rank} messages)"))
        if mc.pipeline_waited_actions or mc.pipeline_latency_messages:
            rows.append((f"two-rank pipeline {mc.model} mbs {mc.micro_batch_size}",
                         f"+{mc.pipeline_resume_s * 1e3:.2f} ms after a wait ({mc.pipeline_waited_actions} actions; back to back "
                         f"x{mc.pipeline_hot_ratio:.2f} the profile, {mc.pipeline_hot_actions} actions); speed "
                         f"{mc.pipeline_corun_speed:.2f} with both computing ({mc.pipeline_corun_actions} actions, 0: too few); "
                         f"{mc.pipeline_latency_s * 1e6:.0f} us to a blocked receiver ({mc.pipeline_latency_messages} messages"
                         f"{_jitter_text(mc.pipeline_latency_jitter)})"
                         + (f"; tied weights' all-reduce {mc.pipeline_allreduce_s * 1e3:.2f} ms at {mc.pipeline_allreduce_bytes // 1024} KiB "
                            f"({mc.pipeline_allreduce_steps} steps; it prices 2-rank all-reduces)" if mc.pipeline_allreduce_steps else "")))
    if cal.wakeup is not None:
        w = cal.wakeup
        rows.append(("wake-up on busy cores", f"{w.wakeup_s * 1e6:.0f} us ({w.nbytes} B ping-pong one way: {w.idle_one_way_s * 1e6:.0f} us "
                                              f"idle, {w.busy_one_way_s * 1e6:.0f} us with {w.busy_processes} busy processes)"))
    for c in cal.corun:
        rows.append((f"co-run speed {c.model} mbs {c.micro_batch_size}",
                     f"{', '.join(f'{v:.2f}' for v in c.speed)} with 1..{len(c.speed)} ranks computing on {c.cores} cores "
                     f"(alone {c.alone_s * 1e3:.1f} ms per micro-batch)"))
    for r in cal.resume:
        rows.append((f"after a wait {r.model} mbs {r.micro_batch_size}",
                     f"+{r.resume_s * 1e3:.2f} ms after a wait, +{r.switch_s * 1e3:.2f} ms after another process on its core "
                     f"({r.hot_s * 1e3:.2f} ms right after another, {r.cold_s * 1e3:.2f} ms after {r.gap_s * 1e3:.0f} ms idle, "
                     + (f"{r.after_other_s * 1e3:.2f} ms after the other process; " if r.after_other_s > 0 else "")
                     + f"half the blocks, {r.pairs} pairs)"))
    for tc in cal.tensor_parallel:
        rows.append((f"tp={tc.tp} compute {tc.model} mbs {tc.micro_batch_size}",
                     f"F x{tc.fwd_factor:.2f}, B x{tc.bwd_factor:.2f} the profile's ({tc.measured_fwd_s * 1e3:.2f}, "
                     f"{tc.measured_bwd_s * 1e3:.2f} ms per micro-batch; collectives {tc.measured_tp_comm_s * 1e3:.2f} ms apart)"))
    for cf in cal.collectives:
        rows.append((f"{cf.kind.replace('_', '-')} x{cf.ranks} ({cf.backend})",
                     f"{cf.latency_s * 1e6:.0f} us + {cf.per_byte_s * 1e9:.3f} ns/byte (measured "
                     + ", ".join(f"{b / 2**10:.0f} KiB {t * 1e3:.2f} ms" for b, t in zip(cf.sizes_bytes, cf.seconds)) + ")"))
    rows.append(("analytic fit", f"mean |error| {cal.fit.error_before * 100:.1f}% -> {cal.fit.error_after * 100:.1f}% "
                                 f"over {cal.fit.num_samples} block times"))
    return rows


def _jitter_text(jitter: tuple[float, ...]) -> str:
    """``; quartiles x0.12 / x0.16 / x0.31 of the mean`` (nothing without a distribution)."""
    if not jitter:
        return ""
    k = len(jitter)
    return "; quartiles " + " / ".join(f"x{jitter[min(k - 1, int(q * k))]:.2f}" for q in (0.25, 0.5, 0.75)) + " of the mean, sampled"
