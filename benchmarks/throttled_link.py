"""A throttled inter-node link: the measured slowdown of a two-node pipeline against the calibrated simulator's.

Two "nodes" are two network namespaces joined by a veth (tests/netns.py; needs root). tiny-gpt
runs as a 2-stage 1F1B pipeline, one rank per node, so every activation and its gradient cross the
veth. Then:

1. the compute cost model: ``pipetrain calibrate --topology local-cpu:2 --no-probe`` of the run's shape (or
   ``--calibration FILE``), the same calibration ``pipetrain run --calibration`` compares with;
2. the link: the gloo ping-pong of :func:`pipetrain.calibration.commprobe.probe_p2p_node`, one end
   in each namespace, with the veth as it is and with tbf shaping both directions to ``--rate-mbit``;
   the fitted bandwidth of the shaped link against the tbf rate checks that the shaping is real (the
   ping-pong's large messages are transfers of known size);
3. ``--rounds`` alternating rounds (the order flips every round, so a drift of the machine hits
   both alike) of one unthrottled and one throttled run of ``--steps`` steps each;
4. the simulator, given the measured link as the topology's ``inter_node`` network
   (tests/netns.py's ``two_node_topology``, ``predict_step_s``) and the calibrated compute, predicts both step times.

It prints, as ratios measured in this one run: the measured slowdown (median over the rounds of the
throttled median step / the median of the unthrottled), the predicted slowdown (simulated throttled
step / simulated unthrottled step), the prediction's error, and the run-to-run spread of the
measurement: each round's own slowdown against the median of the other rounds' (the machine moves
that much between rounds, so a prediction cannot be expected to beat it). Writes
``OUT/throttled_link.json``; ``--json`` prints it.

    sudo .venv/bin/python benchmarks/throttled_link.py [--rate-mbit 40] [--rounds 4] [--steps 12] [--out runs/throttled_link]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the namespace harness: test code, not the package's

from netns import TwoNodes, launch_cmd, predict_step_s, probe_link, run_two, unavailable_reason  # noqa: E402

MODEL = "tiny-gpt"
UNSHAPED_SIZES = (4, 4096, 65536, 1 << 20, 4 << 20)
# the shaped link at 40 Mbit/s moves 5 MB/s: messages up to 1 MiB keep the probe to seconds
SHAPED_SIZES = (4, 65536, 262144, 1 << 20)


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def spread(values: list[float]) -> list[float]:
    """Each value's |value - median of the others| / that median."""
    out = []
    for i, v in enumerate(values):
        others = statistics.median(values[:i] + values[i + 1:])
        out.append(abs(v - others) / others)
    return out


def _calibration(a: argparse.Namespace, out: Path) -> Any:
    from pipetrain.calibration.measured import load_calibration

    if a.calibration:
        return load_calibration(a.calibration)
    path = out / "calibration.json"
    # --no-probe: the loopback link and the wake-up of ranks sharing a node's cores are not used on two
    # one-rank nodes; the link between the nodes is probed across the namespaces below
    cmd = [sys.executable, "-m", "pipetrain", "calibrate", "--topology", "local-cpu:2", "--model", MODEL, "--microbatch-sizes",
           str(a.mbs), "--seq-len", str(a.seq_len), "--no-probe", "-o", str(path)]
    print(f"calibrating: {' '.join(cmd[1:])}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pipetrain calibrate failed: {r.stderr[-2000:]}")
    return load_calibration(path)


