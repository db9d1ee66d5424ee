"""The probes' pieces: the Hockney fit, the loopback p2p probe's fit, the co-run probe on
oversubscribed cores, probe processes ending with their parent. The wake-up probe's own figures are
checked on the one launch of it that `pipetrain calibrate` makes (tests/test_calibrate_cli.py::test_probe_measures_the_gloo_link)."""

from __future__ import annotations

import os

import pytest

from pipetrain.calibration.commprobe import fit_hockney, probe_p2p


def test_hockney_fit_recovers_known_line() -> None:
    sizes = [4, 4096, 65536, 1 << 20]
    lat, bw = fit_hockney(sizes, [20e-6 + s / 2e9 for s in sizes])
    assert lat == pytest.approx(20e-6, rel=1e-6)
    assert bw == pytest.approx(2e9, rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gloo_loopback_probe_is_self_consistent() -> None:
    fit = probe_p2p(backend="gloo", sizes_bytes=(4, 65536, 1 << 20, 4 << 20), repeats=8)
    # loopback gloo: tens of microseconds to a few ms of latency, 0.05-50 GB/s
    assert 1e-7 < fit.latency_s < 5e-3
    assert 5e7 < fit.bandwidth_bytes_per_s < 5e10
    assert len(fit.one_way_s) == 4 and all(t > 0 for t in fit.one_way_s)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_corun_probe_sees_the_cores_shared() -> None:
    """Twice as many processes as cores, all computing: each gets at most about half a core (the
    fair share; less where they also contend for caches), and one alone is the reference."""
    import os

    from pipetrain.calibration.corun import probe_corun

    cores = os.cpu_count() or 1
    c = probe_corun("mlp-uneven", micro_batch_size=8, max_jobs=2 * cores, cores=cores, phase_s=0.4, rounds=1)
    assert c.speed[0] == 1.0 and len(c.speed) == 2 * cores and c.cores == cores
    assert 0.1 < c.speed[-1] < 0.7 and all(n > 0 for n in c.iterations)
    assert 0 < c.alone_s < 1.0 and c.seq_len >= 1


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["wakeup", "corun"])
def test_probe_children_end_when_their_parent_is_killed(which: str) -> None:
    """A calibration killed by a signal (Ctrl-C's SIGTERM to the group, a CI timeout's SIGKILL) runs no
    clean-up: the spinners of the wake-up probe and the co-run jobs notice their parent is gone and stop."""
    import signal
    import subprocess
    import sys
    import time

    spawn = {
        "wakeup": "from pipetrain.calibration.commprobe import _spin\n"
                  "stop = ctx.Event()\n"
                  "ps = [ctx.Process(target=_spin, args=(stop, os.getpid(), time.monotonic() + 600), daemon=True) for _ in range(2)]\n"
                  "for p in ps: p.start()\n",
        "corun": "from pipetrain.calibration.corun import CoRunProbe\n"
                 "probe = CoRunProbe('mlp-uneven', micro_batch_size=8, max_jobs=2, cores=2).__enter__()\n"
                 "ps = probe._procs\n"
                 "for h in probe._pipes: h.send((time.monotonic(), time.monotonic() + 600))\n",
    }[which]
    code = ("import multiprocessing, os, sys, time\nctx = multiprocessing.get_context('spawn')\n" + spawn +
            "print(' '.join(str(p.pid) for p in ps), flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(x) for x in parent.stdout.readline().split()]
        time.sleep(1.0)  # the children are computing now
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        t0 = time.monotonic()
        while any(_alive(p) for p in pids) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        left = [p for p in pids if _alive(p)]
        assert not left, f"{which}: children {left} still running {time.monotonic() - t0:.1f} s after their parent was killed"
    finally:
        parent.kill()
        for p in pids if "pids" in locals() else []:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
