"""Calibrate the cost model on this machine: block profiles, p2p link, optimizer step, scipy fit.

``pipetrain calibrate --topology local-cpu:4 [--model tiny-gpt] [--microbatch-sizes 1,4]
[--seq-len N] [--threads 1] [-o calibration.json]`` profiles every block of the model(s) on
the device the topology's ranks use (this CPU, one thread per rank as the executor runs; the
GPU on a GPU topology), measures the point-to-point latency and bandwidth of the backend in use
(gloo on loopback; NCCL on GPU) and the optimizer step, fits the analytic cost model with
``scipy.optimize`` and writes the calibration JSON that ``pipetrain plan`` and ``pipetrain
simulate`` take with ``--calibration FILE``. ``--repeat N`` calibrates N times in a row and keeps
every number's median (a machine whose speed drifts gives a different snapshot each time).
"""

from __future__ import annotations

import argparse

from pipetrain.errors import ConfigError

__all__ = ["add_arguments", "run", "run_inter_node", "parse_int_list"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", default=None, help="topology whose device to calibrate (local-cpu:N here; a GPU preset on a GPU)")
    parser.add_argument("--model", action="append", default=None,
                        help="model preset to profile (repeatable; default tiny-gpt)")
    parser.add_argument("--microbatch-sizes", default="1,4", help="micro-batch sizes to profile, comma separated (default 1,4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the model's)")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank, as `pipetrain run --threads` (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per block (median; default 7)")
    parser.add_argument("--rounds", type=int, default=5, help="profiling rounds per block; the median is kept (default 5)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="whole calibrations in a row; every measured number is their median (default 1)")
    parser.add_argument("--no-probe", action="store_true", help="skip the p2p probe (keep the topology's link figures)")
    parser.add_argument("--no-runtime", action="store_true", help="skip the one-rank executor run that measures its overhead")
    parser.add_argument("--tp", type=int, action="append", default=None, metavar="N",
                        help="also run the executor on N tensor-parallel ranks per transformer model and shape, for the simulator's "
                             "cost of a tp stage (repeatable; default none)")
    parser.add_argument("-o", "--output", default="calibration.json", help="where to write the calibration (default calibration.json)")
    parser.add_argument("--inter-node-rank", type=int, default=None,
                        help="measure the link between two nodes instead: run on both, 0 on the node that listens, 1 on the other")
    parser.add_argument("--inter-node-master", default=None, help="HOST:PORT that node 0 listens on (with --inter-node-rank)")
    parser.add_argument("--inter-node-sizes", default="4,4096,65536,1048576,4194304",
                        help="message sizes of the inter-node probe in bytes, comma separated")
    parser.add_argument("--json", action="store_true", help="print the calibration JSON instead of the table")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ConfigError(f"{flag} needs integers >= 1, got {text!r}")
    return vals


def run_inter_node(args: argparse.Namespace) -> int:
    """``--inter-node-rank R --inter-node-master HOST:PORT``: one end of a gloo ping-pong between two
    nodes (:func:`pipetrain.calibration.commprobe.probe_p2p_node`); node 0 prints the Hockney fit
    (latency, bandwidth) for the topology's inter-node link, as JSON with ``--json``."""
    import json

    from pipetrain.calibration.commprobe import probe_p2p_node
    from pipetrain.serde import to_dict

    host, _, port = str(args.inter_node_master or "").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--inter-node-master must be HOST:PORT (node 0's address), got {args.inter_node_master!r}")
    sizes = parse_int_list(args.inter_node_sizes, "--inter-node-sizes")
    cost = probe_p2p_node(rank=args.inter_node_rank, master_addr=host, port=int(port), sizes_bytes=sizes, repeats=args.repeats)
    if cost is None:
        return 0
    if args.json:
        print(json.dumps(to_dict(cost)))
    else:
        print(f"inter-node link ({cost.backend}): latency {cost.latency_s * 1e6:.1f} us, bandwidth "
              f"{cost.bandwidth_bytes_per_s / 1e6:.1f} MB/s; in a topology YAML: inter_node: {{kind: ethernet, "
              f"nic_bandwidth_bytes_per_s: {cost.bandwidth_bytes_per_s:.4g}, latency_s: {cost.latency_s:.3g}}}")
    return 0


def run(args: argparse.Namespace) -> int:
    import sys

    from pipetrain.calibration.measured import combine_calibrations

    if args.inter_node_rank is not None:
        return run_inter_node(args)
    if not args.topology:
        raise ConfigError("--topology is required (e.g. local-cpu:2), unless --inter-node-rank measures a link between nodes")
    from pipetrain.calibration.run import describe, run_calibration

    models = tuple(args.model or ["tiny-gpt"])
    sizes = parse_int_list(args.microbatch_sizes, "--microbatch-sizes")
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {args.seq_len}")
    quiet = bool(args.json)

    def say(msg: str) -> None:
        if not quiet:
            print(f"  {msg} ...", file=sys.stderr, flush=True)

    if args.repeat < 1:
        raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
    cals = []
    for i in range(args.repeat):
        if args.repeat > 1:
            say(f"calibration {i + 1} of {args.repeat}")
        cals.append(run_calibration(args.topology, models=models, micro_batch_sizes=sizes, seq_len=args.seq_len, dtype=args.dtype,
                                    threads=args.threads, repeats=args.repeats, rounds=args.rounds, probe=not args.no_probe,
                                    runtime=not args.no_runtime, tensor_parallel=tuple(args.tp or ()), progress=say))
    cal = combine_calibrations(cals)
    path = cal.save(args.output)
    if args.json:
        print(cal.to_json())
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"calibration of {cal.topology} ({cal.elapsed_s:.1f} s)", show_header=False)
    t.add_column("what")
    t.add_column("measured / fitted")
    for what, value in describe(cal):
        t.add_row(what, value)
    Console().print(t)
    print(f"wrote {path}; use it with `pipetrain plan --calibration {path}` and `pipetrain simulate PLAN.json --calibration {path}`")
    return 0
