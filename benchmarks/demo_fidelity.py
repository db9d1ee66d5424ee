"""How far the demo's two predictions are from what the demo measures, and how far the machine is from itself.

Runs ``pipetrain demo`` ``--runs`` times (default 5) in a row, from an empty profile cache
(``PIPETRAIN_PROFILE_CACHE`` under ``--out``): the first run calibrates this machine, as a
newcomer's first demo does, and the others must reuse that calibration (checked: the benchmark
fails otherwise). From each run's ``RUN_DIR/predictions.json`` it takes the analytic prediction
(the planner's roofline), the calibrated prediction (the plan as executed, with the calibration)
and the measured median step, and prints:

* per run: the three step times, both errors ((predicted - measured) / measured), the wall time,
  the load average before the run (other processes on the machine only ever add time);
* the median over the runs of each prediction's error against that run's measured median, and the
  error of each prediction against the median of the runs' measured medians;
* the machine's own run-to-run spread: for each run, |its measured median - the median of the
  other runs' medians| / the latter, and the mean of these (a MAPE). A prediction cannot be
  expected to beat it: the same plan on the same machine moves that much between runs;
* the first demo's wall time (calibration included) against the 3-minute target;
* the load averages (1, 5, 15 minutes) before the first run and after the last, and the
  calibration's own rows (``pipetrain calibrate``'s table: its probes beside its two-rank pipeline's
  own actions and messages).

Both predictions are deterministic for a given calibration, so across the reusing runs only the
measurement moves. Writes ``OUT/demo_fidelity.json``.

    .venv/bin/python benchmarks/demo_fidelity.py [--runs 5] [--steps 50] [--out runs/demo_fidelity]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 180.0


def _demo_cmd() -> list[str]:
    script = Path(sys.executable).parent / "pipetrain"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipetrain"]


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="demos in a row (default 5; the first calibrates)")
    ap.add_argument("--steps", type=int, default=50, help="training steps per demo (default 50, the demo's)")
    ap.add_argument("--out", default="runs/demo_fidelity", help="where the runs and the profile cache go (emptied first)")
    a = ap.parse_args(argv)
    if a.runs < 3:
        ap.error("--runs must be >= 3 (the spread compares each run with the median of the others)")
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PIPETRAIN_PROFILE_CACHE": str(out / "cache")}  # empty: the first demo calibrates
    cmd = " ".join(shlex.quote(x) for x in [Path(sys.executable).name, "benchmarks/demo_fidelity.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {cmd}", flush=True)
    load_start = os.getloadavg()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load_start)} on {os.cpu_count()} cores", flush=True)
    runs = []
    for i in range(a.runs):
        rd = out / f"run{i}"
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = subprocess.run([*_demo_cmd(), "demo", "--run-dir", str(rd), "--steps", str(a.steps)], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        (out / f"run{i}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            print(f"run {i}: demo failed (exit {r.returncode}); see {out / f'run{i}.log'}", file=sys.stderr)
            return 1
        reused = "reused the cached calibration" in r.stdout
        if reused != (i > 0):
            print(f"run {i}: expected the demo to {'reuse' if i else 'measure'} the calibration; see {out / f'run{i}.log'}", file=sys.stderr)
            return 1
        p = json.loads((rd / "predictions.json").read_text())
        by = {x["label"]: x["step_time_s"] for x in p["predictions"]}
        row = {"run": i, "calibrated_here": not reused, "wall_s": wall, "load_before": load, "measured_step_s": p["measured_step_s"],
               "analytic_step_s": by["analytic"], "calibrated_step_s": by["calibrated"]}
        runs.append(row)
        print(f"run {i}: {'calibrated' if not reused else 'reused calibration'}, wall {wall:.1f} s, load {load:.2f}: measured "
              f"{row['measured_step_s'] * 1e3:.2f} ms, analytic {row['analytic_step_s'] * 1e3:.2f} ms "
              f"({_rel(row['analytic_step_s'], row['measured_step_s']) * 100:+.1f}%), calibrated {row['calibrated_step_s'] * 1e3:.2f} ms "
              f"({_rel(row['calibrated_step_s'], row['measured_step_s']) * 100:+.1f}%)", flush=True)

    load_end = os.getloadavg()
    meas = [r["measured_step_s"] for r in runs]
    med_meas = statistics.median(meas)
    spread = [abs(m - statistics.median(meas[:i] + meas[i + 1:])) / statistics.median(meas[:i] + meas[i + 1:]) for i, m in enumerate(meas)]
    summary = {"runs": runs, "median_measured_step_s": med_meas, "spread_mape": statistics.fmean(spread), "spread_per_run": spread,
               "first_wall_s": runs[0]["wall_s"], "target_s": TARGET_S, "command": cmd, "load_before": list(load_start),
               "load_after": list(load_end)}
    print()
    print(f"{'prediction':<12} {'median error':>13} {'median |error|':>15} {'vs median measured':>19}")
    for key in ("analytic", "calibrated"):
        errs = [_rel(r[f"{key}_step_s"], r["measured_step_s"]) for r in runs]
        vs_med = _rel(statistics.median(r[f"{key}_step_s"] for r in runs), med_meas)
        summary[key] = {"median_error": statistics.median(errs), "median_abs_error": statistics.median(abs(e) for e in errs),
                        "error_vs_median_measured": vs_med, "errors": errs}
        print(f"{key:<12} {statistics.median(errs) * 100:>+12.1f}% {statistics.median(abs(e) for e in errs) * 100:>14.1f}% "
              f"{vs_med * 100:>+18.1f}%")
    print(f"measured median step over {len(runs)} runs: {med_meas * 1e3:.2f} ms (runs: {', '.join(f'{m * 1e3:.2f}' for m in meas)} ms)")
    print(f"run-to-run spread of the measured median step (each run vs the median of the others): MAPE "
          f"{summary['spread_mape'] * 100:.1f}%, max {max(spread) * 100:.1f}%")
    print(f"first demo (calibration included): {runs[0]['wall_s']:.1f} s against the {TARGET_S:.0f} s target "
          f"({'within' if runs[0]['wall_s'] <= TARGET_S else 'OVER'}); reusing demos: median "
          f"{statistics.median(r['wall_s'] for r in runs[1:]):.1f} s")
    print(f"load average before the first run {' '.join(f'{v:.2f}' for v in load_start)}, after the last "
          f"{' '.join(f'{v:.2f}' for v in load_end)} (1, 5, 15 min) on {os.cpu_count()} cores")
    from pipetrain.calibration.measured import load_calibration
    from pipetrain.calibration.run import describe

    cal_files = sorted((out / "cache").glob("calibration_*.json"))
    if cal_files:
        print("the calibration (measured by run 0):")
        for what, value in describe(load_calibration(cal_files[0])):
            print(f"  {what}: {value}")
    (out / "demo_fidelity.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'demo_fidelity.json'}")
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