def _run(nodes: TwoNodes, plan_path: Path, run_dir: Path, steps: int, port: int, plan: Any) -> float:
    from pipetrain.validation.measure import measure_run

    run_dir.mkdir(parents=True)
    out = run_two(nodes, launch_cmd(plan_path, run_dir / "run", "--steps", str(steps), "--timeout", "60", port=port), run_dir,
                  timeout_s=300)
    for code, log in out:
        if code != 0:
            raise RuntimeError(f"a two-node run failed (exit {code}):\n{log[-3000:]}")
    return float(measure_run(run_dir / "run", plan, warmup_steps=1).step_time_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate-mbit", type=float, default=40.0, help="tbf rate of the throttled link, Mbit/s (default 40)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of one unthrottled and one throttled run (default 4)")
    ap.add_argument("--steps", type=int, default=12, help="training steps per run; the first is left out (default 12)")
    ap.add_argument("--m", type=int, default=4, help="micro-batches per step (default 4)")
    ap.add_argument("--mbs", type=int, default=8, help="micro-batch size (default 8)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128: 256 KiB cross the cut per micro-batch)")
    ap.add_argument("--calibration", default="", metavar="FILE", help="a calibration of this shape (default: run pipetrain calibrate)")
    ap.add_argument("--out", default="runs/throttled_link", help="where the runs go (emptied first)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    why = unavailable_reason()
    if why:
        print(f"error: {why} (run as root: two network namespaces joined by a veth)", file=sys.stderr)
        return 2
    if a.rounds < 3 or a.steps < 3 or not a.rate_mbit > 0:
        print("error: --rounds must be >= 3 (the spread compares each round with the median of the others), --steps >= 3, "
              "--rate-mbit > 0", file=sys.stderr)
        return 2
    from pipetrain.executor.plans import simple_plan

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = " ".join(shlex.quote(x) for x in [Path(sys.executable).name, "benchmarks/throttled_link.py",
                                              *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {cmd}", flush=True)
    t_start = time.perf_counter()
    cal = _calibration(a, out)
    plan = simple_plan(MODEL, pp=2, m=a.m, mbs=a.mbs, seq_len=a.seq_len)
    plan_path = out / "plan.json"
    plan.save(plan_path)
    act = plan.stages[0].outputs[0]
    act_bytes = math.prod(act.shape) * {"torch.float32": 4, "float32": 4}.get(act.dtype, 2)
    rate_bit_s = int(a.rate_mbit * 1e6)
    nodes = TwoNodes()
    rows: list[dict[str, Any]] = []
    try:
        nodes.open()
        port = 29500
        link_free = probe_link(nodes, port=port, sizes_bytes=UNSHAPED_SIZES, repeats=20)
        nodes.shape(rate_bit_s)
        link_shaped = probe_link(nodes, port=port + 1, sizes_bytes=SHAPED_SIZES, repeats=5)
        nodes.unshape()
        print(f"link, veth as it is: {link_free.bandwidth_bytes_per_s / 1e6:.1f} MB/s, latency {link_free.latency_s * 1e6:.0f} us", flush=True)
        print(f"link, tbf {a.rate_mbit:g} Mbit/s ({rate_bit_s / 8e6:.3f} MB/s): {link_shaped.bandwidth_bytes_per_s / 1e6:.3f} MB/s "
              f"({link_shaped.bandwidth_bytes_per_s * 8 / rate_bit_s:.3f} of the rate), latency {link_shaped.latency_s * 1e6:.0f} us; "
              f"{SHAPED_SIZES[-1]} B one way {link_shaped.one_way_s[-1] * 1e3:.1f} ms (at the rate: "
              f"{SHAPED_SIZES[-1] * 8 / rate_bit_s * 1e3:.1f} ms)", flush=True)
        port += 2
        for r in range(a.rounds):
            row: dict[str, Any] = {"round": r}
            for throttled in ((False, True) if r % 2 == 0 else (True, False)):
                if throttled:
                    nodes.shape(rate_bit_s)
                key = "throttled" if throttled else "unthrottled"
                row[f"{key}_step_s"] = _run(nodes, plan_path, out / f"round{r}_{key}", a.steps, port, plan)
                port += 1
                if throttled:
                    nodes.unshape()
            row["slowdown"] = row["throttled_step_s"] / row["unthrottled_step_s"]
            rows.append(row)
            print(f"round {r}: unthrottled {row['unthrottled_step_s'] * 1e3:.1f} ms, throttled {row['throttled_step_s'] * 1e3:.1f} ms, "
                  f"slowdown {row['slowdown']:.2f}x", flush=True)
    finally:
        nodes.close()

    sim_u, sim_t = predict_step_s(plan, link_free, cal), predict_step_s(plan, link_shaped, cal)
    meas_u = statistics.median(r["unthrottled_step_s"] for r in rows)
    meas_t = statistics.median(r["throttled_step_s"] for r in rows)
    meas_slow, pred_slow = meas_t / meas_u, sim_t / sim_u
    slow_spread = spread([r["slowdown"] for r in rows])
    step_spread = {k: spread([r[f"{k}_step_s"] for r in rows]) for k in ("unthrottled", "throttled")}
    err = _rel(pred_slow, meas_slow)
    within = abs(err) <= max(slow_spread)
    summary = {"command": cmd, "model": MODEL, "pp": 2, "m": a.m, "mbs": a.mbs, "seq_len": a.seq_len, "activation_bytes": act_bytes,
               "rate_bit_s": rate_bit_s, "calibration": a.calibration or str(out / "calibration.json"),
               "link_unshaped": {"latency_s": link_free.latency_s, "bandwidth_bytes_per_s": link_free.bandwidth_bytes_per_s,
                                 "sizes_bytes": list(link_free.sizes_bytes), "one_way_s": list(link_free.one_way_s)},
               "link_shaped": {"latency_s": link_shaped.latency_s, "bandwidth_bytes_per_s": link_shaped.bandwidth_bytes_per_s,
                               "sizes_bytes": list(link_shaped.sizes_bytes), "one_way_s": list(link_shaped.one_way_s),
                               "bandwidth_over_rate": link_shaped.bandwidth_bytes_per_s * 8 / rate_bit_s},
               "rounds": rows, "measured_unthrottled_step_s": meas_u, "measured_throttled_step_s": meas_t,
               "simulated_unthrottled_step_s": sim_u, "simulated_throttled_step_s": sim_t,
               "unthrottled_step_error": _rel(sim_u, meas_u), "throttled_step_error": _rel(sim_t, meas_t),
               "measured_slowdown": meas_slow, "predicted_slowdown": pred_slow, "slowdown_error": err,
               "slowdown_spread_per_round": slow_spread, "slowdown_spread_max": max(slow_spread),
               "slowdown_spread_mape": statistics.fmean(slow_spread), "step_spread_per_round": step_spread,
               "error_within_spread": within, "wall_s": time.perf_counter() - t_start}
    (out / "throttled_link.json").write_text(json.dumps(summary, indent=1) + "\n")
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print()
        print(f"{'':<12} {'measured ms':>12} {'simulated ms':>13} {'error':>8}")
        print(f"{'unthrottled':<12} {meas_u * 1e3:>12.1f} {sim_u * 1e3:>13.1f} {_rel(sim_u, meas_u) * 100:>+7.1f}%")
        print(f"{'throttled':<12} {meas_t * 1e3:>12.1f} {sim_t * 1e3:>13.1f} {_rel(sim_t, meas_t) * 100:>+7.1f}%")
        print(f"slowdown: measured {meas_slow:.2f}x, predicted {pred_slow:.2f}x, error {err * 100:+.1f}%")
        print(f"run-to-run spread of the slowdown (each round vs the median of the others): MAPE "
              f"{summary['slowdown_spread_mape'] * 100:.1f}%, max {max(slow_spread) * 100:.1f}%; of the step: unthrottled max "
              f"{max(step_spread['unthrottled']) * 100:.1f}%, throttled max {max(step_spread['throttled']) * 100:.1f}%")
        print(f"prediction error {'within' if within else 'OUTSIDE'} the spread; wall {summary['wall_s']:.0f} s")
        print(f"wrote {out / 'throttled_link.json'}")
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
