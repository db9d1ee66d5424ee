"""Run a plan as a real torch.distributed pipeline on this machine (gloo on CPU, NCCL on CUDA).

Starts pp*dp workers with PyTorch's elastic launcher (torchrun's machinery). For several nodes run
the same command on each with ``--nnodes K --rdzv-endpoint HOST:PORT`` (see
:mod:`pipetrain.executor.launch`); ``--max-restarts N`` restarts the workers after a failure.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipetrain.executor.config import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--validate", action="store_true",
                        help="then train the same steps on one device and compare (RUN_DIR/validation.json; implies --save-final)")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="calibration (pipetrain calibrate) for the simulated-vs-measured summary (default: this machine's block profile)")


def run(args: argparse.Namespace) -> int:
    from pipetrain.executor.config import config_from_args
    from pipetrain.executor.launch import launch
    from pipetrain.plan import Plan

    cfg = config_from_args(args)
    if getattr(args, "validate", False) and not cfg.save_final:
        import dataclasses

        cfg = dataclasses.replace(cfg, save_final=True)
    plan = Plan.load(cfg.plan_path)
    from pipetrain.validation.fidelity import load_run_calibration, report_run_fidelity

    calibration = load_run_calibration(getattr(args, "calibration", None))
    mesh = (f" tp={plan.tp}" if plan.tp > 1 else "") + (" sequence-parallel" if plan.sequence_parallel else "") + \
        (f" zero={plan.zero}" if plan.zero else "")
    print(f"pipetrain run: {plan.model}, pp={plan.pp} dp={plan.dp}{mesh} {plan.schedule} m={plan.num_microbatches} "
          f"mbs={plan.micro_batch_size}, {cfg.steps} steps -> {cfg.run_dir}", flush=True)
    from pipetrain.executor.monitor import LiveMonitor

    mon = LiveMonitor(cfg.run_dir, plan, cfg.steps)
    try:
        with mon:
            res = launch(cfg, plan=plan)
    except KeyboardInterrupt:
        print("interrupted: workers stopped")
        return 130
    except Exception as exc:  # the elastic agent turns Ctrl-C into its SignalException
        if type(exc).__name__ == "SignalException":
            print("interrupted: workers stopped")
            return 130
        raise
    for s, loss, t in zip(res.steps, res.losses, res.step_times_s):
        if mon.last is None:  # the live view already showed the steps
            print(f"step {s + 1:5d}  loss {loss:.5f}  {t * 1e3:8.1f} ms")
    print(f"median step {res.median_step_time_s * 1e3:.1f} ms; result: {cfg.run_dir}/result.json, "
          f"telemetry: {cfg.run_dir}/telemetry/rank*.jsonl")
    report_run_fidelity(cfg.run_dir, plan, calibration)
    if getattr(args, "validate", False):
        from pipetrain.validation.validate import validate_run

        report = validate_run(cfg.run_dir, progress=lambda msg: print(msg, flush=True))
        print(report.summary)
        print(f"wrote {cfg.run_dir}/validation.json")
        return 0 if report.passed else 1
    return 0
