"""Per-rank checkpoints, written atomically, loadable with ``torch.load(weights_only=True)``.

Layout: ``RUN_DIR/checkpoints/step_{N:08d}/rank{r}.pt`` holds that rank's stage weights
(``blocks.{i}.*`` keys, as the full model), optimizer state, torch RNG state, the step and the
plan's hash. Each file is written to a temporary name and renamed; once every rank has written
(a barrier), rank 0 atomically replaces ``RUN_DIR/checkpoints/latest.json``. ``--resume``
reads ``latest.json``, so a run killed while writing resumes from the previous complete step.
The data position needs no saving: the sample order is a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.plan import Plan

__all__ = ["checkpoint_dir", "plan_hash", "save_rank", "mark_latest", "latest_step", "load_rank"]


def plan_hash(plan: Plan) -> str:
    """The key a checkpoint is saved under: a resume loads only checkpoints of the same plan."""
    return hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _atomic_write_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_rank(run_dir: str | Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    import torch

    path = checkpoint_dir(run_dir) / f"step_{step:08d}" / f"rank{rank}.pt"
    _atomic_write_bytes(path, lambda f: torch.save(state, f))
    return path


def mark_latest(run_dir: str | Path, step: int, world_size: int) -> None:
    data = json.dumps({"step": step, "world_size": world_size}).encode()
    _atomic_write_bytes(checkpoint_dir(run_dir) / "latest.json", lambda f: f.write(data))


def latest_step(run_dir: str | Path) -> int | None:
    p = checkpoint_dir(run_dir) / "latest.json"
    if not p.is_file():
        return None
    try:
        return int(json.loads(p.read_text())["step"])
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise RunError(f"{p} is corrupt ({exc}): delete it to start over, or point --run-dir at another run") from None


def load_rank(run_dir: str | Path, rank: int, plan_hash: str) -> dict[str, Any] | None:
    """This rank's state at the latest complete checkpoint, or None if there is none."""
    import torch

    step = latest_step(run_dir)
    if step is None:
        return None
    path = checkpoint_dir(run_dir) / f"step_{step:08d}" / f"rank{rank}.pt"
    if not path.is_file():
        raise RunError(f"checkpoint {path} is missing: the run directory was written by a different world size")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("plan_hash") != plan_hash:
        raise RunError(f"checkpoint {path} was written for another plan: resume with the plan that wrote it, or use a new --run-dir")
    return state
