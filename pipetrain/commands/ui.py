"""Open the interactive what-if page of a plan, a job config or a finished run.

``pipetrain ui PLAN.json | CONFIG.yaml | RUN_DIR [--graph GRAPH.json] [--host HOST] [--port N]
[--no-browser]`` serves a local page (127.0.0.1, a free port, printed and opened in a browser
where there is one) that shows the plan's stages, micro-batches, schedule, buffers and recompute,
and re-simulates it on every edit of a knob or a stage boundary: timeline, bubble, step time and
per-stage memory, or the reason the edit is infeasible. "Save plan" writes the edited plan (which
``pipetrain run`` accepts) into the directory given (beside PLAN.json or CONFIG.yaml, or into
RUN_DIR). Given a RUN_DIR the page also shows the measured run: losses against single-device
training and the simulated-vs-measured table per stage. A CONFIG.yaml is planned first (as
``pipetrain plan`` does). The model is traced once, on the meta device; ``--graph`` takes a layer
graph from ``pipetrain graph MODEL --json PATH`` instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipetrain.errors import ConfigError

__all__ = ["add_arguments", "run"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="PLAN.json|CONFIG.yaml|RUN_DIR", help="a plan, a job config to plan, or a finished run's directory")
    parser.add_argument("--graph", metavar="GRAPH.json", default=None,
                        help="the model's layer graph from `pipetrain graph MODEL --json PATH` (default: trace the model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; anything else is reachable by others)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser; print the address only")


def run(args: argparse.Namespace) -> int:
    import time
    import webbrowser

    from pipetrain.graph import LayerGraph
    from pipetrain.plan import Plan
    from pipetrain.reports.rundir import RunDir, read_run_dir
    from pipetrain.ui import UiApp, WhatIf, start_server

    target = Path(args.target)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    run_dir: RunDir | None = None
    graph: LayerGraph | None = LayerGraph.load(args.graph) if args.graph else None
    source_plan: Path | None = None
    if target.is_dir():
        run_dir = read_run_dir(target)
        plan, save_dir, source_plan = run_dir.plan, target, target / "plan.json"
    elif target.suffix in (".yaml", ".yml"):
        from pipetrain.planner.explain import plan_job
        from pipetrain.planner.job import load_job

        print(f"planning {target} ...", flush=True)
        outcome = plan_job(load_job(target))
        plan, save_dir = outcome.plan, target.resolve().parent
        if graph is None:
            graph = outcome.result.graph()
    elif target.suffix == ".json":
        plan, save_dir, source_plan = Plan.load(target), target.resolve().parent, target
    else:
        raise ConfigError(f"{args.target}: give a plan (.json), a job config (.yaml) or a run directory")
    if graph is None:
        from pipetrain.planner.trace import trace_graph

        graph = trace_graph(plan.model, micro_batch_size=plan.micro_batch_size, seq_len=plan.seq_len, dtype=plan.dtype)
    whatif = WhatIf(plan, graph)
    app = UiApp(whatif=whatif, save_dir=save_dir.resolve(), roots=(save_dir.resolve(),), source=str(args.target),
                source_plan=source_plan, run=run_dir)
    try:
        server = start_server(app, host=args.host, port=args.port)
    except OSError as exc:
        raise ConfigError(f"cannot serve on {args.host}:{args.port} ({exc.strerror or exc}): pick another --port or --host") from None
    if args.host not in _LOOPBACK:
        print(f"warning: serving on {args.host}: anyone who can reach this machine can see the plan and save plan files "
              f"into {save_dir.resolve()}")
    print(f"pipetrain ui: {server.url}  (Ctrl-C to stop)", flush=True)
    if not args.no_browser:
        try:
            webbrowser.get().open(server.url)
        except webbrowser.Error:
            print("no browser found here: open the address above in one", flush=True)
    try:
        while server.thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.close()
    return 0
