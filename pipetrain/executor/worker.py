"""One torchrun worker: build this rank's stages and train them by the plan's schedule.

Started by ``torchrun ... -m pipetrain.executor plan.json [options]`` (see ``__main__``);
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` come from torchrun. Backend: NCCL when
the plan places stages on CUDA, gloo on CPU. Every wait has a timeout (``--timeout``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.errors import RunError
from pipetrain.executor.config import RunConfig
from pipetrain.plan import Plan, TensorSpec

__all__ = ["main", "plan_hash"]


def plan_hash(plan: Plan) -> str:
    return hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]


def _fault_hook(rank: int) -> Any:
    """Test hook: ``PIPETRAIN_FAULT=rank:step:action:raise|kill`` fails that rank mid-step."""
    spec = os.environ.get("PIPETRAIN_FAULT", "")
    if not spec:
        return None
    r, st, act, mode = spec.split(":")
    if int(r) != rank:
        return None

    def hook(step: int, n_action: int) -> None:
        if step == int(st) and n_action == int(act):
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {step}, action {n_action}")

    return hook


def _grad_scale_hook() -> Any:
    """Validation test hook: ``PIPETRAIN_INJECT_GRAD_SCALE=stage:factor`` multiplies that stage's
    gradients by ``factor`` after every backward (a deliberately broken pipeline)."""
    spec = os.environ.get("PIPETRAIN_INJECT_GRAD_SCALE", "")
    if not spec:
        return None
    stage_text, _, factor_text = spec.partition(":")
    stage, factor = int(stage_text), float(factor_text)

    def hook(step: int, modules: dict[int, Any]) -> None:
        if stage in modules:
            for p in modules[stage].parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    return hook


def _stage_grad_norms(modules: dict[int, Any], ties: list[tuple[Any, Any, bool]], norm: float, clip_norm: float) -> dict[str, float]:
    """Per-stage gradient L2 norm before clipping (a tied copy counts only at its owner), as the reference computes it."""
    from pipetrain.executor.optim import clip_coefficient

    coef = clip_coefficient(norm, clip_norm)
    skip = {id(p) for p, _, owner in ties if not owner}
    out: dict[str, float] = {}
    for s in sorted(modules):
        sq = 0.0
        for p in modules[s].parameters():
            if id(p) in skip or p.grad is None:
                continue
            skip.add(id(p))
            sq += float(p.grad.detach().double().pow(2).sum())
        out[str(s)] = sq ** 0.5 / coef
    return out


def main(cfg: RunConfig) -> int:
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    run_dir = Path(cfg.run_dir)
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{rank}").write_text(str(os.getpid()))

    plan = Plan.load(cfg.plan_path)
    if world != plan.world_size:
        raise RunError(f"the plan needs pp*dp = {plan.pp}*{plan.dp} = {plan.world_size} processes but torchrun started {world}: "
                       f"use --nproc-per-node/--nnodes giving {plan.world_size} in total")
    on_cuda = plan.stages[0].device.startswith("cuda")
    if on_cuda:
        if not torch.cuda.is_available():
            raise RunError("the plan places stages on CUDA but this machine has no GPU: re-plan with a CPU topology")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass

    from pipetrain.executor.stage import build_meta, check_boundaries, load_spec, materialize_blocks, stage_modules, ties_of
    from pipetrain.planner.trace import model_fingerprint

    spec = load_spec(plan.model)
    plan.check_graph(model_fingerprint(spec), plan.model)
    model = build_meta(spec)
    check_boundaries(plan, spec, model)
    if plan.dtype == "fp16":
        raise RunError("fp16 training needs loss scaling, which the executor does not do: use dtype bf16 or fp32")

    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    backend = "nccl" if on_cuda else "gloo"
    kw: dict[str, Any] = {"device_id": device} if on_cuda else {}
    dist.init_process_group(backend, timeout=timeout, **kw)
    try:
        return _train(cfg, plan, spec, model, device, timeout, rank, run_dir)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def _train(cfg: RunConfig, plan: Plan, spec: Any, model: Any, device: Any, timeout: Any, rank: int, run_dir: Path) -> int:
    import torch
    import torch.distributed as dist

    from pipetrain.executor.checkpoint import load_rank, mark_latest, save_rank
    from pipetrain.executor.comm import BufferPool, RankLayout, make_groups, torch_dtype
    from pipetrain.executor.data import BatchSampler, make_source, warn_dropped
    from pipetrain.executor.optim import GradSync, OptimConfig, make_optimizer, unique_params
    from pipetrain.executor.runtime import PipelineRuntime, StageRuntime
    from pipetrain.executor.stage import materialize_blocks, stage_modules, ties_of, vocab_size_of
    from pipetrain.executor.telemetry import Telemetry, rss_bytes
    from pipetrain.schedules import make_schedule

    layout = RankLayout(pp=plan.pp, dp=plan.dp, rank=rank)
    tel = Telemetry(run_dir, rank, enabled=cfg.telemetry)
    tel.align(dist)
    schedule = make_schedule(plan.schedule, plan.pp, plan.num_microbatches, plan.chunks,
                             buffers=[st.buffers for st in plan.stages])
    my_stages = plan.stages_of_rank(layout.pp_rank)
    my_blocks = [b for st in my_stages for b in range(st.block_start, st.block_end)]
    materialize_blocks(model, my_blocks, device, plan.seed)
    ties = ties_of(model)
    groups = make_groups(plan, layout, ties, timeout)
    tie_params: list[tuple[Any, Any, bool]] = []
    for tg in groups.ties:
        path = tg.name
        p = model.blocks[tg.blocks_here[0]].get_parameter(path)
        with torch.no_grad():
            dist.broadcast(p.data, src=tg.owner_rank, group=tg.group)
        tie_params.append((p, tg.group, tg.owner_rank == rank))
    modules = stage_modules(model, my_stages)
    for m in modules.values():
        m.train()

    first_spec = TensorSpec(shape=tuple(spec.example_input(plan.micro_batch_size, plan.seq_len, device="meta").shape),
                            dtype=str(spec.example_input(1, plan.seq_len, device="meta").dtype).replace("torch.", ""))
    runtimes: dict[int, StageRuntime] = {}
    last_index = plan.num_stages - 1
    for st in my_stages:
        s = st.index
        in_spec = first_spec if s == 0 else st.inputs[0]
        out_spec = st.outputs[0] if s < last_index else None
        prev_r = plan.stages[s - 1].rank if s > 0 else None
        next_r = plan.stages[s + 1].rank if s < last_index else None
        runtimes[s] = StageRuntime(
            index=s, module=modules[s], is_first=s == 0, is_last=s == last_index,
            prev_rank=layout.global_rank(prev_r) if prev_r is not None else None,
            next_rank=layout.global_rank(next_r) if next_r is not None else None,
            in_pool=BufferPool(in_spec, st.buffers, device, what=f"stage {s} input"),
            grad_pool=BufferPool(out_spec, st.buffers, device, what=f"stage {s} output grad") if out_spec else None,
            recompute=st.recompute, prev_local=prev_r == layout.pp_rank, next_local=next_r == layout.pp_rank,
            out_dtype=torch_dtype(out_spec.dtype) if out_spec else None)
    params = unique_params(modules.values())
    ocfg = OptimConfig(name=plan.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                       clip_norm=cfg.clip_norm)
    opt = make_optimizer(params, ocfg)
    sync = GradSync(params, dp_group=groups.dp_group, pp_group=groups.pp_group, ties=tie_params,
                    clip_norm=cfg.clip_norm, telemetry=tel, stage=my_stages[0].index)
    autocast = torch.bfloat16 if plan.dtype == "bf16" else None
    rt = PipelineRuntime(stages=runtimes, order=schedule.compute_order(layout.pp_rank), num_stages=plan.num_stages,
                         num_microbatches=plan.num_microbatches, loss_fn=spec.loss,
                         loss_scale=1.0 / (plan.num_microbatches * plan.dp), telemetry=tel, timeout=timeout,
                         autocast_dtype=autocast, device=device, fault=_fault_hook(rank))

    need_inputs = 0 in runtimes
    need_targets = last_index in runtimes
    source = None
    if need_inputs or need_targets:
        source = make_source(cfg.dataset, task=spec.task, seq_len=plan.seq_len, vocab_size=vocab_size_of(spec, model),
                             seed=plan.seed, input_shape=tuple(getattr(spec, "input_size", ()) or ()),
                             num_classes=int(getattr(spec, "vocab_size", 0) or 0))
    n_samples = torch.tensor([source.num_samples if source else 0], dtype=torch.int64)
    n_samples = _agree_max(n_samples, device)
    sampler = BatchSampler(num_samples=int(n_samples), micro_batch_size=plan.micro_batch_size,
                           num_microbatches=plan.num_microbatches, dp=plan.dp, seed=plan.seed)
    if rank == 0 and source is not None:
        warn_dropped(sampler, source.name)

    phash = plan_hash(plan)
    start_step = 0
    if cfg.resume:
        state = load_rank(run_dir, rank, phash)
        if state is not None:
            for s, sd in state["model"].items():
                modules[int(s)].load_state_dict(sd)
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start_step = int(state["step"])
    tel.record({"type": "meta", "rank": rank, "pp_rank": layout.pp_rank, "dp_rank": layout.dp_rank,
                "stages": sorted(runtimes), "buffers": {s: st.buffers for s, st in zip([x.index for x in my_stages], my_stages)},
                "device": str(device), "backend": dist.get_backend(), "same_host_clock": getattr(tel, "same_host", True),
                "start_step": start_step, "world_size": plan.world_size})

    static_bytes = sum(p.numel() * p.element_size() for p in params) * 2
    pool_bytes = sum(r.in_pool.nbytes + (r.grad_pool.nbytes if r.grad_pool else 0) for r in runtimes.values())
    grad_scale = _grad_scale_hook()
    for step in range(start_step, cfg.steps):
        t_step = time.perf_counter()
        idx = sampler.indices(step)[layout.dp_rank]
        inputs = [_batch(source.inputs, ids, device) for ids in idx] if need_inputs else None
        targets = [_batch(source.targets, ids, device) for ids in idx] if need_targets else None
        rt.saved.peak = 0
        losses = rt.run_step(step, inputs, targets)
        if grad_scale is not None:
            grad_scale(step, modules)
        norm = sync.sync()
        stage_norms = _stage_grad_norms(modules, tie_params, norm, cfg.clip_norm)
        t0 = tel.now()
        opt.step()
        opt.zero_grad(set_to_none=False)
        tel.add("OPT", my_stages[0].index, -1, t0, tel.now())
        loss = None
        if need_targets:
            lsum = torch.stack(losses).sum().float().reshape(1) / plan.num_microbatches
            if groups.dp_group is not None:
                dist.all_reduce(lsum, group=groups.dp_group)
                lsum /= plan.dp
            loss = float(lsum)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - t_step
        opt_bytes = sum(t.numel() * t.element_size() for st_ in opt.state.values() for t in st_.values() if torch.is_tensor(t))
        mem = {"tensor_bytes": static_bytes + opt_bytes + pool_bytes + rt.saved.peak,
               "activation_bytes_peak": rt.saved.peak, "param_bytes": static_bytes // 2, "optimizer_bytes": opt_bytes,
               "buffer_bytes": pool_bytes, "rss_bytes": rss_bytes()}
        if device.type == "cuda":
            mem["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        tel.flush_step(step, {
            "loss": loss, "step_time_s": step_s, "grad_norm": norm, "stage_grad_norms": stage_norms, "in_flight_peak": {str(k): v for k, v in rt.in_flight_peak.items()},
            "recv_buffer_allocations": sum(r.in_pool.allocations + (r.grad_pool.allocations if r.grad_pool else 0) for r in runtimes.values()),
            "recv_buffer_storages": sum(len(r.in_pool.used_ptrs) + (len(r.grad_pool.used_ptrs) if r.grad_pool else 0) for r in runtimes.values()),
            "memory": mem})
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_rank(run_dir, step + 1, rank, {
                "step": step + 1, "plan_hash": phash, "model": {s: m.state_dict() for s, m in modules.items()},
                "optimizer": opt.state_dict(), "rng": torch.get_rng_state()})
            dist.barrier()
            if rank == 0:
                mark_latest(run_dir, step + 1, plan.world_size)
    if cfg.save_final:
        final = run_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        torch.save({s: {k: v.detach().cpu() for k, v in m.state_dict().items()} for s, m in modules.items()}, final / f"rank{rank}.pt")
    tel.close()
    _write_result(plan, cfg, run_dir, rank)
    return 0


def _agree_max(t: Any, device: Any) -> Any:
    import torch.distributed as dist

    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.cpu()[0])


def _batch(arr: Any, ids: np.ndarray, device: Any) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr[np.asarray(ids)]).astype(np.int64 if arr.dtype.kind in "iu" else np.float32)).to(device)


def _write_result(plan: Plan, cfg: RunConfig, run_dir: Path, rank: int) -> None:
    """All ranks' step records -> rank 0 writes RUN_DIR/result.json (works across nodes)."""
    import torch.distributed as dist

    from pipetrain.executor.result import build_result
    from pipetrain.executor.telemetry import read_rank_file

    mine = read_rank_file(run_dir, rank)
    gathered: list[Any] = [None] * dist.get_world_size() if rank == 0 else []
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    if rank == 0:
        res = build_result(plan, {r: recs for r, recs in enumerate(gathered)})
        out = run_dir / "result.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res.to_dict(), indent=1))
        tmp.replace(out)
