"""Launch a plan on this machine with PyTorch's elastic launcher (what ``torchrun`` runs).

:func:`launch` starts ``pp*dp`` workers (``python -m pipetrain.executor plan.json ...``) through
``torch.distributed.launcher.api.elastic_launch`` on ``127.0.0.1`` and a free port, with
``max_restarts=0``: when any worker fails or is killed the agent stops the others, and
:func:`launch` raises a :class:`~pipetrain.errors.RunError` naming the failed rank and its
error (a rank's own error beats the connection errors it caused in its peers). On success it
returns the :class:`~pipetrain.executor.result.RunResult` rank 0 wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.executor.config import RunConfig, config_to_argv
from pipetrain.executor.heartbeat import HANG_FILE, HangWatch, Stall
from pipetrain.plan import Plan

__all__ = ["free_port", "preflight", "launch", "describe_failure", "worker_env", "main"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: glibc malloc settings for the workers (unless already set): keep freed memory in the heap instead
#: of returning it to the OS, and serve allocations up to 256 MiB from it. A training step frees and
#: re-allocates the same activation and gradient sizes every step; with glibc's defaults each step
#: faulted the pages back in, and with these none are (figures: benchmarks/RESULTS.md).
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(256 << 20)}


def worker_env(threads: int) -> None:
    """Environment every worker inherits: one OpenMP thread per rank unless told otherwise, and
    :data:`MALLOC_ENV` unless set."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for k, v in MALLOC_ENV.items():
        os.environ.setdefault(k, v)


def describe_failure(run_dir: Path, failures: dict[int, Any], pp: int) -> str:
    """One line naming the rank that failed first and why (see module docstring)."""
    root: list[tuple[float, int, str]] = []
    peer: list[tuple[float, int, str]] = []
    fdir = run_dir / "failures"
    hang = fdir / HANG_FILE
    if hang.is_file():  # the hang watch killed the workers: the stalled rank is the cause, not the kills
        try:
            d = json.loads(hang.read_text())
            stall = Stall(rank=int(d["rank"]), step=int(d["step"]), action=str(d["action"]), idle_s=float(d["idle_s"]))
            r = stall.rank
            return f"{stall.describe()} (pipeline rank {r % pp}, replica {r // pp}); raise --progress-timeout if it is just slow"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if fdir.is_dir():
        for f in fdir.glob("rank*.txt"):
            r = int(f.stem[4:])
            head = f.read_text().splitlines()[0] if f.stat().st_size else "unknown error"
            kind, _, msg = head.partition(" ")
            (root if kind == "root" else peer).append((f.stat().st_mtime, r, msg))
    if root:
        _, r, msg = min(root)
        return f"rank {r} (pipeline rank {r % pp}, replica {r // pp}) failed: {msg}"
    killed = []
    for r, pf in failures.items():
        code = getattr(pf, "exitcode", 1)
        if code is not None and code < 0 and code != -15:
            try:
                name = pf.signal_name()
            except Exception:  # noqa: BLE001
                name = f"signal {-code}"
            killed.append((r, name))
    if killed:
        r, name = min(killed)
        return f"rank {r} (pipeline rank {r % pp}, replica {r // pp}) was killed by {name}"
    if peer:
        _, r, msg = min(peer)
        return f"rank {r} (pipeline rank {r % pp}, replica {r // pp}) failed: {msg}"
    if failures:
        r = min(failures)
        return f"rank {r} exited with code {getattr(failures[r], 'exitcode', '?')}"
    return "the run failed without a rank reporting an error"


