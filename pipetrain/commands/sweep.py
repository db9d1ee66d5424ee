"""What-if sweep: vary one or two knobs of a job, plan each point, print a table.

``pipetrain sweep examples/gpt2-xl-dgx.yaml --vary m=8,16,32 --vary schedule=1f1b,gpipe [--json] [--report DIR]``.
Knobs: ``m`` (micro-batches), ``p`` (pipeline depth), ``bandwidth`` (bytes/s of every link,
inside and between nodes), ``device`` (a device type replacing every device of the topology)
and ``schedule``. Each point is a full planner search with that knob pinned; infeasible points
show why. ``--report DIR`` also writes the rows to ``DIR/sweep.json`` and, from that file, a
self-contained ``DIR/report.html`` with a line plot (one knob) or heat map (two) of the predicted
step time (:mod:`pipetrain.reports.sweep`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipetrain.commands.plan import add_job_arguments, graph_source, job_from_args
from pipetrain.errors import ConfigError, PipetrainError

__all__ = ["add_arguments", "run", "KNOBS", "parse_vary", "sweep"]

KNOBS = ("m", "p", "bandwidth", "device", "schedule")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--vary", action="append", required=True, metavar="KNOB=V1,V2,...",
                        help=f"knob to vary ({', '.join(KNOBS)}); give --vary once or twice")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--report", metavar="DIR", help="also write DIR/sweep.json and DIR/report.html (plot of the swept knobs, the table)")


def parse_vary(items: list[str]) -> list[tuple[str, list[Any]]]:
    if not 1 <= len(items) <= 2:
        raise ConfigError(f"sweep varies one or two knobs, got {len(items)} --vary")
    out = []
    for it in items:
        knob, _, values = it.partition("=")
        knob = knob.strip().lower()
        if knob not in KNOBS:
            raise ConfigError(f"--vary {it!r}: unknown knob {knob!r}; choose one of {', '.join(KNOBS)}")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--vary {it!r}: give values, e.g. {knob}=1,2,4")
        try:
            conv: list[Any] = [int(v) for v in vals] if knob in ("m", "p") else [float(v) for v in vals] if knob == "bandwidth" else vals
        except ValueError:
            raise ConfigError(f"--vary {it!r}: {knob} takes numbers") from None
        out.append((knob, conv))
    if len(out) == 2 and out[0][0] == out[1][0]:
        raise ConfigError(f"--vary names {out[0][0]!r} twice")
    return out


def _topology(topo, knob: str, value: Any):  # -> Topology
    from pipetrain.hardware import BUILTIN_DEVICE_TYPES

    if knob == "bandwidth":
        if value <= 0:
            raise ConfigError(f"bandwidth must be > 0 bytes/s, got {value}")
        nodes = tuple(replace(n, link=replace(n.link, bandwidth_bytes_per_s=value)) for n in topo.nodes)
        net = replace(topo.inter_node, nic_bandwidth_bytes_per_s=value) if topo.inter_node else None
        return replace(topo, nodes=nodes, inter_node=net)
    if knob == "device":
        types = dict(topo.device_types) | BUILTIN_DEVICE_TYPES
        if value not in types:
            raise ConfigError(f"device type {value!r} is unknown; known: {', '.join(sorted(types))}")
        nodes = tuple(replace(n, device_types=(value,) * len(n.device_types)) for n in topo.nodes)
        return replace(topo, nodes=nodes, device_types={value: types[value]})
    return topo


def sweep(job, vary: list[tuple[str, list[Any]]], *, graph_for=None, topology=None) -> list[dict[str, Any]]:
    """Plan every point of the grid; one row per point (``error`` set where nothing fits)."""
    from pipetrain.planner.search import _tracer, search
    from pipetrain.topology import resolve_topology

    base_topo = topology or resolve_topology(job.topology)
    for knob, values in vary:  # a typo in a knob value is an error, not a row
        for v in values if knob in ("device", "bandwidth") else ():
            _topology(base_topo, knob, v)
    graph_for = graph_for or _tracer(job)
    rows = []
    for combo in itertools.product(*[v for _, v in vary]):
        point = dict(zip([k for k, _ in vary], combo))
        row: dict[str, Any] = dict(point)
        try:
            j, topo = job, base_topo
            for knob, value in point.items():
                if knob == "m":
                    j = replace(j, microbatches=value, microbatch_size=None)
                elif knob == "p":
                    j = replace(j, pp=value, dp=None if job.dp is None else job.dp)
                elif knob == "schedule":
                    j = replace(j, schedule=value)
                else:
                    topo = _topology(topo, knob, value)
            res = search(j, graph_for=graph_for, topology=topo, top_k=1, explain=False)
            b, sim = res.best, res.best.sim
            assert sim is not None  # the best point is always simulator-confirmed
            row.update(plan=b.candidate.describe(), step_time_s=sim.step_time_s, samples_per_s=sim.samples_per_s,
                       mfu=sim.mfu, bubble_fraction=sim.bubble_fraction, peak_memory_bytes=max(b.rank_peaks_bytes()),
                       error=None)
        except PipetrainError as exc:
            row.update(plan=None, step_time_s=None, samples_per_s=None, mfu=None, bubble_fraction=None,
                       peak_memory_bytes=None, error=str(exc))
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    vary = parse_vary(args.vary)
    job = job_from_args(args)
    graph_for, job = graph_source(args, job)
    from pipetrain.commands.plan import _progress
    from pipetrain.reports.sweep import SWEEP_FILE, sweep_table, write_sweep_file, write_sweep_report

    with _progress(f"sweeping {' x '.join(k for k, _ in vary)} for {job.model}"):
        rows = sweep(job, vary, graph_for=graph_for)
    data = {"job": job.model, "topology": job.topology, "vary": [k for k, _ in vary], "values": [v for _, v in vary], "rows": rows}
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        write_sweep_file(out / SWEEP_FILE, data)
        report = write_sweep_report(out)  # from the file just written: the report reads files only
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        t = Table(title=f"sweep of {job.model} on {job.topology}")
        head, cells = sweep_table([k for k, _ in vary], rows)
        for i, col in enumerate(head):
            t.add_column(col, justify="left" if i == len(head) - 1 else "right")
        for r, c in zip(rows, cells):
            t.add_row(*c[:-1], f"[red]{escape(c[-1])}[/]" if r["error"] else escape(c[-1]))
        console.print(t)
    if args.report:
        print(f"wrote {report.html} and {Path(args.report) / SWEEP_FILE}", file=sys.stderr if args.json else sys.stdout)
    return 0
