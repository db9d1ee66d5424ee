"""Two "nodes" on one machine: two Linux network namespaces joined by a veth pair.

Node 0 is ``10.213.0.1`` and node 1 ``10.213.0.2`` (a /24 that exists only inside the two
namespaces this harness creates, so its traffic goes only between them, or to their own loopback).
Processes started with :meth:`TwoNodes.popen` run in a node's namespace (``ip netns exec``) and in
their own process group; the filesystem and pids are shared, as on nodes with a shared run directory.

* :meth:`TwoNodes.shape`: ``tc qdisc ... tbf`` on both veth ends (tbf shapes egress only, so both
  directions need one); :meth:`TwoNodes.unshape` removes it. No added delay: the ``netem`` qdisc
  is not available on these machines (``tc`` answers "Specified qdisc kind is unknown"), so the
  links keep the veth's own latency.
* :meth:`TwoNodes.cut`: ``ip link set ... down`` on node 1's end (the link is down both ways).
* :meth:`TwoNodes.close` kills every process group it started, then deletes both namespaces
  (which deletes the veth pair). The ``two_nodes`` fixture calls it as a finalizer, so it
  runs when a test fails too.

* :func:`probe_link`: ``pipetrain calibrate --inter-node-rank`` on both nodes (:func:`pipetrain.calibration.commprobe.probe_p2p_node`)
  run across the two nodes (one end in each namespace); :func:`launch_cmd` and :func:`run_two`
  run a plan with one launcher per node (``--nnodes 2``); :func:`two_node_topology` is the
  topology the simulator needs for such a run: one CPU rank per node, the measured link between;
  :func:`predict_step_s` simulates a plan on it.

Where namespaces cannot be created (not root, no ``ip``), :func:`unavailable_reason` says why: the
``two_nodes`` fixture (tests/conftest.py) skips with it, ``benchmarks/throttled_link.py`` exits 2 with it.
This module needs no pytest, so that the benchmark can import it (by path: test harnesses are not
part of the package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["IP", "TC", "NODE_ADDRS", "TwoNodes", "unavailable_reason", "probe_link", "launch_cmd", "run_two",
           "two_node_topology", "predict_step_s"]

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
        """Limit both directions to ``rate_bit_s`` bits per second with tbf. The bucket holds 2 full
        frames (3000 bytes): a larger one lets each message after an idle gap start with that many
        bytes at the veth's own speed, which the ping-pong would see as a faster link than the rate
        (tbf segments the veth's 64 KB GSO packets to fit it). ``latency 500ms`` sizes the queue at
        half a second of traffic, so TCP is slowed by the queue and never by drops (steady, no
        retransmission timeouts)."""
        for ns, dev in zip(self.ns, self.veth):
            _sh(TC, "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bit_s}bit",
                "burst", "3000", "latency", "500ms")

    def unshape(self) -> None:
        for ns, dev in zip(self.ns, self.veth):
            _sh(TC, "-n", ns, "qdisc", "del", "dev", dev, "root")

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


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be made here (None: they can be tried)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not (Path(IP).exists() and Path(TC).exists()):
        return f"needs iproute2's ip and tc ({IP}, {TC} not found)"
    return None


def probe_link(nodes: TwoNodes, *, port: int, sizes_bytes: tuple[int, ...], repeats: int, timeout_s: float = 120.0) -> Any:
    """The gloo p2p cost between the two nodes (a P2PCost), measured from node 0 (module docstring)."""
    from pipetrain.calibration.commprobe import P2PCost
    from pipetrain.serde import from_dict

    cmd = [sys.executable, "-m", "pipetrain", "calibrate", "--json", "--inter-node-master", f"{NODE_ADDRS[0]}:{port}",
           "--inter-node-sizes", ",".join(map(str, sizes_bytes)), "--repeats", str(repeats)]
    procs = [nodes.popen(i, [*cmd, "--inter-node-rank", str(i)]) for i in range(2)]
    deadline = time.time() + timeout_s
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            nodes.kill_all()
            raise RuntimeError(f"the p2p probe between the nodes did not finish in {timeout_s:.0f} s") from None
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the p2p probe between the nodes failed: {[o[-2000:] for o in outs]}")
    return from_dict(P2PCost, json.loads(outs[0].strip().splitlines()[-1]), where="probe")


def launch_cmd(plan: Path, run_dir: Path, *extra: str, nodes: int = 2, port: int = 29500) -> list[str]:
    """``pipetrain run``'s launcher for one node of a two-node run (every node runs the same command)."""
    multi = ["--nnodes", "2", "--rdzv-endpoint", f"{NODE_ADDRS[0]}:{port}"] if nodes == 2 else []
    return [sys.executable, "-m", "pipetrain.executor.launch", str(plan), "--run-dir", str(run_dir), "--dataset", "stdlib-text",
            *multi, *extra]


def run_two(nodes: TwoNodes, cmd: list[str], logs: Path, *, env: dict[str, str] | None = None,
            timeout_s: float = 120) -> list[tuple[int, str]]:
    """Both launchers to the end; their exit codes and output (logs in ``logs/node{i}.log``)."""
    procs = [nodes.popen(i, cmd, env=env, log=logs / f"node{i}.log") for i in range(2)]
    deadline = time.time() + timeout_s
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.time()))
    return [(p.returncode, (logs / f"node{i}.log").read_text()) for i, p in enumerate(procs)]


def two_node_topology(link: Any, calibration: Any = None) -> Any:
    """Two nodes of one CPU rank each, joined by ``link`` (a P2PCost: its latency and bandwidth as the
    ``inter_node`` network), with the calibration's node constants where one is given
    (:func:`pipetrain.calibration.measured.calibrated_topology`). Each node is given one core: the
    two ranks run on the machine's cores as on two single-core nodes (no co-run slowdown modelled)."""
    from pipetrain.calibration.measured import calibrated_topology
    from pipetrain.hardware import LOOPBACK, local_cpu_device_type
    from pipetrain.topology import InterNodeLink, NodeSpec, Topology

    dt = local_cpu_device_type(2)
    net = InterNodeLink(kind="ethernet", nic_bandwidth_bytes_per_s=link.bandwidth_bytes_per_s, nics_per_node=1, latency_s=link.latency_s)
    topo = Topology(name="two-namespaces", device_types={dt.name: dt}, inter_node=net,
                    nodes=tuple(NodeSpec(name=f"node{i}", device_types=(dt.name,), link=LOOPBACK, cores=1) for i in range(2)))
    return calibrated_topology(topo, calibration) if calibration is not None else topo


def predict_step_s(plan: Any, link: Any, calibration: Any = None) -> float:
    """The simulated step of ``plan`` as the executor runs it on two nodes joined by ``link``; compute
    from ``calibration``, or without one from this machine's cached block profile (as ``pipetrain run``
    compares without ``--calibration``)."""
    from pipetrain.simulator import simulate
    from pipetrain.validation.fidelity import executor_sim_input

    inp, _ = executor_sim_input(plan, calibration=calibration, topology=two_node_topology(link, calibration))
    return float(simulate(inp).step_time_s)
