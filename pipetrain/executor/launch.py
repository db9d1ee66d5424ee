"""Launch a plan with PyTorch's elastic launcher (what ``torchrun`` runs), on one node or several.

:func:`launch` starts this node's workers (``python -m pipetrain.executor plan.json ...``) through
``torch.distributed.launcher.api.elastic_launch``: on one node all ``pp*dp`` of them, with the
rendezvous on ``127.0.0.1`` and a free port; with ``--nnodes K --rdzv-endpoint HOST:PORT`` (the same
command on every node) ``pp*dp/K`` of them, the rendezvous hosted by the node whose address HOST is.
The rendezvous waits (``join_timeout``, the store's ``read_timeout``) are capped at ``--timeout``:
torch's defaults (600 s to join) would let a missing node hold the others far longer than any
wait pipetrain allows its workers.

With ``--max-restarts N`` the agent restarts the workers after a rank fails, up to N times; they
resume from the newest checkpoint that verifies (:mod:`pipetrain.executor.worker`). Once no
restart is left, :func:`launch` raises a :class:`~pipetrain.errors.RunError` naming the failed
rank and its error (a rank's own error beats the connection errors it caused in its peers; a rank
that timed out waiting for another node names that node). On success it returns the
:class:`~pipetrain.executor.result.RunResult` rank 0 wrote.
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

from pipetrain.errors import ConfigError, RunError
from pipetrain.executor.agentguard import AgentGuard
from pipetrain.executor.config import RunConfig, config_to_argv
from pipetrain.executor.heartbeat import HANG_FILE, HangWatch, Stall
from pipetrain.plan import Plan

__all__ = ["free_port", "route_addr", "iface_of", "rdzv_configs", "check_executor_runs", "preflight", "launch", "describe_failure", "worker_env", "main"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def route_addr(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (no packet is sent: a UDP connect only picks
    the route). The rendezvous hands it to the other nodes, so it must be one they can reach; the
    host name's address, torch's default, need not be (a container, a second network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
        except OSError as exc:
            raise RunError(f"--rdzv-endpoint {host}:{port}: no route to it from this node ({exc.strerror or exc})") from None
        return str(s.getsockname()[0])


def iface_of(addr: str) -> str | None:
    """The network interface that has the IPv4 address ``addr`` (None if none has it; Linux)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                got = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(got[20:24]) == addr:
                return name
    return None


def rdzv_configs(timeout_s: float, *, is_host: bool) -> dict[str, Any]:
    """c10d rendezvous settings: no wait longer than pipetrain's own ``--timeout``; ``is_host`` said,
    not guessed (torch compares the endpoint with the host name's addresses, which a node reached
    by another address, a namespace or a second network, does not match)."""
    t = max(1, int(timeout_s))
    return {"join_timeout": t, "read_timeout": t, "close_timeout": t, "last_call_timeout": min(t, 5), "is_host": is_host}


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


