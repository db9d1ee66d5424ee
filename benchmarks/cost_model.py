"""Cost-model grades against measurement, per block and per stage, on this machine.

For one model and shape it:
1. traces the layer graph (FLOPs, bytes) on the meta device;
2. profiles every block (median of repeats) and, in the same interleaved rounds, measures each
   block and some multi-block stages again as units ("measured": a fresh run);
3. fits the calibrated grade to profiles at the training shapes (--fit-shapes; all shapes
   profiled in interleaved rounds) and reports its error before/after, both on those profiles
   and on a held-out shape it never saw;
4. prints, per block and per stage, analytic / calibrated / profiled predictions as ratios
   to the measured time (1.00 = exact), and the command that reproduces the run.

    .venv/bin/python benchmarks/cost_model.py [--model tiny-gpt] [--micro-batch-size 8] [--seq-len 128]
        [--threads 1] [--repeats 15] [--device cpu|cuda] [--preset local-cpu:N|dgx-h100:1]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipetrain.calibration.fit import CalibratedCostModel, fit_calibration, mean_abs_relative_error, relative_errors  # noqa: E402
from pipetrain.calibration.profile import ProfiledCostModel, profile_shapes  # noqa: E402
from pipetrain.costs import AnalyticCostModel  # noqa: E402
from pipetrain.planner.trace import trace_graph  # noqa: E402
from pipetrain.topology import resolve_topology  # noqa: E402


def _shape(text: str) -> tuple[int, int]:
    mbs, _, seq = text.partition("x")
    return int(mbs), int(seq)


def _change(before: float, after: float) -> str:
    if after <= before:
        return f"{before / max(after, 1e-12):.1f}x lower"
    return f"{after / max(before, 1e-12):.1f}x HIGHER: the fit did not carry over"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-gpt")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="topology whose first device type the analytic grade uses "
                    "(default local-cpu:N with N = cores // threads on cpu, dgx-h100:1 on cuda)")
    ap.add_argument("--fit-shapes", default="8x128,2x64,16x32", help="micro-batch x seq-len shapes the calibration fits on")
    ap.add_argument("--holdout", default="4x96", help="a shape the calibration never sees")
    args = ap.parse_args(argv)
    cmd = (f"python benchmarks/cost_model.py --model {shlex.quote(args.model)} --micro-batch-size {args.micro_batch_size} "
           f"--seq-len {args.seq_len} --dtype {args.dtype} --threads {args.threads} --repeats {args.repeats} "
           f"--device {args.device} --fit-shapes {args.fit_shapes} --holdout {args.holdout}" + (f" --preset {args.preset}" if args.preset else ""))
    # a CPU rank running `threads` torch threads: local-cpu:N with N = cores // threads
    preset = args.preset or ("dgx-h100:1" if args.device.startswith("cuda") else f"local-cpu:{max(1, (os.cpu_count() or 1) // args.threads)}")
    dev = resolve_topology(preset).device_type_of(0)
    kw = dict(dtype=args.dtype, device=args.device, threads=args.threads, repeats=args.repeats)

    mbs, seq = args.micro_batch_size, args.seq_len
    wall0, cpu0 = time.perf_counter(), time.process_time()
    graph = trace_graph(args.model, micro_batch_size=mbs, seq_len=seq, dtype=args.dtype)
    n = graph.num_nodes
    stages = [(1, 3), (1, min(5, n - 1)), (0, n)] if n > 3 else [(0, n)]
    singles = [(i, i + 1) for i in range(n)]
    # One set of interleaved rounds (every measurement sees the same machine load): this shape's
    # profile, its blocks and stages again as fresh units ("measured"), and the calibration's
    # fit shapes and held-out shape.
    fit_shapes = [_shape(s) for s in args.fit_shapes.split(",") if s]
    hm, hs = _shape(args.holdout)
    extra = [sh for sh in fit_shapes + [(hm, hs)] if sh != (mbs, seq)]
    profs, measured = profile_shapes(args.model, [(mbs, seq)] + extra, stages=singles + stages, share_identical=False, **kw)
    prof = profs[0]
    by_shape = {(mbs, seq): prof, **dict(zip(extra, profs[1:]))}
    samples = [(trace_graph(args.model, micro_batch_size=fm, seq_len=fs, dtype=args.dtype), by_shape[(fm, fs)]) for fm, fs in fit_shapes]
    fit = fit_calibration(samples, dev)
    held = [(trace_graph(args.model, micro_batch_size=hm, seq_len=hs, dtype=args.dtype), by_shape[(hm, hs)])]
    held_before = mean_abs_relative_error(relative_errors(held, dev))
    held_after = mean_abs_relative_error(relative_errors(held, dev, fit.params))

    grades = {"analytic": AnalyticCostModel(), "calibrated": CalibratedCostModel(fit), "profiled": ProfiledCostModel(prof)}
    print(f"{args.model} micro-batch {mbs} x seq {seq} {args.dtype} on {prof.device}; analytic device type {dev.name} "
          f"(peak {dev.peak_flops(args.dtype) / 1e9:.0f} GFLOP/s x eff {dev.efficiency}, {dev.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s)")
    print("fwd+bwd per micro-batch; columns analytic/calibrated/profiled are predicted / measured (1.00 = exact)")
    print(f"{'blocks':<16}{'kind':<12}{'GFLOP':>8}{'measured ms':>13}{'analytic':>10}{'calibrated':>12}{'profiled':>10}")
    rows = [(f"{graph.nodes[i].name}", graph.nodes[i].kind, (i, i + 1)) for i in range(n)]
    rows += [(f"stage [{a},{b})", f"{b - a} blocks", (a, b)) for a, b in stages]
    for (label, kind, (a, b)), (f, bw) in zip(rows, measured):
        real = f + bw
        flops = sum(nd.fwd_flops + nd.bwd_flops for nd in graph.nodes[a:b]) / 1e9
        ratios = [grades[g].stage_costs(graph, a, b, dev).t_total_s / real if g != "profiled"
                  else (lambda c: (c.t_fwd_s + c.t_bwd_s) / real)(grades[g].stage_costs(graph, a, b, dev)) for g in grades]
        print(f"{label:<16}{kind:<12}{flops:>8.3f}{real * 1e3:>13.3f}{ratios[0]:>10.2f}{ratios[1]:>12.2f}{ratios[2]:>10.2f}")
    print(f"\ncalibration (scipy least_squares, {fit.num_samples} samples at shapes {args.fit_shapes}): "
          f"mean |pred-meas|/meas per block pass {fit.error_before:.3f} -> {fit.error_after:.3f} "
          f"({_change(fit.error_before, fit.error_after)})")
    print(f"held-out shape {args.holdout}: {held_before:.3f} -> {held_after:.3f} ({_change(held_before, held_after)})")
    effs = ", ".join(f"{k} {v:.3f}" for k, v in fit.efficiency_by_kind.items())
    print(f"fitted: compute efficiency {effs}, bwd scale {fit.bwd_efficiency_scale:.2f}, "
          f"memory efficiency {fit.memory_efficiency:.3f}, overhead per block fwd/bwd us: "
          + ", ".join(f"{k} {fit.overhead_fwd_by_kind[k] * 1e6:.0f}/{fit.overhead_bwd_by_kind.get(k, 0.0) * 1e6:.0f}" for k in fit.overhead_fwd_by_kind))
    share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    print(f"machine: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; this run got {share:.0%} of a core "
          "(a shared machine: ratios within one run are comparable, absolute ms are not)")
    print(f"\nreproduce: {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
