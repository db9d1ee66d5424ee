"""One rank of the torch round trip (tests/test_export_torch.py): runs exported plans with torch's
own ``_PipelineScheduleRuntime`` on a gloo process group.

``python tests/export_torch_worker.py RANK WORLD PORT STEPS OUT.json CASE_DIR...``: each CASE_DIR
holds ``plan.json`` and the ``pipetrain export --to torch`` files (``schedule.csv``, ``stages.json``).
Per case the rank builds the model as pipetrain does (same per-block seeds), takes the modules
named by its stages' exported FQNs into ``PipelineStage`` s, loads the CSV and trains STEPS steps on
the plan's data: torch's runtime does forward and backward (I, W, B as the CSV says), this script
the rest of pipetrain's step (global-norm clipping over the pipeline group, AdamW). The rank holding
the last stage writes the mean micro-batch loss of each step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    rank, world, port, steps = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    out_path, case_dirs = Path(argv[4]), [Path(a) for a in argv[5:]]
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    from pipetrain.executor.data import BatchSampler, batch_tensor, make_source
    from pipetrain.executor.optim import OptimConfig, clip_coefficient, make_optimizer, squared_norms, unique_params
    from pipetrain.executor.stage import build_meta, load_spec, materialize_blocks, vocab_size_of
    from pipetrain.plan import Plan

    torch.set_num_threads(1)  # as the reference and pipetrain's CPU ranks: kernel reduction order
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    results: dict[str, list[float]] = {}
    for case in case_dirs:
        plan = Plan.load(case / "plan.json")
        meta = json.loads((case / "stages.json").read_text())
        spec = load_spec(plan.model)
        model = build_meta(spec)
        materialize_blocks(model, range(len(model.blocks)), "cpu", plan.seed)
        model.train()
        mine = [s for s in meta["stages"] if s["rank"] == rank]
        submods = [torch.nn.Sequential(*[model.get_submodule(f) for f in s["module_fqns"]]) for s in mine]
        stages = [PipelineStage(m, s["stage"], meta["num_stages"], torch.device("cpu"), group=dist.group.WORLD)
                  for m, s in zip(submods, mine)]
        sched = _PipelineScheduleRuntime(stages, n_microbatches=meta["n_microbatches"], loss_fn=spec.loss, scale_grads=True)
        sched._load_csv(str(case / meta["schedule_csv"]))
        params = unique_params(submods)
        opt = make_optimizer(params, OptimConfig(name=plan.optimizer))  # pipetrain's default lr, as its run
        source = make_source("synthetic", task=spec.task, seq_len=plan.seq_len, vocab_size=vocab_size_of(spec, model),
                             seed=plan.seed, input_shape=tuple(getattr(spec, "input_size", ()) or ()),
                             num_classes=int(getattr(spec, "vocab_size", 0) or 0))
        sampler = BatchSampler(num_samples=source.num_samples, micro_batch_size=plan.micro_batch_size,
                               num_microbatches=plan.num_microbatches, dp=1, seed=plan.seed)
        first = any(s.is_first for s in stages)
        last = any(s.is_last for s in stages)
        losses: list[float] = []
        for step in range(steps):
            ids = sampler.indices(step)[0].reshape(-1)  # the m micro-batches, in order: torch splits along dim 0
            x = batch_tensor(source.inputs, ids, "cpu")
            y = batch_tensor(source.targets, ids, "cpu")
            opt.zero_grad(set_to_none=True)
            mb_losses: list[torch.Tensor] = []
            sched.step(*((x,) if first else ()), target=y if last else None, losses=mb_losses if last else None)
            sq = torch.tensor([sum(squared_norms([p.grad for p in params if p.grad is not None]))], dtype=torch.float64)
            dist.all_reduce(sq)  # the pipeline group's global norm, as pipetrain clips
            coef = clip_coefficient(float(sq.sqrt()), 1.0)
            if coef < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            opt.step()
            if last:
                losses.append(float(torch.stack([v.detach().float() for v in mb_losses]).sum() / len(mb_losses)))
        if last:
            results[case.name] = losses
        dist.barrier()
    if results:
        out_path.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