def describe_failure(run_dir: Path, failures: dict[int, Any], pp: int, tp: int = 1) -> str:
    """One line naming the rank that failed first and why (see module docstring)."""

    def at(r: int) -> str:  # where global rank r sits (RankLayout's order: tp innermost, then pp, then dp)
        return f"pipeline rank {(r // tp) % pp}, replica {r // (tp * pp)}" + (f", tp rank {r % tp}" if tp > 1 else "")

    root: list[tuple[float, int, str]] = []
    peer: list[tuple[float, int, str]] = []
    fdir = run_dir / "failures"
    hang = fdir / HANG_FILE
    if hang.is_file():  # the hang watch killed the workers: the stalled rank is the cause, not the kills
        try:
            d = json.loads(hang.read_text())
            stall = Stall(rank=int(d["rank"]), step=int(d["step"]), action=str(d["action"]), idle_s=float(d["idle_s"]))
            r = stall.rank
            return f"{stall.describe()} ({at(r)}); raise --progress-timeout if it is just slow"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if fdir.is_dir():
        for f in fdir.glob("rank*.txt"):
            r = int(f.stem[4:])
            head = f.read_text().splitlines()[0] if f.stat().st_size else "unknown error"
            kind, _, msg = head.partition(" ")
            (root if kind == "root" else peer).append((f.stat().st_mtime, r, msg))

    def who(r: int, msg: str) -> tuple[str, str]:
        """'rank R (pipeline rank, replica[, node N at ADDR])' and the message without its node tag."""
        node = ""
        if msg.startswith("[node ") and "] " in msg:
            tag, _, msg = msg[1:].partition("] ")
            node = f", {tag}"
        return f"rank {r} ({at(r)}{node})", msg

    if root:
        _, r, msg = min(root)
        name, msg = who(r, msg)
        return f"{name} failed: {msg}"
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
        return f"rank {r} ({at(r)}) was killed by {name}"
    if peer:
        _, r, msg = min(peer)
        name, msg = who(r, msg)
        if "imed out" in msg and "node " in name:  # a wait on another node ran out: the link or that node is gone
            return f"{name} lost contact with the other node(s) (no message within --timeout): {msg}"
        return f"{name} failed: {msg}"
    if failures:
        r = min(failures)
        return f"rank {r} exited with code {getattr(failures[r], 'exitcode', '?')}"
    return "the run failed without a rank reporting an error"


def check_executor_runs(plan: Plan, cfg: RunConfig, model: Any = None) -> None:
    """Refuse what the executor does not run (:func:`pipetrain.program.executor_supports`, the one
    table of schedule x tp x zero x recompute), and tensor parallelism the model cannot take."""
    from pipetrain.program import executor_supports

    why = executor_supports(plan.schedule, plan.tp, plan.zero, plan.recompute)
    if why is not None:
        raise RunError(why)
    if plan.tp > 1:
        if model is None:
            from pipetrain.executor.stage import build_meta, load_spec

            model = build_meta(load_spec(plan.model))
        from pipetrain.executor.parallel import check_tensor_parallel

        check_tensor_parallel(model, plan.tp, sequence_parallel=plan.sequence_parallel)


def preflight(cfg: RunConfig, plan: Plan) -> Any:
    """Mistakes caught before any process starts (one line, exit 2 at the CLI); with ``--resume``,
    return the checkpoint the run will resume from (:class:`~pipetrain.executor.checkpoint.Found`)."""
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
    check_executor_runs(plan, cfg)
    if plan.stages[0].on_gpu:
        import torch

        if not torch.cuda.is_available():
            raise RunError(f"the plan places its stages on GPUs ({plan.stages[0].device}, topology {plan.topology}) but this "
                           "machine has no CUDA device: re-plan with --topology local-cpu:N to run here")
        if torch.cuda.device_count() < plan.world_size:
            print(f"warning: {plan.world_size} ranks on {torch.cuda.device_count()} GPU(s): ranks share a GPU, which NCCL may "
                  "refuse ('Duplicate GPU detected')", file=sys.stderr)
    if plan.world_size % cfg.nnodes:
        raise ConfigError(f"--nnodes {cfg.nnodes} does not divide the plan's pp*dp*tp = {plan.world_size} ranks: "
                          "use a node count that does, or re-plan")
    if cfg.resume:
        from pipetrain.executor.checkpoint import check_resumable, find_checkpoint

        found = find_checkpoint(cfg.run_dir)
        if found is None:
            raise RunError(f"--resume: {cfg.run_dir} has no complete checkpoint; run without --resume, or with --checkpoint-every N")
        check_resumable(found, plan, cfg.run_dir)  # another model or data position: before any process starts
        return found
    return None


