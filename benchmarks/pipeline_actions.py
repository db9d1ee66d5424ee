"""The same blocks timed three ways in one process, as ratios: profiled, in a one-rank executor run, in a two-rank pipeline.

For ``--cycles`` cycles (default 2), each of:

* a fresh profile of the pipeline's two stages and of the whole model (forward and backward, medians,
  :func:`pipetrain.calibration.profile.profile_shapes`);
* the executor on one rank (pp=1, m micro-batches): its F and B spans over the whole model's profile;
* the executor on two ranks (pp=2, 1F1B, m micro-batches, the demo's split): each rank's F and B
  spans over its stage's profile, by the gap before the action (``hot``: under 0.1 ms after the
  rank's previous action; ``mid``: 0.1-1 ms; ``wait``: 1 ms or more, the simulator's threshold for
  the cost of a wait) and ``+co`` where the other rank computed during more than half of it; then the
  calibration's own reading of the same run (:func:`pipetrain.calibration.overhead.pipeline_action_costs`,
  :func:`~pipetrain.calibration.overhead.pipeline_message_latency`).

A cycle's three measurements are seconds apart, so a drift of the machine's speed moves all three;
the load average is printed with each. Defaults are the demo's job (tiny-gpt, micro-batch 1, seq 32, m=8).

    .venv/bin/python benchmarks/pipeline_actions.py [--cycles 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _run(plan: Any, steps: int) -> tuple[dict[int, list[dict[str, Any]]], float]:
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.telemetry import read_telemetry

    with tempfile.TemporaryDirectory(prefix="pipetrain-actions-") as tmp:
        path = plan.save(Path(tmp) / "plan.json")
        res = launch(RunConfig(plan_path=str(path), run_dir=str(Path(tmp) / "run"), steps=steps, threads=1, timeout_s=120.0))
        return read_telemetry(Path(tmp) / "run"), statistics.median(res.step_times_s[3:])


def _classes(recs: dict[int, list[dict[str, Any]]], rank: int, warmup: int) -> dict[tuple[str, str], list[float]]:
    """Spans of ``rank``'s F and B actions by gap class (module docstring)."""
    from pipetrain.calibration.overhead import HOT_GAP_S, WAIT_GAP_S

    others = [(e["start_s"], e["end_s"]) for q, rs in recs.items() if q != rank for e in rs
              if e["type"] == "event" and e["kind"] in ("F", "B", "W")]
    seq = sorted((e for e in recs[rank] if e["type"] == "event" and e["kind"] in ("F", "B", "W", "OPT")), key=lambda e: e["start_s"])
    out: dict[tuple[str, str], list[float]] = {}
    prev = None
    for e in seq:
        before, prev = prev, e
        if e["kind"] not in ("F", "B") or e["step"] < warmup or before is None or before["step"] != e["step"]:
            continue
        span = e["end_s"] - e["start_s"]
        gap = e["start_s"] - before["end_s"]
        ov = sum(max(0.0, min(e["end_s"], b) - max(e["start_s"], a)) for a, b in others) / span
        cls = ("hot" if gap < HOT_GAP_S else "wait" if gap >= WAIT_GAP_S else "mid") + ("+co" if ov > 0.5 else "")
        out.setdefault((e["kind"], cls), []).append(span)
        out.setdefault((e["kind"], "all"), []).append(span)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default="tiny-gpt")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    a = ap.parse_args(argv)

    from pipetrain.calibration.overhead import pipeline_action_costs, pipeline_message_latency
    from pipetrain.calibration.profile import profile_shapes
    from pipetrain.executor.plans import simple_plan

    warmup = 3
    two = simple_plan(a.model, pp=2, m=a.microbatches, mbs=1, seq_len=a.seq_len)
    one = simple_plan(a.model, pp=1, m=a.microbatches, mbs=1, seq_len=a.seq_len)
    ranges = [(st.block_start, st.block_end) for st in two.stages]
    n = two.stages[-1].block_end
    print(f"command: python benchmarks/pipeline_actions.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    for c in range(a.cycles):
        print(f"cycle {c}: load average {os.getloadavg()[0]:.2f}", flush=True)
        profs, prof = profile_shapes(a.model, [(1, a.seq_len)], stages=[*ranges, (0, n)], threads=1, warmup=2, repeats=15)
        print("  profile F/B ms: " + ", ".join(f"blocks {r[0]}-{r[1] - 1}: {f * 1e3:.3f}/{b * 1e3:.3f}"
                                             for r, (f, b) in zip([*ranges, (0, n)], prof)), flush=True)
        recs1, step1 = _run(one, a.steps)
        cl = _classes(recs1, 0, warmup)
        f1, b1 = _median(cl.get(("F", "all"), [])), _median(cl.get(("B", "all"), []))
        print(f"  one rank: step {step1 * 1e3:.2f} ms; F x{f1 / prof[-1][0]:.2f}, B x{b1 / prof[-1][1]:.2f} the whole model's profile",
              flush=True)
        recs2, step2 = _run(two, a.steps)
        print(f"  two ranks: step {step2 * 1e3:.2f} ms, load average {os.getloadavg()[0]:.2f}", flush=True)
        for r in range(len(two.stages)):
            cl = _classes(recs2, r, warmup)
            for k, i in (("F", 0), ("B", 1)):
                base = prof[r][i]
                parts = [f"{cls} n={len(v)} x{_median(v) / base:.2f}" for (kk, cls), v in sorted(cl.items()) if kk == k]
                print(f"    rank {r} {k} (profile {base * 1e3:.3f} ms): " + ", ".join(parts), flush=True)
        profiled = {(st.index, kind): sum(b.fwd_s if kind == "F" else b.bwd_s for b in profs[0].blocks[st.block_start:st.block_end])
                    for st in two.stages for kind in ("F", "B")}
        got = pipeline_action_costs(recs2, profiled, warmup=warmup)
        lat, nlat = pipeline_message_latency(recs2, warmup=warmup)
        if got is not None:
            print(f"  as the calibration reads it (over the per-block profile): back to back x{got.hot_ratio:.2f} "
                  f"({got.hot_actions}), +{got.resume_s * 1e3:.3f} ms after a wait ({got.waited_actions}), speed "
                  f"{got.corun_speed:.2f} with both computing ({got.corun_actions}); {lat * 1e6:.0f} us to a blocked receiver "
                  f"({nlat} messages)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
