"""Our executor vs torch.distributed.pipelining's Schedule1F1B: same model, split, m, data and init.

    python benchmarks/vs_torch_pipelining.py [--p 2 4] [--m 4 8] [--pairs 10] [--warmup 2]

For each (p, m) one torchrun launch of p gloo ranks (1 thread each) builds BOTH pipelines from
the same seed: ours (pipetrain's Trainer: persistent buffers, prefetched irecv, the schedule's
compute order) and theirs (PipelineStage + Schedule1F1B, scale_grads=True), each with its own
copy of the weights and its own SGD. Steps alternate A B A B ... on the same data (global batch
64, m micro-batches); a step's time is the slowest rank's, measured from a common barrier.
Reported: the median over pairs of (ours / theirs) after ``--warmup`` pairs (their first step
infers shapes), the medians of each side, and the largest relative loss difference between the
two trajectories. Our telemetry is on (in-memory events, one JSONL record per step), as in a
normal run. The machine is shared: the load average before/after is printed; distrust a run
whose load exceeded the rank count.

Model: ``resmlp`` (8 pre-LN residual MLP blocks, d=256, hidden 1024, + linear head), fp32,
contiguous equal split (head on the last stage), SGD lr 0.05, no clipping.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GLOBAL_BATCH = 64
MODEL = "resmlp"


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", timeout=timeout)
    rank, p, m = dist.get_rank(), dist.get_world_size(), a.m

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.optim import make_optimizer, OptimConfig
    from pipetrain.executor.plans import simple_plan
    from pipetrain.executor.stage import build_meta, load_spec, materialize_blocks, stage_modules
    from pipetrain.executor.trainer import Trainer

    plan = simple_plan(MODEL, pp=p, m=m, mbs=GLOBAL_BATCH // m, seq_len=1, schedule=a.schedule, optimizer="sgd")
    spec = load_spec(MODEL)
    run_dir = Path(a.run_dir)
    cfg = RunConfig(plan_path="(benchmark)", run_dir=str(run_dir), steps=10**6, lr=0.05, clip_norm=0.0, timeout_s=120)
    ours = Trainer(cfg, plan, spec, build_meta(spec), torch.device("cpu"), timeout, rank, run_dir)

    st = plan.stages[rank]
    model = build_meta(spec)
    materialize_blocks(model, range(st.block_start, st.block_end), "cpu", plan.seed)
    submod = stage_modules(model, [st])[st.index]
    stage = PipelineStage(submod, rank, p, torch.device("cpu"))
    sched = Schedule1F1B(stage, n_microbatches=m, loss_fn=spec.loss, scale_grads=True)
    opt = make_optimizer(list(submod.parameters()), OptimConfig(name="sgd", lr=0.05, clip_norm=0.0))

    def theirs(step: int) -> float | None:
        inputs, targets = ours.batches(step)
        opt.zero_grad()
        losses: list[torch.Tensor] = []
        if rank == 0:
            sched.step(torch.cat(inputs))
        elif rank == p - 1:
            sched.step(target=torch.cat(targets), losses=losses, return_outputs=False)
        else:
            sched.step()
        opt.step()
        return float(torch.stack(losses).mean()) if losses else None

    def timed(fn, step: int) -> tuple[float, float | None]:  # type: ignore[no-untyped-def]
        dist.barrier()
        t0 = time.perf_counter()
        loss = fn(step)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return float(dt), loss

    rows = []
    for k in range(a.warmup + a.pairs):
        if k % 2 == 0:  # A B, then B A: neither side always runs right after the other
            t_o, l_o = timed(ours.train_step, k)
            t_t, l_t = timed(theirs, k)
        else:
            t_t, l_t = timed(theirs, k)
            t_o, l_o = timed(ours.train_step, k)
        rows.append({"step": k, "ours_s": t_o, "theirs_s": t_t, "ours_loss": l_o, "theirs_loss": l_t})
    if rank == p - 1:
        (run_dir / "bench.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def launch(p: int, m: int, a: argparse.Namespace) -> dict[str, float]:
    from pipetrain.executor.launch import free_port

    with tempfile.TemporaryDirectory(prefix="pipetrain-bench-") as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), __file__, "--bench-worker", "--bench-m", str(m),
               "--bench-pairs", str(a.pairs), "--bench-warmup", str(a.warmup), "--bench-dir", d, "--schedule", a.schedule]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        load0 = _loadavg()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        load1 = _loadavg()
        if r.returncode != 0:
            raise SystemExit(f"p={p} m={m} failed:\n{r.stderr[-3000:]}")
        rows = json.loads((Path(d) / "bench.json").read_text())
    kept = rows[a.warmup:]
    ratios = [x["ours_s"] / x["theirs_s"] for x in kept]
    loss_rel = max(abs(x["ours_loss"] - x["theirs_loss"]) / abs(x["theirs_loss"]) for x in rows)
    return {"p": p, "m": m, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ours_ms": statistics.median(x["ours_s"] for x in kept) * 1e3,
            "theirs_ms": statistics.median(x["theirs_s"] for x in kept) * 1e3, "loss_rel_max": loss_rel,
            "pairs": len(kept), "load_before": load0, "load_after": load1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--m", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    # worker side (names torchrun's option parser cannot mistake for its own abbreviations)
    ap.add_argument("--bench-worker", action="store_true", dest="worker", help=argparse.SUPPRESS)
    ap.add_argument("--bench-m", type=int, default=0, dest="wm", help=argparse.SUPPRESS)
    ap.add_argument("--bench-pairs", type=int, default=0, dest="wpairs", help=argparse.SUPPRESS)
    ap.add_argument("--bench-warmup", type=int, default=0, dest="wwarmup", help=argparse.SUPPRESS)
    ap.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe", "zb-h1"],
                    help="our schedule (theirs is always Schedule1F1B); zb-h1 splits backward into input- and weight-grad")
    ap.add_argument("--bench-dir", default="", dest="run_dir", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    a = ap.parse_args()
    if a.worker:
        a.m, a.pairs, a.warmup = a.wm, a.wpairs, a.wwarmup
        worker(a)
        return
    print(f"command: python benchmarks/vs_torch_pipelining.py --p {' '.join(map(str, a.p))} --m {' '.join(map(str, a.m))} "
          f"--pairs {a.pairs} --warmup {a.warmup} --schedule {a.schedule}")
    print(f"ours: pipetrain executor running {a.schedule}; theirs: torch.distributed.pipelining.Schedule1F1B")
    print(f"model {MODEL}, global batch {GLOBAL_BATCH}, fp32, gloo, 1 thread per rank, A/B alternating per step")
    print(f"{'p':>2} {'m':>2} | {'ours ms':>8} {'theirs ms':>9} | {'median ours/theirs':>18} {'[min, max]':>14} | "
          f"{'loss rel diff':>13} | load before/after")
    out = []
    for p in a.p:
        for m in a.m:
            if m < p:
                print(f"{p:>2} {m:>2} | skipped: Schedule1F1B needs m >= p")
                continue
            r = launch(p, m, a)
            out.append(r)
            print(f"{p:>2} {m:>2} | {r['ours_ms']:8.1f} {r['theirs_ms']:9.1f} | {r['ratio_median']:18.3f} "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['loss_rel_max']:13.2e} | "
                  f"{r['load_before']:.1f}/{r['load_after']:.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    met = sum(r["ratio_median"] <= 0.95 for r in out)
    print(f"target median ours/theirs <= 0.95: met in {met} of {len(out)} configurations"
          + ("" if met == len(out) else " (not met everywhere)"))
    busy = [r for r in out if max(r["load_before"], r["load_after"]) > r["p"]]
    if busy:
        print(f"warning: load average exceeded the rank count during {len(busy)} configuration(s): the machine was shared, "
              "ratios are noisy; rerun when it is quiet")


if __name__ == "__main__":
    main()
