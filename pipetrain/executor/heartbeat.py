"""Progress heartbeats: name the rank that hung, not the rank the launcher had to kill.

A rank that is stopped (SIGSTOP, a debugger) or stuck (a deadlock, a lost message with a long
timeout) does not fail: its peers block on it until their own distributed timeouts expire, and
what the launcher then reports is whichever process died first. So every worker records its
progress, and the launcher watches it:

* worker side, :class:`Heartbeat`: the training loop calls :meth:`Heartbeat.progress` with the
  step and the action it is about to run, which updates ``RUN_DIR/heartbeat/rank{r}.json`` (pid,
  step, action, when the progress last changed, when the record was last written) through a
  memory map; a daemon thread rewrites it every ``interval_s``. A stopped process writes no
  beats, a stuck one keeps writing the same progress; both age the same ``progress_at``.
* launcher side, :class:`HangWatch`: a thread that reads the beats every ``poll_s``; once some
  rank has made no progress for ``timeout_s`` (:func:`stalled_rank`: a frozen one over those
  still alive and waiting for it; before the first step, the longer start-up allowance), it writes ``RUN_DIR/failures/hang.json`` and
  kills every worker it started (on several nodes each launcher watches the same beats, in a run
  directory every node sees, and kills only its own children: a pid means nothing on another
  node), so the launcher returns at once and :func:`pipetrain.executor.launch.describe_failure`
  names the hang.

Times are wall-clock (``time.time``): the launcher and the workers of one node share the clock.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Heartbeat", "Stall", "read_beats", "stalled_rank", "HangWatch", "HANG_FILE"]

HANG_FILE = "hang.json"


def _beat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "heartbeat" / f"rank{rank}.json"


_RECORD_BYTES = 512


class Heartbeat:
    """The worker's side (see module docstring).

    The record lives in a small memory-mapped file: :meth:`progress` is a memory write (no system
    call) done before every action, and the page cache makes it visible to the launcher at once, so
    a rank stopped right after it still shows the exact step and action it stopped at.
    """

    def __init__(self, run_dir: str | Path, rank: int, *, interval_s: float = 1.0) -> None:
        import mmap

        self.path = _beat_path(Path(run_dir), rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(b" " * _RECORD_BYTES)
        self._f = open(self.path, "r+b")
        self._mm = mmap.mmap(self._f.fileno(), _RECORD_BYTES)
        self.rank = rank
        self.pid = os.getpid()
        self.interval_s = interval_s
        self._state: tuple[int, str, float] = (-1, "start", time.time())
        self._stop = threading.Event()
        self._put()
        self._thread = threading.Thread(target=self._loop, name=f"pipetrain-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def progress(self, step: int, action: str) -> None:
        """The rank is about to run ``action`` of ``step``."""
        self._state = (step, action, time.time())
        self._put()

    def _put(self) -> None:
        step, action, at = self._state
        rec = (f'{{"rank": {self.rank}, "pid": {self.pid}, "step": {step}, "action": {json.dumps(action)}, '
               f'"progress_at": {at!r}, "beat_at": {time.time()!r}}}').encode()
        # one slice assignment: a single copy under the GIL, so the main thread and the beat thread never interleave
        self._mm[:] = rec[: _RECORD_BYTES - 1].ljust(_RECORD_BYTES - 1) + b"\n"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._put()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1)
        self._mm.close()
        self._f.close()


@dataclass(frozen=True, kw_only=True)
class Stall:
    """A rank that made no progress for ``idle_s`` seconds: where it stopped."""

    rank: int
    step: int
    action: str
    idle_s: float

    def describe(self) -> str:
        where = f"step {self.step}, action {self.action}" if self.step >= 0 else f"start-up ({self.action})"
        return f"rank {self.rank} stopped making progress at {where}: no progress for {self.idle_s:.0f} s"


def read_beats(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The latest beat of every rank that wrote one (a torn or missing file is skipped)."""
    out: dict[int, dict[str, Any]] = {}
    for p in (Path(run_dir) / "heartbeat").glob("rank*.json"):
        try:
            d = json.loads(p.read_text())
            out[int(d["rank"])] = d
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def stalled_rank(beats: dict[int, dict[str, Any]], now: float, timeout_s: float, startup_timeout_s: float | None = None,
                 world_size: int | None = None) -> Stall | None:
    """The rank to blame once any rank has made no progress for ``timeout_s`` (before its first step,
    ``startup_timeout_s``: building the stages and joining the process groups take their own time,
    bounded by the distributed timeout).

    A rank whose beats stopped too (a stopped or frozen process: no beat for half the timeout) is
    the cause over ranks that still beat (alive, waiting for it). Among equals, the one that
    stopped making progress first. While a rank is still starting (no beat yet, or before its first
    step within the start-up allowance) nothing is stalled: its peers' waits are explained.
    """
    def limit(b: dict[str, Any]) -> float:
        return max(timeout_s, startup_timeout_s or 0.0) if int(b["step"]) < 0 else timeout_s

    if world_size is not None and len(beats) < world_size:
        return None
    if any(int(b["step"]) < 0 and now - float(b["progress_at"]) <= limit(b) for b in beats.values()):
        return None
    idle = [r for r, b in beats.items() if now - float(b["progress_at"]) > limit(b)]
    if not idle:
        return None
    # a frozen rank is to blame even when its own idle time is still under the limit: a peer that
    # began waiting for it just before it froze reaches the limit first
    frozen = [r for r, b in beats.items() if now - float(b["beat_at"]) > limit(b) / 2]
    r = min(frozen or idle, key=lambda k: (float(beats[k]["progress_at"]), k))
    b = beats[r]
    return Stall(rank=r, step=int(b["step"]), action=str(b["action"]), idle_s=now - float(b["progress_at"]))


def _parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])  # after "(comm)": state, ppid
    except (OSError, ValueError, IndexError):
        return None


class HangWatch:
    """The launcher's side (see module docstring): a thread from :meth:`start` to :meth:`stop`."""

    def __init__(self, run_dir: str | Path, *, timeout_s: float, startup_timeout_s: float | None = None, world_size: int | None = None,
                 poll_s: float = 0.5) -> None:
        self.run_dir = Path(run_dir)
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.poll_s = poll_s
        self.stall: Stall | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipetrain-hangwatch", daemon=True)

    def start(self) -> HangWatch:
        for p in (self.run_dir / "heartbeat").glob("rank*.json"):  # beats of an earlier run in this directory
            p.unlink(missing_ok=True)
        (self.run_dir / "failures" / HANG_FILE).unlink(missing_ok=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            beats = read_beats(self.run_dir)
            stall = stalled_rank(beats, time.time(), self.timeout_s, self.startup_timeout_s, self.world_size)
            if stall is None:
                continue
            self.stall = stall
            out = self.run_dir / "failures" / HANG_FILE
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"rank": stall.rank, "step": stall.step, "action": stall.action, "idle_s": stall.idle_s}))
            for b in beats.values():  # SIGKILL also ends a stopped process; the agent then stops and reports
                try:
                    if _parent_pid(int(b["pid"])) == os.getpid():
                        os.kill(int(b["pid"]), signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass
            return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
