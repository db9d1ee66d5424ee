"""Per-rank checkpoints, written atomically, checksummed, loadable with ``torch.load(weights_only=True)``.

Layout: ``RUN_DIR/checkpoints/step_{N:08d}/rank{r}.pt`` holds that rank's stage weights
(``blocks.{i}.*`` keys, as the full model), optimizer state, torch RNG state, the step and the
plan's hash. Each file is written to a temporary name, fsynced and renamed, and its sha256 is
computed from the bytes as they are written. Once every rank has written (a barrier), rank 0
writes ``step_{N}/manifest.json`` (the step, the world size, each file's sha256) and then
atomically replaces ``RUN_DIR/checkpoints/latest.json``. The data position needs no saving: the
sample order is a pure function of (seed, step).

``--resume`` (:func:`find_checkpoint`) takes the newest checkpoint that *verifies*: its manifest
is there and every file it lists exists with that checksum. It tries ``latest.json``'s step first,
then every other step directory, newest first, and says which ones it skipped and why: a run
killed while saving (no manifest yet), a file truncated or changed afterwards (checksum), a
checkpoint of another world size. Only when none verifies does the resume fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipetrain.errors import RunError
from pipetrain.plan import Plan

__all__ = ["checkpoint_dir", "plan_hash", "save_rank", "mark_latest", "latest_step", "file_sha256", "Found", "find_checkpoint",
           "load_rank"]

MANIFEST = "manifest.json"


def plan_hash(plan: Plan) -> str:
    """The key a checkpoint is saved under: a resume loads only checkpoints of the same plan."""
    return hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}"


class _HashingWriter:
    """A binary file that hashes what goes through it (torch.save writes, seeks are not used)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _atomic_write(path: Path, data: bytes | None = None, *, save: Any = None) -> str:
    """Write ``data`` (or call ``save(file)``) to ``path`` atomically; return the content's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            if save is not None:
                save(w)
            else:
                w.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind; the previous checkpoint stays
        os_err = next((e for e in _chain(exc) if isinstance(e, OSError)), None)
        if os_err is not None:  # torch's writer re-raises a failed write as a RuntimeError: name the OS error
            raise RunError(f"could not write {path}: {os_err.strerror or os_err}; the previous checkpoint is kept: "
                           "free space on that filesystem, or point --run-dir elsewhere") from None
        raise
    return w.h.hexdigest()


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_rank(run_dir: str | Path, step: int, rank: int, state: dict[str, Any]) -> str:
    """Write this rank's state for ``step``; return the file's sha256 (for rank 0's manifest)."""
    import torch

    return _atomic_write(_step_dir(run_dir, step) / f"rank{rank}.pt", save=lambda f: torch.save(state, f))


def mark_latest(run_dir: str | Path, step: int, world_size: int, digests: dict[int, str] | None = None) -> None:
    """Rank 0, after every rank wrote ``step``: its manifest, then ``latest.json``.

    ``digests`` (rank -> sha256, as :func:`save_rank` returned them) are the checksums taken while
    writing; without them the files are hashed as they are now.
    """
    d = _step_dir(run_dir, step)
    if digests is None:
        digests = {r: file_sha256(d / f"rank{r}.pt") for r in range(world_size) if (d / f"rank{r}.pt").is_file()}
    files = {f"rank{r}.pt": digests[r] for r in sorted(digests)}
    manifest = {"step": step, "world_size": world_size, "files": files}
    _atomic_write(d / MANIFEST, json.dumps(manifest, indent=1).encode())
    _atomic_write(checkpoint_dir(run_dir) / "latest.json", json.dumps({"step": step, "world_size": world_size}).encode())


def latest_step(run_dir: str | Path) -> int | None:
    """The step ``--resume`` would start from (the newest checkpoint that verifies), or None."""
    found = find_checkpoint(run_dir)
    return None if found is None else found.step


@dataclass(frozen=True, kw_only=True)
class Found:
    """The checkpoint a resume uses, and the newer ones it skipped with the reason for each."""

    step: int
    world_size: int
    skipped: tuple[tuple[int, str], ...] = ()

    def describe_skipped(self) -> str:
        return "; ".join(f"skipped the checkpoint of step {s}: {why}" for s, why in self.skipped)


def _verify(run_dir: str | Path, step: int, world_size: int | None) -> str | None:
    """Why the checkpoint of ``step`` cannot be used (None: it verifies)."""
    d = _step_dir(run_dir, step)
    mpath = d / MANIFEST
    if not mpath.is_file():
        return "it has no manifest (the run stopped while saving it, or an older pipetrain wrote it)"
    try:
        m = json.loads(mpath.read_text())
        files = {str(k): str(v) for k, v in m["files"].items()}
        ws = int(m["world_size"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its manifest is corrupt ({type(exc).__name__})"
    if world_size is not None and ws != world_size:
        return f"it was written by {ws} ranks, this run has {world_size}"
    # every rank checks every file, so all ranks pick the same checkpoint without talking
    for name, digest in sorted(files.items()):
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if file_sha256(p) != digest:
            return f"{name} does not match its checksum (truncated or changed after it was written)"
    return None


def find_checkpoint(run_dir: str | Path, world_size: int | None = None) -> Found | None:
    """The newest checkpoint in ``run_dir`` that verifies (see module docstring); None when there is
    no checkpoint at all. Raises :class:`RunError` listing each candidate's fault when none verifies."""
    root = checkpoint_dir(run_dir)
    steps: list[int] = []
    latest = root / "latest.json"
    latest_note: tuple[int, str] | None = None
    if latest.is_file():
        try:
            steps.append(int(json.loads(latest.read_text())["step"]))
        except (ValueError, KeyError, TypeError) as exc:
            latest_note = (-1, f"latest.json is corrupt ({type(exc).__name__})")
    if root.is_dir():
        others = sorted((int(p.name[5:]) for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), reverse=True)
        steps += [s for s in others if s not in steps]
    skipped: list[tuple[int, str]] = []
    for step in steps:
        why = _verify(run_dir, step, world_size)
        if why is None:
            return Found(step=step, world_size=world_size or 0, skipped=tuple(skipped))
        skipped.append((step, why))
    if not skipped:
        if latest_note is not None:
            raise RunError(f"{latest} is corrupt and no checkpoint directory is left: delete it to start over")
        return None
    raise RunError(f"no checkpoint in {root} verifies: " + "; ".join(f"step {s}: {why}" for s, why in skipped)
                   + ": start without --resume, or use another --run-dir")


def load_rank(run_dir: str | Path, rank: int, plan_hash: str, world_size: int | None = None) -> tuple[dict[str, Any], Found] | None:
    """This rank's state at the newest checkpoint that verifies, and what was skipped; None if there is none."""
    import torch

    found = find_checkpoint(run_dir, world_size)
    if found is None:
        return None
    path = _step_dir(run_dir, found.step) / f"rank{rank}.pt"
    if not path.is_file():
        raise RunError(f"checkpoint {path} is missing: the run directory was written by a different world size")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("plan_hash") != plan_hash:
        raise RunError(f"checkpoint {path} was written for another plan: resume with the plan that wrote it, or use a new --run-dir")
    return state, found
