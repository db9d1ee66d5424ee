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


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan JSON file (from `pipetrain plan`)")
    p.add_argument("--steps", type=int, default=20, help="training steps to run (total, counting resumed ones)")
    p.add_argument("--run-dir", default="runs/run", help="directory for telemetry, checkpoints and result.json")
    p.add_argument("--dataset", default="synthetic", help="synthetic | stdlib-text | PATH.npy (1-D token ids)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (default: 1e-3 AdamW, 0.05 SGD)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="write per-stage checkpoints every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint")
    p.add_argument("--timeout", type=float, default=60.0, dest="timeout_s", help="seconds any distributed wait may take")
    p.add_argument("--progress-timeout", type=float, default=60.0, dest="progress_timeout_s",
                   help="seconds a rank may make no progress before the run is ended as hung (exit 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--no-telemetry", action="store_false", dest="telemetry", help="skip per-action events")
    p.add_argument("--save-final", action="store_true", help="write final per-rank weights to RUN_DIR/final/")


def config_from_args(a: argparse.Namespace) -> RunConfig:
    return RunConfig(plan_path=a.plan, run_dir=a.run_dir, steps=a.steps, dataset=a.dataset, lr=a.lr,
                     weight_decay=a.weight_decay, momentum=a.momentum, clip_norm=a.clip_norm,
                     checkpoint_every=a.checkpoint_every, resume=a.resume, timeout_s=a.timeout_s,
                     threads=a.threads, telemetry=a.telemetry, save_final=a.save_final,
                     progress_timeout_s=a.progress_timeout_s)


def config_to_argv(c: RunConfig) -> list[str]:
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
