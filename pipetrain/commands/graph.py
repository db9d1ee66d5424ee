"""Trace a model on the meta device and print its layer graph, one row per block (or op).

``pipetrain graph MODEL [--seq-len N] [--micro-batch-size N] [--dtype bf16|fp16|fp32]
[--granularity block|op] [--json PATH]``. MODEL is a preset (``gpt2``, ``llama2-70b``, ...)
or ``package.module:factory``, or a Hugging Face config ``hf:NAME_OR_PATH``. FLOPs and bytes are for one micro-batch.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run", "human_flops", "human_bytes", "human_count"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="preset name, hf:NAME_OR_PATH or package.module:factory")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the model's context)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch (default 1)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="parameter and activation dtype (default fp32)")
    parser.add_argument("--granularity", choices=("block", "op"), default="block",
                        help="one node per block (default) or per torch.fx op")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the graph as JSON to PATH")


def _human(value: float, units: tuple[str, ...], base: float) -> str:
    v = float(value)
    for unit in units[:-1]:
        if abs(v) < base:
            return f"{v:.3g} {unit}".strip() if unit else f"{v:.3g}"
        v /= base
    return f"{v:.3g} {units[-1]}"


def human_flops(flops: float) -> str:
    """1.61e12 -> '1.61 TFLOP'."""
    return _human(flops, ("FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"), 1000.0)


def human_bytes(n: float) -> str:
    """50397184 -> '48.1 MiB'."""
    return _human(n, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"), 1024.0)


def human_count(n: float) -> str:
    """124439808 -> '124 M'."""
    return _human(n, ("", "K", "M", "B", "T"), 1000.0)


_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int64": "i64"}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipetrain.planner.trace import trace_graph

    graph = trace_graph(args.model, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, dtype=args.dtype,
                        granularity=args.granularity)
    console = Console()
    console = Console(width=max(console.width, 150))  # the table needs ~145 columns; never squash it
    shape = "x".join(str(d) for d in graph.input_shape)
    title = (f"{graph.model}: micro-batch {graph.micro_batch_size}, input {shape} {graph.input_dtype}, {graph.dtype}, "
             f"{graph.granularity} granularity, {graph.num_nodes} nodes")
    table = Table(title=escape(title), show_footer=True)
    totals = {
        "params": human_count(graph.param_count),
        "param_bytes": human_bytes(graph.param_bytes),
        "fwd": human_flops(graph.fwd_flops),
        "bwd": human_flops(graph.bwd_flops),
        "saved": human_bytes(sum(n.saved_bytes for n in graph.nodes)),
    }
    table.add_column("#", justify="right", footer="")
    table.add_column("name", footer="total")
    table.add_column("kind")
    table.add_column("params", justify="right", footer=totals["params"])
    table.add_column("param bytes", justify="right", footer=totals["param_bytes"])
    table.add_column("fwd", justify="right", footer=totals["fwd"])
    table.add_column("bwd", justify="right", footer=totals["bwd"])
    table.add_column("of it wgrad", justify="right", footer=human_flops(sum(n.wgrad_flops for n in graph.nodes)))
    table.add_column("output", justify="right")
    table.add_column("saved for bwd", justify="right", footer=totals["saved"])
    table.add_column("output shape")
    for i, n in enumerate(graph.nodes):
        table.add_row(str(i), escape(n.name), escape(n.kind), human_count(n.param_count), human_bytes(n.param_bytes),
                      human_flops(n.fwd_flops), human_flops(n.bwd_flops), human_flops(n.wgrad_flops),
                      human_bytes(n.output_bytes), human_bytes(n.saved_bytes),
                      "x".join(str(d) for d in n.output_shape) + f" {_SHORT.get(n.output_dtype, n.output_dtype)}")
    console.print(table)
    for t in graph.tied:
        console.print(f"tied: {t.name} owned by node {t.owner} ({graph.nodes[t.owner].name}), also used by "
                      f"{', '.join(graph.nodes[u].name for u in t.users)}; {human_count(t.param_count)} parameters "
                      "counted once")
    widest = max(graph.cuts, key=lambda c: c.bytes, default=None)
    line = f"{len(graph.cuts)} legal cut positions"
    if widest is not None:
        line += (f"; the widest is before node {widest.position} ({graph.nodes[widest.position].name}): "
                 f"{len(widest.tensors)} tensor(s), {human_bytes(widest.bytes)}")
    console.print(line)
    console.print(f"fingerprint {graph.fingerprint[:16]}")
    if args.json:
        path = graph.save(args.json)
        console.print(f"wrote {path}")
    return 0
