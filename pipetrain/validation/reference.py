"""The single-process reference: the same model, data, seed and micro-batching on one device.

It trains the full model in one process exactly as the pipeline defines the step: for each
data-parallel replica its ``m`` micro-batches in order, each loss scaled by ``1/(m*dp)``; the
replicas' gradients summed in replica order (the all-reduce); global-norm clipping (squared
norms summed in float64, as :class:`~pipetrain.executor.optim.GradSync`); AdamW or SGD. Stage
boundaries only cast to the plan's boundary dtype (a no-op in fp32), so with fp32 the pipeline
must reproduce its losses and weights up to summation order. Validation and the correctness
tests compare against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipetrain.plan import Plan

__all__ = ["ReferenceResult", "reference_run"]


@dataclass(frozen=True, kw_only=True)
class ReferenceResult:
    losses: tuple[float, ...]
    grad_norms: tuple[float, ...]
    state: dict[str, Any]  # full model state_dict ("blocks.{i}.*"), CPU tensors
    stage_grad_norms: tuple[tuple[float, ...], ...] = ()  # [step][stage], before clipping (tied copy at its owner)
    step_times_s: tuple[float, ...] = ()  # wall time of each step on this one device


def reference_run(plan: Plan, *, steps: int, dataset: str = "synthetic", lr: float = 0.0, weight_decay: float = 0.0,
                  momentum: float = 0.0, clip_norm: float = 1.0, device: str = "cpu", threads: int = 1) -> ReferenceResult:
    """Train ``steps`` steps; ``threads`` as the ranks use (kernel reduction order depends on it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(plan, steps=steps, dataset=dataset, lr=lr, weight_decay=weight_decay, momentum=momentum,
                    clip_norm=clip_norm, device=device)
    finally:
        torch.set_num_threads(before)


def _run(plan: Plan, *, steps: int, dataset: str, lr: float, weight_decay: float, momentum: float, clip_norm: float,
         device: str) -> ReferenceResult:
    import torch

    from pipetrain.executor.comm import torch_dtype
    from pipetrain.executor.data import BatchSampler, batch_tensor, make_source
    from pipetrain.executor.optim import OptimConfig, clip_coefficient, grad_of, make_optimizer, squared_norms, unique_params
    from pipetrain.executor.stage import build_meta, load_spec, materialize_blocks, microbatch_mean_loss, stage_modules, vocab_size_of

    spec = load_spec(plan.model)
    model = build_meta(spec)
    materialize_blocks(model, range(len(model.blocks)), device, plan.seed)
    model.train()
    tie_copies = _untie_across_stages(model, plan)
    stages = stage_modules(model, plan.stages)
    casts = [torch_dtype(st.outputs[0].dtype) if st.outputs else None for st in plan.stages]
    params = unique_params([model])
    opt = make_optimizer(params, OptimConfig(name=plan.optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                             clip_norm=clip_norm))
    source = make_source(dataset, task=spec.task, seq_len=plan.seq_len, vocab_size=vocab_size_of(spec, model), seed=plan.seed,
                         input_shape=tuple(getattr(spec, "input_size", ()) or ()),
                         num_classes=int(getattr(spec, "vocab_size", 0) or 0))
    sampler = BatchSampler(num_samples=source.num_samples, micro_batch_size=plan.micro_batch_size,
                           num_microbatches=plan.num_microbatches, dp=plan.dp, seed=plan.seed)
    autocast = torch.bfloat16 if plan.dtype == "bf16" else None
    m, dp = plan.num_microbatches, plan.dp
    losses: list[float] = []
    norms: list[float] = []
    stage_norms: list[tuple[float, ...]] = []
    times: list[float] = []
    dev = torch.device(device)
    import time

    for step in range(steps):
        t_step = time.perf_counter()
        idx = sampler.indices(step)
        replica_grads: list[list[torch.Tensor]] = []
        replica_loss = []
        for d in range(dp):
            for p in params:
                p.grad = None
            mb_losses = []
            for ids in idx[d]:
                x = batch_tensor(source.inputs, ids, dev)
                y = batch_tensor(source.targets, ids, dev)
                for s in range(len(plan.stages)):
                    if autocast is not None:
                        with torch.autocast(dev.type, dtype=autocast):
                            x = stages[s](x)
                    else:
                        x = stages[s](x)
                    if casts[s] is not None and x.dtype != casts[s]:
                        x = x.to(casts[s])
                loss = spec.loss(x.float(), y)
                (loss * (1.0 / (m * dp))).backward()
                mb_losses.append(loss.detach())
            replica_grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
            replica_loss.append(microbatch_mean_loss(mb_losses))
        for k, p in enumerate(params):
            g = replica_grads[0][k]
            for d in range(1, dp):
                g = g + replica_grads[d][k]
            p.grad = g
        for copies in tie_copies:
            g = copies[0].grad
            for c in copies[1:]:
                g = g + c.grad
            for c in copies:
                c.grad = g.clone()
        not_owned = {id(c) for copies in tie_copies for c in copies[1:]}
        owned = [p for p in params if id(p) not in not_owned]
        sqs = dict(zip((id(p) for p in owned), squared_norms([grad_of(p).detach() for p in owned])))
        norm = float(torch.tensor([sum(sqs.values())], dtype=torch.float64).sqrt())
        seen = set(not_owned)
        per_stage = []
        for s in range(len(plan.stages)):
            acc = 0.0
            for p in stages[s].parameters():
                if id(p) not in seen and id(p) in sqs:
                    seen.add(id(p))
                    acc += sqs[id(p)]
            per_stage.append(acc ** 0.5)
        stage_norms.append(tuple(per_stage))
        coef = clip_coefficient(norm, clip_norm)
        if coef < 1.0:
            for p in params:
                grad_of(p).mul_(coef)
        opt.step()
        tot = replica_loss[0]
        for d in range(1, dp):
            tot = tot + replica_loss[d]
        losses.append(float(tot / dp))
        norms.append(norm)
        times.append(time.perf_counter() - t_step)
    return ReferenceResult(losses=tuple(losses), grad_norms=tuple(norms), stage_grad_norms=tuple(stage_norms),
                           step_times_s=tuple(times), state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})


def _untie_across_stages(model: Any, plan: Plan) -> list[list[Any]]:
    """Give each stage its own copy of a tied parameter, as the pipeline does.

    The gradient of a tied parameter is then the sum of per-stage sums (the pipeline's
    all-reduce order) instead of autograd's per-micro-batch interleaving; the values and the
    optimizer updates of the copies stay identical. Returns, per tie, [owner copy, user copies...].
    """
    import copy

    from pipetrain.executor.stage import ties_of

    stage_of = {b: st.index for st in plan.stages for b in range(st.block_start, st.block_end)}
    out: list[list[Any]] = []
    for name, owner, users in ties_of(model):
        path, _, leaf = name.rpartition(".")
        copies = [model.blocks[owner].get_parameter(name)]
        per_stage: dict[int, Any] = {stage_of[owner]: model.blocks[owner].get_submodule(path) if path else None}
        for u in users:
            su = stage_of[u]
            if su in per_stage:
                continue
            blk = model.blocks[u]
            if path:
                parent_path, _, attr = path.rpartition(".")
                parent = blk.get_submodule(parent_path) if parent_path else blk
                sub = copy.deepcopy(getattr(parent, attr))
                setattr(parent, attr, sub)
                per_stage[su] = sub
            else:
                import torch

                setattr(blk, leaf, torch.nn.Parameter(getattr(blk, leaf).detach().clone()))
            copies.append(blk.get_parameter(name))
        if len(copies) > 1:
            out.append(copies)
    return out
