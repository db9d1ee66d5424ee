"""Two "nodes" on one machine: two Linux network namespaces joined by a veth pair.

Node 0 is ``10.213.0.1`` and node 1 ``10.213.0.2`` (a /24 that exists only inside the two
namespaces this harness creates, so its traffic goes only between them, or to their own loopback).
Processes started with :meth:`TwoNodes.popen` run in a node's namespace (``ip netns exec``) and in
their own process group; the filesystem and pids are shared, as on nodes with a shared run directory.

* :meth:`TwoNodes.shape`: ``tc qdisc ... tbf`` on both veth ends (tbf shapes egress only, so both
  directions need one). No added delay: the ``netem`` qdisc is not available on these machines
  (``tc`` answers "Specified qdisc kind is unknown"), so the links keep the veth's own latency.
* :meth:`TwoNodes.cut`: ``ip link set ... down`` on node 1's end (the link is down both ways).
* :meth:`TwoNodes.close` kills every process group it started, then deletes both namespaces
  (which deletes the veth pair). The ``two_nodes`` fixture calls it as a finalizer, so it
  runs when a test fails too.

Where namespaces cannot be created (not root, no ``ip``), the ``two_nodes`` fixture skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["IP", "TC", "NODE_ADDRS", "TwoNodes", "two_nodes_fixture"]

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
NODE_ADDRS = ("10.213.0.1", "10.213.0.2")


def _sh(*cmd: str, timeout_s: float = 10.0) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")


class TwoNodes:
    """The two namespaces and the processes started in them (see module docstring)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"  # unique per test process; interface names have at most 15 characters
        self.ns = (f"ptn{tag}a", f"ptn{tag}b")
        self.veth = (f"ptv{tag}a", f"ptv{tag}b")
        self.procs: list[subprocess.Popen[str]] = []
        self._created: list[str] = []

    def open(self) -> TwoNodes:
        for ns in self.ns:
            _sh(IP, "netns", "add", ns)
            self._created.append(ns)
        _sh(IP, "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, dev, addr in zip(self.ns, self.veth, NODE_ADDRS):
            _sh(IP, "link", "set", dev, "netns", ns)
            _sh(IP, "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh(IP, "-n", ns, "link", "set", dev, "up")
            _sh(IP, "-n", ns, "link", "set", "lo", "up")  # a fresh namespace's loopback is down
        return self

    def popen(self, node: int, cmd: list[str], *, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[str]:
        """Start ``cmd`` in ``node``'s namespace, in a new process group; output to ``log`` (or a pipe)."""
        out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([IP, "netns", "exec", self.ns[node], *cmd], stdout=out, stderr=subprocess.STDOUT, text=True,
                             env=env, start_new_session=True)
        if log is not None:
            out.close()  # type: ignore[union-attr]
        self.procs.append(p)
        return p

    def shape(self, rate_bit_s: int) -> None:
        """Limit both directions to ``rate_bit_s`` bits per second (tbf; a burst of 2 full frames)."""
        for ns, dev in zip(self.ns, self.veth):
            _sh(TC, "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bit_s}bit",
                "burst", "3000", "latency", "500ms")

    def cut(self) -> None:
        _sh(IP, "-n", self.ns[1], "link", "set", self.veth[1], "down")

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.kill_all()
        for ns in self._created:
            for _ in range(3):  # a namespace still held by a dying process can refuse once; bounded
                r = subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=10)
                if r.returncode == 0:
                    break
                time.sleep(0.5)
        self._created.clear()


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not (Path(IP).exists() and Path(TC).exists()):
        return f"needs iproute2's ip and tc ({IP}, {TC} not found)"
    return None


@pytest.fixture(name="two_nodes")
def two_nodes_fixture() -> Iterator[TwoNodes]:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    nodes = TwoNodes()
    try:
        nodes.open()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        nodes.close()
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield nodes
    finally:
        nodes.close()
