"""Our executor vs torch.distributed.pipelining's Schedule1F1B: same model, split, m, data and init.

    python benchmarks/vs_torch_pipelining.py [--p 2 4] [--m 4 8] [--pairs 10] [--warmup 2] [--schedule 1f1b zb-h1]
        [--their-set-to-none true|false]

For each (p, m) one torchrun launch of p gloo ranks (1 thread each) builds all pipelines from
the same seed: ours, once per ``--schedule`` (pipetrain's Trainer: persistent buffers, prefetched
irecv, the schedule's compute order; zb-h1 with the linear layers' weight gradients deferred to
W, :mod:`pipetrain.executor.wgrad`) and theirs (PipelineStage + Schedule1F1B, scale_grads=True),
each with its own copy of the weights and its own SGD. Every step runs each pipeline once on the
same data (global batch 64, m micro-batches), in an order that rotates from step to step
(A B C, B C A, C A B, ...); a step's time is the slowest rank's, measured from a common barrier.
Reported per schedule of ours: the median over steps of (ours / theirs) after ``--warmup``
steps (their first step infers shapes) with its 95% bootstrap interval, the medians of each
side, the ratios of CPU time per step (all threads / main thread), and the largest relative loss
difference between the two trajectories. Our telemetry is on (in-memory events, one JSONL record per step), as in a
normal run. The machine is shared: the load average before/after is printed; distrust a run
whose load exceeded the rank count.

Model: ``resmlp`` (8 pre-LN residual MLP blocks, d=256, hidden 1024, + linear head), fp32, SGD
lr 0.05, no clipping. Split (``--split``): ``layers`` (default, the setup of the
comparison recorded in benchmarks/RESULTS.md): the 8 MLP blocks split equally, the head on the last
stage; ``blocks``: the 9 blocks split as evenly as they go (5 | 4 at p=2: the first stage is the
bottleneck and the schedule matters less).
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
from typing import Any

GLOBAL_BATCH = 64
MODEL = "resmlp"


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def split_boundaries(split: str, p: int) -> list[int] | None:
    """Stage cuts of resmlp's 9 blocks (8 MLP blocks + head): see the module docstring."""
    if split == "blocks":
        return None
    return [k * 8 // p for k in range(1, p)]


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
    from pipetrain.executor.optim import OptimConfig, make_optimizer
    from pipetrain.executor.plans import simple_plan
    from pipetrain.executor.stage import build_meta, load_spec, materialize_blocks, stage_modules
    from pipetrain.executor.trainer import Trainer

    spec = load_spec(MODEL)
    ours = {}
    for name in a.schedule:
        plan = simple_plan(MODEL, pp=p, m=m, mbs=GLOBAL_BATCH // m, seq_len=1, schedule=name, optimizer="sgd",
                           boundaries=split_boundaries(a.split, p))
        run_dir = Path(a.run_dir) / name
        cfg = RunConfig(plan_path="(benchmark)", run_dir=str(run_dir), steps=10**6, lr=0.05, clip_norm=0.0, timeout_s=120)
        ours[name] = Trainer(cfg, plan, spec, build_meta(spec), torch.device("cpu"), timeout, rank, run_dir)
    first = ours[a.schedule[0]]

    st = plan.stages[rank]
    model = build_meta(spec)
    materialize_blocks(model, range(st.block_start, st.block_end), "cpu", plan.seed)
    submod = stage_modules(model, [st])[st.index]
    stage = PipelineStage(submod, rank, p, torch.device("cpu"))
    sched = Schedule1F1B(stage, n_microbatches=m, loss_fn=spec.loss, scale_grads=True)
    opt = make_optimizer(list(submod.parameters()), OptimConfig(name="sgd", lr=0.05, clip_norm=0.0))

    def theirs(step: int) -> float | None:
        inputs, targets = first.batches(step)
        opt.zero_grad(set_to_none=a.their_set_to_none == "true")
        losses: list[torch.Tensor] = []
        if rank == 0:
            sched.step(torch.cat(inputs))
        elif rank == p - 1:
            sched.step(target=torch.cat(targets), losses=losses, return_outputs=False)
        else:
            sched.step()
        opt.step()
        return float(torch.stack(losses).mean()) if losses else None

    def timed(fn, step: int) -> tuple[float, float | None, float, float]:  # type: ignore[no-untyped-def]
        """(slowest rank's wall time, loss, CPU time of all ranks' processes, of their main threads)."""
        dist.barrier()
        c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
        loss = fn(step)
        t1, c1, m1 = time.perf_counter(), time.process_time(), time.thread_time()
        dt = torch.tensor([t1 - t0], dtype=torch.float64)
        cpu = torch.tensor([c1 - c0, m1 - m0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu)
        return float(dt), loss, float(cpu[0]), float(cpu[1])

    sides = [*((name, tr.train_step) for name, tr in ours.items()), ("theirs", theirs)]
    rows = []
    for k in range(a.warmup + a.pairs):
        row: dict[str, Any] = {"step": k}
        for j in range(len(sides)):  # the order rotates every step: no side always runs right after another
            name, fn = sides[(k + j) % len(sides)]
            row[f"{name}_s"], row[f"{name}_loss"], row[f"{name}_cpu_s"], row[f"{name}_main_s"] = timed(fn, k)
        rows.append(row)
    if rank == p - 1:
        (Path(a.run_dir) / "bench.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def bootstrap_median_ci(xs: list[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``xs`` (Efron & Tibshirani 1993, ch. 13)."""
    import numpy as np

    arr = np.asarray(xs, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(arr, size=(resamples, arr.size), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def launch(p: int, m: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    from pipetrain.executor.launch import free_port

    with tempfile.TemporaryDirectory(prefix="pipetrain-bench-") as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), __file__, "--bench-worker", "--bench-m", str(m),
               "--bench-pairs", str(a.pairs), "--bench-warmup", str(a.warmup), "--bench-dir", d, "--schedule", *a.schedule, "--split", a.split,
               "--their-set-to-none", a.their_set_to_none]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        load0 = _loadavg()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        load1 = _loadavg()
        if r.returncode != 0:
            raise SystemExit(f"p={p} m={m} failed:\n{r.stderr[-3000:]}")
        rows = json.loads((Path(d) / "bench.json").read_text())
    kept = rows[a.warmup:]
    out = []
    for name in a.schedule:
        ratios = [x[f"{name}_s"] / x["theirs_s"] for x in kept]
        lo, hi = bootstrap_median_ci(ratios)
        loss_rel = max(abs(x[f"{name}_loss"] - x["theirs_loss"]) / abs(x["theirs_loss"]) for x in rows)
        out.append({"p": p, "m": m, "schedule": name, "ratio_median": statistics.median(ratios), "ratio_ci95": [lo, hi],
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios), "ours_ms": statistics.median(x[f"{name}_s"] for x in kept) * 1e3,
                    "theirs_ms": statistics.median(x["theirs_s"] for x in kept) * 1e3, "loss_rel_max": loss_rel,
                    "cpu_ratio": statistics.median(x[f"{name}_cpu_s"] / x["theirs_cpu_s"] for x in kept),
                    "main_ratio": statistics.median(x[f"{name}_main_s"] / x["theirs_main_s"] for x in kept),
                    "pairs": len(kept), "load_before": load0, "load_after": load1})
    return out


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
    ap.add_argument("--schedule", nargs="+", default=["1f1b", "zb-h1"], choices=["1f1b", "gpipe", "zb-h1"],
                    help="our schedules, each timed in the same rotation against theirs (always Schedule1F1B); "
                         "zb-h1 splits backward into input- and weight-grad passes")
    ap.add_argument("--split", default="layers", choices=["layers", "blocks"],
                    help="layers: the 8 MLP blocks split equally, head on the last stage; blocks: the 9 blocks split evenly")
    ap.add_argument("--their-set-to-none", default="true", choices=["true", "false"],
                    help="theirs: opt.zero_grad(set_to_none=...) before each step (torch's default: true; ours zeroes in "
                         "place on CPU, which saves the page faults of re-allocating the gradients)")
    ap.add_argument("--bench-dir", default="", dest="run_dir", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    a = ap.parse_args()
    if a.worker:
        a.m, a.pairs, a.warmup = a.wm, a.wpairs, a.wwarmup
        worker(a)
        return
    print(f"command: python benchmarks/vs_torch_pipelining.py --p {' '.join(map(str, a.p))} --m {' '.join(map(str, a.m))} "
          f"--pairs {a.pairs} --warmup {a.warmup} --schedule {' '.join(a.schedule)} --split {a.split} --their-set-to-none {a.their_set_to_none}")
    print(f"ours: pipetrain executor running {', '.join(a.schedule)}; theirs: torch.distributed.pipelining.Schedule1F1B")
    print(f"model {MODEL}, global batch {GLOBAL_BATCH}, fp32, gloo, 1 thread per rank, A/B alternating per step, "
          f"split {a.split} (p=2: {split_boundaries(a.split, 2) or [5]})")
    print(f"{'p':>2} {'m':>2} {'ours':>6} | {'ours ms':>8} {'theirs ms':>9} | {'median ours/theirs':>18} {'95% CI':>14} | "
          f"{'loss rel diff':>13} | CPU ratio all/main | load before/after")
    out = []
    for p in a.p:
        for m in a.m:
            if m < p:
                print(f"{p:>2} {m:>2} | skipped: Schedule1F1B needs m >= p")
                continue
            for r in launch(p, m, a):
                out.append(r)
                print(f"{p:>2} {m:>2} {r['schedule']:>6} | {r['ours_ms']:8.1f} {r['theirs_ms']:9.1f} | {r['ratio_median']:18.3f} "
                      f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}] | {r['loss_rel_max']:13.2e} | "
                      f"{r['cpu_ratio']:8.3f}/{r['main_ratio']:.3f}  | "
                      f"{r['load_before']:.1f}/{r['load_after']:.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    for name in a.schedule:
        mine = [r for r in out if r["schedule"] == name]
        met = sum(r["ratio_median"] <= 0.95 for r in mine)
        print(f"target median ours/theirs <= 0.95 with ours running {name}: met in {met} of {len(mine)} configurations"
              + ("" if met == len(mine) else " (not met everywhere)"))
    busy = [r for r in out if max(r["load_before"], r["load_after"]) > r["p"] and r["schedule"] == a.schedule[0]]
    if busy:
        print(f"warning: load average exceeded the rank count during {len(busy)} configuration(s): the machine was shared, "
              "ratios are noisy; rerun when it is quiet")


if __name__ == "__main__":
    main()
