"""A throttled inter-node link: the simulator, given the measured link, predicts the throttled two-node step.

The short version of ``benchmarks/throttled_link.py`` (the full measurement, several alternating
rounds against the calibrated simulator, is there; figures in benchmarks/RESULTS.md). tiny-gpt,
2-stage 1F1B, one rank per network-namespace node (tests/netns.py), 256 KiB of activation
crossing the veth per micro-batch each way; tbf at 40 Mbit/s on both ends.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from netns import TwoNodes, launch_cmd, predict_step_s, probe_link, run_two  # noqa: E402 - the two_nodes fixture is tests/conftest.py's
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.validation.measure import measure_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RATE_BIT_S = 40_000_000
STEPS = 6  # the first is left out as warm-up; 5 throttled steps of ~0.3 s
PLAN = simple_plan("tiny-gpt", pp=2, m=4, mbs=8, seq_len=128)


def _step_s(nodes: TwoNodes, plan_path: Path, tmp: Path, name: str, port: int) -> float:
    """The measured median step of a two-node run of PLAN (the first step left out)."""
    d = tmp / name
    d.mkdir()
    for code, log in run_two(nodes, launch_cmd(plan_path, d / "run", "--steps", str(STEPS), "--timeout", "30", port=port), d, timeout_s=90):
        assert code == 0, log[-3000:]
    return float(measure_run(d / "run", PLAN, warmup_steps=1).step_time_s)


def test_simulator_predicts_the_throttled_step_from_the_measured_link(two_nodes: TwoNodes, tmp_path: Path) -> None:
    """Shaped to 40 Mbit/s, the probe's fitted bandwidth is the tbf rate (the shaping is real and
    steady), the step is at least twice the unthrottled one (the transfer dominates), and the
    simulator's step with the measured link is within 40% of the measured median.

    Why 40%: each micro-batch's 256 KiB takes ~55 ms on the wire each way, and the simulator takes
    the wire time from the measured link. What it gets wrong here, all making it fast: the compute,
    from the cached block profile (no calibration in a 30 s test; the unthrottled step it predicts
    is ~40% short on this machine), the tied embedding's all-reduce over the link (not simulated),
    and the ACKs of one direction queued behind the other direction's data in tbf (gloo carries both
    directions on one TCP connection). Together -14% to -29% in the runs made to write this test (the machine busy);
    the benchmark with a calibration: -14% (benchmarks/RESULTS.md). A simulator given the veth's
    unshaped figures instead of the measured link predicts the unthrottled step, about -80%."""
    plan_path = tmp_path / "plan.json"
    PLAN.save(plan_path)
    t0 = time.time()
    two_nodes.shape(RATE_BIT_S)
    link = probe_link(two_nodes, port=29600, sizes_bytes=(4, 65536, 262144), repeats=3)
    # The shaping, from the two largest messages (their difference leaves the latency out): tbf
    # counts wire bytes, headers too, so the payload rate is a few percent under the tbf rate.
    (s1, s2), (t1, t2) = link.sizes_bytes[-2:], link.one_way_s[-2:]
    assert 0.85 <= (s2 - s1) / (t2 - t1) * 8 / RATE_BIT_S <= 1.02, link
    # The Hockney fit weighs every size's relative error alike, so a small message slowed on the busy
    # machine tilts its slope above the rate (the shaping check above is the strict one).
    assert 0.85 <= link.bandwidth_bytes_per_s * 8 / RATE_BIT_S <= 1.15, link
    throttled = _step_s(two_nodes, plan_path, tmp_path, "throttled", 29601)
    two_nodes.unshape()
    unthrottled = _step_s(two_nodes, plan_path, tmp_path, "unthrottled", 29602)
    predicted = predict_step_s(PLAN, link)
    print(f"\nthrottled link ({RATE_BIT_S / 1e6:.0f} Mbit/s; probe {link.bandwidth_bytes_per_s * 8 / 1e6:.1f} Mbit/s): measured "
          f"{throttled * 1e3:.1f} ms, simulated {predicted * 1e3:.1f} ms ({(predicted - throttled) / throttled * 100:+.1f}%); "
          f"unthrottled {unthrottled * 1e3:.1f} ms (slowdown {throttled / unthrottled:.1f}x); {time.time() - t0:.1f} s")
    assert throttled >= 2 * unthrottled, (throttled, unthrottled)
    assert abs(predicted - throttled) <= 0.40 * throttled, (predicted, throttled)
