"""End a launcher whose workers are gone but whose elastic agent does not return.

On a node cut off from the rendezvous host, torch's agent never sees its workers fail: its
rendezvous keep-alive thread holds the handler's lock while it retries the unreachable store, and
the agent's monitor loop waits on that lock (``num_nodes_waiting``) before it looks at the workers
again. The workers themselves end within ``--timeout`` (their gloo waits time out) and the launcher
would then wait on a dead link for minutes.

:class:`AgentGuard` watches this launcher's own worker processes (the pids in ``RUN_DIR/pids``
whose parent is this process). Once it has seen workers and every one of them has exited, and no
new ones (a restart) appear within ``grace_s``, it calls ``on_stuck``: the launcher then reports the
failure and exits, with no worker left behind.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["AgentGuard", "child_state"]


def child_state(pid: int) -> str | None:
    """``pid``'s state letter when it is a child of this process (``Z``: exited, not yet reaped), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "(comm)": state, ppid, ...
    except OSError:
        return None
    return fields[0] if int(fields[1]) == os.getpid() else None


class AgentGuard:
    """A thread from :meth:`start` to :meth:`stop` (see module docstring)."""

    def __init__(self, run_dir: str | Path, *, grace_s: float, on_stuck: Callable[[], None], poll_s: float = 0.25) -> None:
        self.pids_dir = Path(run_dir) / "pids"
        self.grace_s = grace_s
        self.on_stuck = on_stuck
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipetrain-agentguard", daemon=True)

    def start(self) -> AgentGuard:
        self._thread.start()
        return self

    def _loop(self) -> None:
        seen: set[int] = set()
        gone_for = 0.0
        while not self._stop.wait(self.poll_s):
            running = False
            for f in self.pids_dir.glob("rank*") if self.pids_dir.is_dir() else ():
                try:
                    pid = int(f.read_text())
                except (OSError, ValueError):
                    continue
                state = child_state(pid)
                if state is not None and state != "Z":
                    seen.add(pid)
                    running = True
            gone_for = 0.0 if running or not seen else gone_for + self.poll_s
            if gone_for >= self.grace_s:
                self.on_stuck()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