def preflight(cfg: RunConfig, plan: Plan) -> None:
    """Mistakes caught before any process starts (one line, exit 2 at the CLI)."""
    from pipetrain.errors import ConfigError
    from pipetrain.executor.data import DATASETS

    if cfg.dataset not in DATASETS and not cfg.dataset.endswith(".npy"):
        raise ConfigError(f"--dataset {cfg.dataset!r} is unknown: use {', '.join(DATASETS)} or a PATH.npy token file")
    if cfg.dataset.endswith(".npy") and not Path(cfg.dataset).is_file():
        raise ConfigError(f"token file {cfg.dataset!r} does not exist")
    if plan.dtype == "fp16":
        raise RunError("fp16 training needs loss scaling, which the executor does not do: re-plan with dtype bf16 or fp32")
    if plan.simulation_only:
        raise RunError("this plan is marked simulation-only (a what-if): re-plan without --simulation-only to run it")
    from pipetrain.planner.trace import model_fingerprint

    plan.check_graph(model_fingerprint(plan.model), plan.model)  # every worker checks again; this fails before they start
    if plan.stages[0].on_gpu:
        import torch

        if not torch.cuda.is_available():
            raise RunError(f"the plan places its stages on GPUs ({plan.stages[0].device}, topology {plan.topology}) but this "
                           "machine has no CUDA device: re-plan with --topology local-cpu:N to run here")
        if torch.cuda.device_count() < plan.world_size:
            print(f"warning: {plan.world_size} ranks on {torch.cuda.device_count()} GPU(s): ranks share a GPU, which NCCL may "
                  "refuse ('Duplicate GPU detected')", file=sys.stderr)
    if cfg.resume:
        from pipetrain.executor.checkpoint import latest_step

        if latest_step(cfg.run_dir) is None:
            raise RunError(f"--resume: {cfg.run_dir} has no complete checkpoint; run without --resume, or with --checkpoint-every N")


def launch(cfg: RunConfig, *, plan: Plan | None = None, monitor_interval_s: float = 0.1) -> Any:
    """Run ``cfg`` on ``pp*dp`` local workers; return the RunResult (raises RunError on failure)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from pipetrain.executor.result import load_result

    plan = plan or Plan.load(cfg.plan_path)
    preflight(cfg, plan)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # what `pipetrain validate RUN_DIR` / `pipetrain report RUN_DIR` read back (same plan, same options)
    if not (run_dir / "plan.json").exists() or (run_dir / "plan.json").resolve() != Path(cfg.plan_path).resolve():
        plan.save(run_dir / "plan.json")
    (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    for f in (run_dir / "failures").glob("rank*.txt"):
        f.unlink()
    if not cfg.resume:
        for f in (run_dir / "telemetry").glob("rank*.jsonl"):
            f.unlink()
    (run_dir / "result.json").unlink(missing_ok=True)
    worker_env(cfg.threads)
    port = free_port()
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=plan.world_size, run_id=f"pipetrain-{uuid.uuid4().hex[:8]}",
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"timeout": int(max(cfg.timeout_s, 30))},
                      max_restarts=0, monitor_interval=monitor_interval_s, start_method="spawn", local_addr="127.0.0.1")
    argv = ["-u", "-m", "pipetrain.executor", *config_to_argv(cfg)]
    watch = HangWatch(run_dir, timeout_s=cfg.progress_timeout_s, startup_timeout_s=cfg.timeout_s,
                      world_size=plan.world_size).start()
    try:
        elastic_launch(lc, sys.executable)(*argv)
    except ChildFailedError as exc:
        raise RunError(describe_failure(run_dir, dict(exc.failures), plan.pp)) from None
    finally:
        watch.stop()
    return load_result(run_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipetrain.executor.launch plan.json [run options]``: launch and print the losses.

    The bare launcher of ``pipetrain run`` (same options, same one-line errors and exit codes),
    without its live view and after-run summaries.
    """
    import argparse

    from pipetrain.errors import PipetrainError
    from pipetrain.executor.config import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m pipetrain.executor.launch", description=(main.__doc__ or "").splitlines()[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        res = launch(config_from_args(args))
    except PipetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: workers stopped", file=sys.stderr)
        return 130
    for s, loss, t in zip(res.steps, res.losses, res.step_times_s):
        print(f"step {s + 1:5d}  loss {loss:.5f}  {t * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