def launch(cfg: RunConfig, *, plan: Plan | None = None, monitor_interval_s: float = 0.1) -> Any:
    """Run ``cfg`` on ``pp*dp`` local workers; return the RunResult (raises RunError on failure)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from pipetrain.executor.result import load_result

    plan = plan or Plan.load(cfg.plan_path)
    found = preflight(cfg, plan)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if found is not None:
        from pipetrain.executor.checkpoint import same_layout

        if not same_layout(found, plan):
            # a resume under another plan: the earlier ranks' telemetry and final weights describe
            # other ranks, so result.json covers the steps from the checkpoint on; they are kept aside
            for sub, pattern in (("telemetry", "rank*.jsonl"), ("final", "rank*.pt")):
                old = run_dir / sub / f"before_step_{found.step}"
                for f in (run_dir / sub).glob(pattern):
                    old.mkdir(parents=True, exist_ok=True)
                    f.replace(old / f.name)
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
    if cfg.rdzv_endpoint:
        host, _, port_text = cfg.rdzv_endpoint.rpartition(":")
        endpoint, local_addr = cfg.rdzv_endpoint, route_addr(host, int(port_text))
        run_id, is_host = cfg.rdzv_id, local_addr == host
        iface = iface_of(local_addr)
        if iface and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo otherwise listens on the address the host name resolves to, which other nodes need not reach
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    else:
        endpoint, local_addr = f"127.0.0.1:{free_port()}", "127.0.0.1"
        run_id, is_host = f"pipetrain-{uuid.uuid4().hex[:8]}", True
    os.environ["PIPETRAIN_NODE_ADDR"] = local_addr  # the workers name their node by it in failures
    if cfg.max_restarts:
        # torch shares the agent's rendezvous store with the workers and keeps it across restarts, but the
        # workers' keys are not per attempt: restarted ranks read the dead ones' gloo addresses and fail with
        # "Connection refused" (pytorch/pytorch#135712, #167288). Unshared, rank 0 hosts a new store each attempt.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    lc = LaunchConfig(min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=plan.world_size // cfg.nnodes, run_id=run_id,
                      rdzv_backend="c10d", rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs(cfg.timeout_s, is_host=is_host),
                      max_restarts=cfg.max_restarts, monitor_interval=monitor_interval_s, start_method="spawn", local_addr=local_addr)
    argv = ["-u", "-m", "pipetrain.executor", *config_to_argv(cfg)]
    watch = HangWatch(run_dir, timeout_s=cfg.progress_timeout_s, startup_timeout_s=cfg.timeout_s,
                      world_size=plan.world_size).start()

    def stuck() -> None:  # no worker of this node is left and its agent waits on a lost rendezvous (agentguard)
        print(f"error: {describe_failure(run_dir, {}, plan.pp, plan.tp)} (node {local_addr} lost the rendezvous at {endpoint})",
              file=sys.stderr, flush=True)
        os._exit(2)

    # after the workers are gone the agent may rendezvous again for a restart (join_timeout = --timeout)
    guard = AgentGuard(run_dir, grace_s=cfg.timeout_s * (2 if cfg.max_restarts else 1), on_stuck=stuck).start() if cfg.nnodes > 1 else None
    try:
        elastic_launch(lc, sys.executable)(*argv)
    except ChildFailedError as exc:
        raise RunError(describe_failure(run_dir, dict(exc.failures), plan.pp, plan.tp)) from None
    except RendezvousError as exc:  # this node lost (or never had) contact with the rendezvous host
        lost = f"node {local_addr} lost contact with the rendezvous at {endpoint}"
        fdir = run_dir / "failures"
        if (fdir / HANG_FILE).is_file() or any(fdir.glob("rank*.txt")):  # the host ended the run over a failure: name it
            raise RunError(f"{describe_failure(run_dir, {}, plan.pp, plan.tp)} ({lost})") from None
        raise RunError(f"{lost} (waited at most {int(cfg.timeout_s)} s, --timeout): {type(exc).__name__}: {exc}") from None
    finally:
        watch.stop()
        if guard is not None:
            guard.stop()
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
