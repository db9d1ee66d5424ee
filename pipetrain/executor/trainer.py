"""One rank's training state and step: stages, buffers, groups, optimizer, data, telemetry.

:class:`Trainer` is built inside an initialized process group (by the torchrun worker, or by
``benchmarks/vs_torch_pipelining.py``); :meth:`Trainer.train_step` runs one step: the
schedule's actions (:mod:`pipetrain.executor.runtime`), gradient sync and clipping
(:mod:`pipetrain.executor.optim`), the optimizer, then the step's telemetry record.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipetrain.executor.config import RunConfig
from pipetrain.plan import Plan, TensorSpec

__all__ = ["Trainer"]


class Trainer:
    def __init__(self, cfg: RunConfig, plan: Plan, spec: Any, model: Any, device: Any, timeout: Any, rank: int,
                 run_dir: Path) -> None:
        import torch
        import torch.distributed as dist

        from pipetrain.executor.checkpoint import RankState
        from pipetrain.executor.comm import BufferPool, RankLayout, agree_max, make_groups, torch_dtype
        from pipetrain.executor.data import BatchSampler, make_source, warn_dropped
        from pipetrain.executor.hooks import fault_hook, grad_scale_hook
        from pipetrain.executor.optim import GradSync, MasterWeights, OptimConfig, grads_to_none, make_optimizer, unique_params
        from pipetrain.executor.parallel import (
            before_backward,
            counts_in_norm,
            local,
            loss_context,
            make_mesh,
            parallelize_stage,
            shard_stage,
            uses_mesh,
        )
        from pipetrain.executor.runtime import PipelineRuntime, StageRuntime
        from pipetrain.executor.stage import materialize_blocks, stage_modules, ties_of, vocab_size_of
        from pipetrain.executor.telemetry import Telemetry
        from pipetrain.program import lower

        self.cfg, self.plan, self.spec, self.device, self.rank, self.run_dir = cfg, plan, spec, device, rank, run_dir
        layout = self.layout = RankLayout(pp=plan.pp, dp=plan.dp, rank=rank, tp=plan.tp)
        tel = self.telemetry = Telemetry(run_dir, rank, enabled=cfg.telemetry)
        tel.use_cuda(device)
        tel.align(dist)
        program = self.program = lower(plan)
        my_stages = self.my_stages = plan.stages_of_rank(layout.pp_rank)
        my_blocks = [b for st in my_stages for b in range(st.block_start, st.block_end)]
        materialize_blocks(model, my_blocks, device, plan.seed)
        ties = ties_of(model)
        p2p_groups = dist.get_backend() == "nccl" or os.environ.get("PIPETRAIN_P2P_GROUPS", "") == "1"
        mesh: Any = make_mesh(plan, device.type) if uses_mesh(plan) else None
        self.mesh = mesh
        groups = self.groups = make_groups(plan, layout, ties, timeout, p2p_groups=p2p_groups, mesh=mesh)
        for tg in groups.ties:
            p = model.blocks[tg.blocks_here[0]].get_parameter(tg.name)
            with torch.no_grad():
                dist.broadcast(p.data, src=tg.owner_rank, group=tg.group)
        modules = self.modules = stage_modules(model, my_stages, plan.recompute)
        for m in modules.values():
            m.train()
            # tensor parallelism first, then FSDP2 over dp on the tp-sharded parameters (torchtitan's order);
            # both replace the parameters, so everything below takes them from the modules afterwards
            if plan.tp > 1:
                parallelize_stage(m, mesh["tp"], sequence_parallel=plan.sequence_parallel)
            if plan.zero > 0:
                shard_stage(m, mesh["dp"], plan.zero, plan.precision)
        # bf16-mixed without ZeRO: fp32 masters in the optimizer, bf16 working weights (with ZeRO FSDP2 does it)
        self.master = MasterWeights(modules.values()) if plan.precision == "bf16-mixed" and plan.zero == 0 else None
        tie_params: list[tuple[Any, Any, bool]] = []
        for tg in groups.ties:
            p = model.blocks[tg.blocks_here[0]].get_parameter(tg.name)
            tie_params.append((self.master.master_of(p) if self.master else p, tg.group, tg.owner_rank == rank))
        self.tie_params = tie_params

        ex = spec.example_input(plan.micro_batch_size, plan.seq_len, device="meta")
        first_spec = TensorSpec(shape=tuple(ex.shape), dtype=str(ex.dtype).replace("torch.", ""))
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
                in_pool=BufferPool(in_spec, program.act_slots[s], device, what=f"stage {s} input"),
                grad_pool=BufferPool(out_spec, program.grad_slots[s], device, what=f"stage {s} output grad") if out_spec else None,
                recompute=st.recompute, prev_local=prev_r == layout.pp_rank, next_local=next_r == layout.pp_rank,
                out_dtype=torch_dtype(out_spec.dtype) if out_spec else None,
                recv_act_group=groups.p2p.get((s - 1, "act")), recv_grad_group=groups.p2p.get((s, "grad")),
                send_act_group=groups.p2p.get((s, "act")), send_grad_group=groups.p2p.get((s - 1, "grad")),
                before_backward=_tell_last(modules[s], plan.zero, before_backward) if plan.zero > 0 else None,
                # where collectives run inside F/B: tp's in every one, ZeRO-1's at the step's edges (the
                # first F's gather, the last B's reduce-scatter), ZeRO-2/3's in every micro-batch
                collectives="every" if plan.tp > 1 or plan.zero >= 2 else "edges" if plan.zero > 0 else "",
                loss_context=loss_context(plan) if s == last_index else None)
        self.runtimes = runtimes
        working = unique_params(modules.values())
        params = self.params = self.master.masters if self.master else working
        ocfg = OptimConfig(name=plan.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                           clip_norm=cfg.clip_norm)
        self.opt = make_optimizer(params, ocfg)
        self.grads_to_none = grads_to_none(device)
        self.sync = GradSync(params, dp_group=None if plan.zero > 0 else groups.dp_group, pp_group=groups.pp_group,
                             ties=tie_params, clip_norm=cfg.clip_norm, telemetry=tel, stage=my_stages[0].index,
                             stage_of=_stage_of(modules),
                             counts=(lambda g: counts_in_norm(g, layout)) if mesh is not None else None,
                             num_stages=plan.num_stages)
        autocast = torch.bfloat16 if plan.precision == "amp-autocast" and plan.dtype == "bf16" else None
        self.fault = fault_hook(rank)
        self.rt = PipelineRuntime(stages=runtimes, ops=program.rank_ops(layout.pp_rank), num_stages=plan.num_stages,
                                  num_microbatches=plan.num_microbatches, loss_fn=spec.loss,
                                  loss_scale=1.0 / (plan.num_microbatches * plan.dp), telemetry=tel, timeout=timeout,
                                  autocast_dtype=autocast, device=device, fault=self.fault)
        self.rt.saved.exclude = {local(p).untyped_storage().data_ptr() for p in working}  # weights autograd saves are not activations
        if plan.zero > 0:  # FSDP2 gathers the weights in its pre-forward hook: a later hook sees them
            for m in modules.values():
                m.register_forward_pre_hook(lambda mod, _a: self.rt.saved.use_params(mod))
                # and ZeRO-3 frees them after the forward: their addresses may then hold activations (the loss's)
                m.register_forward_hook(lambda _m, _a, _o: self.rt.saved.live.clear())

        self.need_inputs = 0 in runtimes
        self.need_targets = last_index in runtimes
        self.source = None
        if self.need_inputs or self.need_targets:
            self.source = make_source(cfg.dataset, task=spec.task, seq_len=plan.seq_len, vocab_size=vocab_size_of(spec, model),
                                      seed=plan.seed, input_shape=tuple(getattr(spec, "input_size", ()) or ()),
                                      num_classes=int(getattr(spec, "vocab_size", 0) or 0))
        n_samples = agree_max(torch.tensor([self.source.num_samples if self.source else 0], dtype=torch.int64), device)
        self.sampler = BatchSampler(num_samples=int(n_samples), micro_batch_size=plan.micro_batch_size,
                                    num_microbatches=plan.num_microbatches, dp=plan.dp, seed=plan.seed)
        if rank == 0 and self.source is not None:
            warn_dropped(self.sampler, self.source.name)

        # bf16-mixed without ZeRO: the optimizer steps fp32 masters, which the checkpoint holds
        masters = {id(w): self.master.master_of(w) for w in working} if self.master is not None else None
        self.ckpt = RankState(modules.values(), self.opt, ties, masters=masters)
        self.start_step = 0
        if cfg.resume:
            self.start_step = self._resume()
        tel.record({"type": "meta", "rank": rank, "pp_rank": layout.pp_rank, "dp_rank": layout.dp_rank, "tp_rank": layout.tp_rank,
                    "stages": sorted(runtimes), "buffers": {st.index: st.buffers for st in my_stages},
                    "device": str(device), "backend": dist.get_backend(), "same_host_clock": getattr(tel, "same_host", True),
                    "start_step": self.start_step, "world_size": plan.world_size, "p2p_groups": len(groups.p2p)})
        # weights and gradients (bf16-mixed without ZeRO: bf16 working weights, fp32 masters and gradients)
        self.static_bytes = sum(local(p).numel() * p.element_size() for p in params) * 2
        if self.master is not None:
            self.static_bytes += sum(local(p).numel() * p.element_size() for p in working)
        #: the dtypes of the weights the stages computed with and of those the optimizer updates
        self.param_dtypes = {"master": sorted({str(p.dtype).replace("torch.", "") for p in params}), "working": []}
        self._working_seen: set[str] = set()
        for m in modules.values():
            lin = next((x for x in m.modules() if isinstance(x, torch.nn.Linear)), None)
            if lin is not None:
                lin.register_forward_pre_hook(lambda mod, _a: self._working_seen.add(str(local(mod.weight).dtype).replace("torch.", "")))
        self.pool_bytes = sum(r.in_pool.nbytes + (r.grad_pool.nbytes if r.grad_pool else 0) for r in runtimes.values())
        self.grad_scale = grad_scale_hook()
        self._comm_logged = False

    def batches(self, step: int) -> tuple[Any, Any]:
        from pipetrain.executor.data import batch_tensor

        src = self.source
        if src is None:  # neither the first nor the last stage is on this rank
            return None, None
        idx = self.sampler.indices(step)[self.layout.dp_rank]
        inputs = [batch_tensor(src.inputs, ids, self.device) for ids in idx] if self.need_inputs else None
        targets = [batch_tensor(src.targets, ids, self.device) for ids in idx] if self.need_targets else None
        return inputs, targets

    def train_step(self, step: int) -> float | None:
        """One step; returns the global-batch mean loss on last-stage ranks, else None."""
        import torch
        import torch.distributed as dist

        from pipetrain.executor.stage import microbatch_mean_loss
        from pipetrain.executor.telemetry import rss_bytes
        plan, tel, rt, device = self.plan, self.telemetry, self.rt, self.device
        tel.begin_step()
        t_step = time.perf_counter()
        cpu0, main0 = time.process_time(), time.thread_time()
        inputs, targets = self.batches(step)
        rt.saved.peak = 0
        losses = rt.run_step(step, inputs, targets)
        if self.grad_scale is not None:
            self.grad_scale(step, self.modules)
        if rt.progress is not None:
            rt.progress(step, "gradient sync and optimizer step")
        if self.master is not None:
            self.master.collect()
        norm = self.sync.sync()
        stage_norms = self.sync.stage_norms
        t0 = tel.now()
        self.opt.step()
        self.opt.zero_grad(set_to_none=self.grads_to_none)
        if self.master is not None:
            self.master.copy_to_working()
        tel.add("OPT", self.my_stages[0].index, -1, t0, tel.now())
        loss = None
        if self.need_targets:
            lsum = microbatch_mean_loss(losses)
            if self.groups.dp_group is not None:
                dist.all_reduce(lsum, group=self.groups.dp_group)
                lsum /= plan.dp
            loss = float(lsum)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - t_step
        # CPU time of the step: this thread, and the whole process (with gloo's threads)
        cpu_s, main_s = time.process_time() - cpu0, time.thread_time() - main0
        from pipetrain.executor.parallel import local

        opt_bytes = sum(local(t).numel() * t.element_size() for st_ in self.opt.state.values() for t in st_.values()
                        if torch.is_tensor(t))
        mem = {"tensor_bytes": self.static_bytes + opt_bytes + self.pool_bytes + rt.saved.peak,
               "activation_bytes_peak": rt.saved.peak, "param_bytes": self.static_bytes // 2, "optimizer_bytes": opt_bytes,
               "buffer_bytes": self.pool_bytes, "rss_bytes": rss_bytes()}
        if device.type == "cuda":
            mem["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        rts = self.runtimes.values()
        tel.flush_step(step, {
            "loss": loss, "step_time_s": step_s, "end_unix_s": time.time(), "cpu_main_s": main_s, "cpu_process_s": cpu_s,
            "grad_norm": norm, "stage_grad_norms": stage_norms,
            "in_flight_peak": {str(k): v for k, v in rt.in_flight_peak.items()},
            "recv_buffer_allocations": sum(r.in_pool.allocations + (r.grad_pool.allocations if r.grad_pool else 0) for r in rts),
            "recv_buffer_storages": sum(len(r.in_pool.used_ptrs) + (len(r.grad_pool.used_ptrs) if r.grad_pool else 0) for r in rts),
            "memory": mem, "param_dtypes": {**self.param_dtypes, "working": sorted(self._working_seen)},
            **({"comm_order": rt.comm_log} if rt.comm_log and not self._comm_logged else {})})
        self._comm_logged = True
        self.last_step_s = step_s
        return loss

    def _resume(self) -> int:
        """Load the newest checkpoint that verifies (rank 0 looks, every rank loads); return its step."""
        import torch.distributed as dist

        from pipetrain.errors import RunError
        from pipetrain.executor.checkpoint import check_resumable, find_checkpoint, same_layout

        got: list[Any] = [None]
        if self.rank == 0:
            try:
                got[0] = find_checkpoint(self.run_dir)
            except RunError as exc:  # every rank raises it, none waits for the others
                got[0] = exc
        dist.broadcast_object_list(got, src=0)
        found = got[0]
        if isinstance(found, RunError):
            raise RunError(str(found))
        if found is None:
            return 0
        check_resumable(found, self.plan, self.run_dir)
        if self.rank == 0 and found.skipped:
            print(f"resume: {found.describe_skipped()}; resuming from step {found.step}", file=sys.stderr, flush=True)
        self.ckpt.load(self.run_dir, found, self.rank, restore_rng=same_layout(found, self.plan))
        return found.step

    def checkpoint(self, step: int) -> None:
        """Save the state after ``step`` steps (collective; see :mod:`pipetrain.executor.checkpoint`)."""
        from pipetrain.executor.checkpoint import write_checkpoint

        write_checkpoint(self.run_dir, step, self.ckpt.state(step, self.rank), self.plan, rank=self.rank, fault=self.fault)

    def save_final(self) -> None:
        import torch

        from pipetrain.executor.parallel import full_state

        final = self.run_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        if self.mesh is not None:  # full tensors in the model's layout (collective: every rank of the mesh gathers)
            states = {s: full_state(m) for s, m in self.modules.items()}
        else:  # bf16-mixed: the fp32 masters, not their bf16 working copies
            states = {s: {k: v.detach().cpu() for k, v in (self.master.full_precision_state(m) if self.master else m.state_dict()).items()}
                      for s, m in self.modules.items()}
        torch.save(states, final / f"rank{self.rank}.pt")


def _tell_last(module: Any, zero: int, fn: Callable[[Any, int, bool], None]) -> Callable[[bool], None]:
    """``fn(module, zero, last)`` as the stage's before-backward hook."""
    return lambda last: fn(module, zero, last)


def _stage_of(modules: dict[int, Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in sorted(modules):
        for p in modules[s].parameters():
            out.setdefault(id(p), s)
    return out
