"""Scale of meta-device tracing: build + trace llama2-70b, time and peak RSS, in fresh processes.

Each measurement runs in a fresh ``python`` subprocess (so peak RSS, ``ru_maxrss``, is the
tracing's own, not this script's). In the same run a baseline subprocess only imports torch
and pipetrain, so the figures are reported against it as well as against the issue's limits
(60 s, 4 GiB). Exit code 1 if a limit is exceeded.

    .venv/bin/python benchmarks/trace_scale.py [--model llama2-70b] [--seq-len 4096] [--micro-batch-size 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

LIMIT_S = 60.0
LIMIT_BYTES = 4 * 2**30
ROOT = Path(__file__).resolve().parent.parent


def _child(args: argparse.Namespace) -> None:
    import resource

    t0 = time.perf_counter()
    from pipetrain.planner.trace import trace_graph
    from pipetrain.planner.zoo import get_model_spec

    t_import = time.perf_counter()
    result = {"import_s": t_import - t0}
    if args.model:
        spec = get_model_spec(args.model)
        t1 = time.perf_counter()
        spec.build("meta")
        t2 = time.perf_counter()
        g = trace_graph(spec, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, dtype=args.dtype,
                        granularity=args.granularity)
        t3 = time.perf_counter()
        result.update(build_s=t2 - t1, trace_s=t3 - t2, nodes=g.num_nodes, params=g.param_count,
                      fwd_flops=g.fwd_flops)
    # ru_maxrss is KiB on Linux
    result["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def _run_child(argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = wall
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-70b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--granularity", default="block", choices=("block", "op"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    shape = ["--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size), "--dtype", args.dtype,
             "--granularity", args.granularity]
    runs, bases = [], []
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        bases.append(_run_child(["--model", "", *shape]))
        runs.append(_run_child(["--model", args.model, *shape]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("build_s", "trace_s", "maxrss_bytes", "process_wall_s")}
    base = {k: statistics.median(r[k] for r in bases) for k in ("maxrss_bytes", "process_wall_s")}
    work_s = med["build_s"] + med["trace_s"]
    gib = 2**30
    r = runs[0]
    print(f"{args.model}: {r['nodes']} nodes, {r['params']:,} parameters, micro-batch {args.micro_batch_size} x "
          f"seq {args.seq_len}, {args.dtype}, {args.granularity} granularity; median of {args.repeats} fresh processes")
    print(f"  build {med['build_s']:.3f} s + trace {med['trace_s']:.3f} s = {work_s:.3f} s "
          f"({work_s / LIMIT_S:.4f} of the {LIMIT_S:.0f} s limit)")
    print(f"  whole process incl. interpreter and imports: {med['process_wall_s']:.2f} s "
          f"({med['process_wall_s'] / LIMIT_S:.3f} of the limit; {med['process_wall_s'] / base['process_wall_s']:.2f}x "
          f"the import-only baseline of {base['process_wall_s']:.2f} s)")
    print(f"  peak RSS {med['maxrss_bytes'] / gib:.3f} GiB ({med['maxrss_bytes'] / LIMIT_BYTES:.3f} of the 4 GiB limit; "
          f"{med['maxrss_bytes'] / base['maxrss_bytes']:.2f}x the import-only baseline of "
          f"{base['maxrss_bytes'] / gib:.3f} GiB)")
    cmd = " ".join([".venv/bin/python", "benchmarks/trace_scale.py", "--model", args.model, *shape,
                    "--repeats", str(args.repeats)])
    print(f"reproduce: {cmd}")
    ok = med["process_wall_s"] < LIMIT_S and med["maxrss_bytes"] < LIMIT_BYTES
    print("PASS: under both limits" if ok else "FAIL: over a limit")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
