"""One torchrun worker: build this rank's stages and train them by the plan's schedule.

Started by ``torchrun ... -m pipetrain.executor plan.json [options]`` (see ``__main__``);
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` come from torchrun. Backend: NCCL when
the plan places stages on CUDA, gloo on CPU. Every wait has a timeout (``--timeout``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.executor.config import RunConfig
from pipetrain.plan import Plan

__all__ = ["main"]


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
        raise RunError(f"the plan needs pp*dp*tp = {plan.pp}*{plan.dp}*{plan.tp} = {plan.world_size} processes but torchrun started {world}: "
                       f"use --nproc-per-node/--nnodes giving {plan.world_size} in total")
    on_cuda = plan.stages[0].on_gpu
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

    from pipetrain.executor.stage import build_meta, check_boundaries, load_spec
    from pipetrain.planner.trace import model_fingerprint

    spec = load_spec(plan.model)
    plan.check_graph(model_fingerprint(spec), plan.model)
    model = build_meta(spec)
    check_boundaries(plan, spec, model)
    from pipetrain.executor.launch import check_executor_runs

    check_executor_runs(plan, cfg, model)  # again: torchrun may start workers without the launcher
    if plan.dtype == "fp16":
        raise RunError("fp16 training needs loss scaling, which the executor does not do: use dtype bf16 or fp32")

    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    backend = "nccl" if on_cuda else "gloo"
    kw: dict[str, Any] = {"device_id": device} if on_cuda else {}
    dist.init_process_group(backend, timeout=timeout, **kw)
    try:
        cfg = _resume_after_restart(cfg, device)
        return _train(cfg, plan, spec, model, device, timeout, rank, run_dir)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def _resume_after_restart(cfg: RunConfig, device: Any) -> RunConfig:
    """After an elastic restart every rank resumes from the newest checkpoint that verifies.

    Agreed by all ranks (the largest restart count): across nodes only the agent whose worker
    failed counts a restart; the others restart theirs for the new rendezvous round, which torch
    does not count (``TORCHELASTIC_RESTART_COUNT`` stays 0 there).
    """
    import torch

    from pipetrain.executor.comm import agree_max

    restart = agree_max(torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))], dtype=torch.int64), device)
    os.environ["PIPETRAIN_RESTART"] = str(restart)  # the test fault hook fires in the first attempt only
    if restart == 0 or cfg.resume:
        return cfg
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"elastic restart {restart}: resuming from the newest checkpoint", flush=True)
    return dataclasses.replace(cfg, resume=True)


def _train(cfg: RunConfig, plan: Plan, spec: Any, model: Any, device: Any, timeout: Any, rank: int, run_dir: Path) -> int:
    from pipetrain.executor.heartbeat import Heartbeat
    from pipetrain.executor.trainer import Trainer

    hb = Heartbeat(run_dir, rank, interval_s=min(1.0, cfg.progress_timeout_s / 4))
    try:
        tr = Trainer(cfg, plan, spec, model, device, timeout, rank, run_dir)
        tr.rt.progress = hb.progress
        if cfg.resume and rank == 0:
            print(f"resuming at step {tr.start_step}", flush=True)
        for step in range(tr.start_step, cfg.steps):
            tr.train_step(step)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                hb.progress(step, "checkpoint")
                tr.checkpoint(step + 1)
        if cfg.save_final:
            tr.save_final()
        tr.telemetry.close()
        hb.progress(cfg.steps, "writing result.json")
        _write_result(plan, cfg, run_dir, rank)
    finally:
        hb.close()
    return 0


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
