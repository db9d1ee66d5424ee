"""Run options shared by ``pipetrain run``, the torchrun entry point and the reference run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipetrain.errors import ConfigError

__all__ = ["RunConfig", "add_run_arguments", "config_from_args", "config_to_argv"]


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    plan_path: str
    run_dir: str = "runs/run"
    steps: int = 20
    dataset: str = "synthetic"
    lr: float = 0.0  # 0 -> optimizer default
    weight_decay: float = 0.0
    momentum: float = 0.0
    clip_norm: float = 1.0
    checkpoint_every: int = 0
    resume: bool = False
    timeout_s: float = 60.0
    threads: int = 1
    telemetry: bool = True
    save_final: bool = False
    #: a rank that makes no progress this long is reported as hung and the run ends (exit 2)
    progress_timeout_s: float = 60.0
    #: torchrun's elastic agent restarts the workers this many times after a rank fails; they resume
    #: from the newest checkpoint that verifies (launcher only)
    max_restarts: int = 0
    #: nodes of a multi-node run: each runs ``pipetrain run`` with the same plan, ``--nnodes`` and
    #: ``--rdzv-endpoint`` (launcher only)
    nnodes: int = 1
    #: HOST:PORT of the rendezvous, hosted by the launcher on the node whose address HOST is; empty:
    #: this machine alone, on 127.0.0.1 and a free port (launcher only)
    rdzv_endpoint: str = ""
    #: the run's name in the rendezvous: every node of one run passes the same one (launcher only)
    rdzv_id: str = "pipetrain"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout_s}")
        if self.progress_timeout_s <= 0:
            raise ConfigError(f"--progress-timeout must be > 0 seconds, got {self.progress_timeout_s}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (an address of the first node, the same on every node)")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan JSON file (from `pipetrain plan`)")
    p.add_argument("--steps", type=int, default=20, help="training steps to run (total, counting resumed ones)")
    p.add_argument("--run-dir", default="runs/run", help="directory for telemetry, checkpoints and result.json")
    p.add_argument("--dataset", default="synthetic", help="synthetic | stdlib-text | PATH.npy (1-D token ids)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (default: 1e-3 AdamW, 0.05 SGD)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="write a sharded (DCP) checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR's newest checkpoint that verifies (also under another plan of the same model and global batch)")
    p.add_argument("--timeout", type=float, default=60.0, dest="timeout_s", help="seconds any distributed wait may take")
    p.add_argument("--progress-timeout", type=float, default=60.0, dest="progress_timeout_s",
                   help="seconds a rank may make no progress before the run is ended as hung (exit 2)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the workers up to N times after a rank fails; they resume from the newest checkpoint")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the run: run the same command on each (with --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                   help="multi-node: the rendezvous address, an address of one node (that node hosts it); the same on every node")
    p.add_argument("--rdzv-id", default="pipetrain", help="multi-node: the run's name in the rendezvous, the same on every node")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--no-telemetry", action="store_false", dest="telemetry", help="skip per-action events")
    p.add_argument("--save-final", action="store_true", help="write final per-rank weights to RUN_DIR/final/")


def config_from_args(a: argparse.Namespace) -> RunConfig:
    return RunConfig(plan_path=a.plan, run_dir=a.run_dir, steps=a.steps, dataset=a.dataset, lr=a.lr,
                     weight_decay=a.weight_decay, momentum=a.momentum, clip_norm=a.clip_norm,
                     checkpoint_every=a.checkpoint_every, resume=a.resume, timeout_s=a.timeout_s,
                     threads=a.threads, telemetry=a.telemetry, save_final=a.save_final,
                     progress_timeout_s=a.progress_timeout_s, max_restarts=a.max_restarts, nnodes=a.nnodes,
                     rdzv_endpoint=a.rdzv_endpoint, rdzv_id=a.rdzv_id)


def config_to_argv(c: RunConfig) -> list[str]:
    """The worker's command line (the launcher-only options stay with the launcher)."""
    argv = [c.plan_path, "--steps", str(c.steps), "--run-dir", c.run_dir, "--dataset", c.dataset,
            "--lr", repr(c.lr), "--weight-decay", repr(c.weight_decay), "--momentum", repr(c.momentum),
            "--clip-norm", repr(c.clip_norm), "--checkpoint-every", str(c.checkpoint_every),
            "--timeout", repr(c.timeout_s), "--threads", str(c.threads),
            "--progress-timeout", repr(c.progress_timeout_s)]
    if c.resume:
        argv.append("--resume")
    if not c.telemetry:
        argv.append("--no-telemetry")
    if c.save_final:
        argv.append("--save-final")
    return argv
