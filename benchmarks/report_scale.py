"""The what-if report at real scale: ``pipetrain plan`` with ``--report DIR`` against the plan alone.

Two jobs, each planned twice in one run of this script (plain, then with ``--report``), every
command a fresh process so each pays the same imports:

* ``examples/llama2-70b-8dgx.yaml``: Llama 2 70B on 8 DGX H100 nodes (64 GPUs);
* a GPT-3-175B-shaped model on 1024 H100s (``dgx-h100:128``, global batch 1536, seq-len 2048). The
  zoo has no GPT-3 preset: the graph is the formula-built one of ``benchmarks/planner_speed.py``
  (micro-batch size 1), written to a layer-graph JSON and planned with ``--graph``.

The ratio report/plain is the figure of merit (target <= 2): the report reads the planner's files,
draws the timeline, breakdown, memory and landscape, and writes the HTML, PNGs and Chrome trace.

Run: ``.venv/bin/python benchmarks/report_scale.py [--only llama|gpt3]``
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planner_speed import gpt3_175b_graph  # noqa: E402

TARGET = 2.0


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("llama", "gpt3"), default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="report_scale_"))
    base = [sys.executable, "-m", "pipetrain", "plan"]
    cases = []
    if args.only in (None, "llama"):
        cases.append(("llama2-70b on dgx-h100:8", ["examples/llama2-70b-8dgx.yaml"]))
    if args.only in (None, "gpt3"):
        g = gpt3_175b_graph(1).save(tmp / "gpt3-175b.graph.json")
        cases.append(("gpt3-175b-shaped on dgx-h100:128", ["--graph", str(g), "--model", "gpt3-175b", "--topology", "dgx-h100:128",
                                                           "--global-batch", "1536", "--seq-len", "2048", "--max-memory", "90%"]))
    worst = 0.0
    for name, job in cases:
        plain = base + job
        report = base + job + ["--report", str(tmp / name.split()[0])]
        t_plain = _timed(plain)
        t_report = _timed(report)
        ratio = t_report / t_plain
        worst = max(worst, ratio)
        print(f"{name}:\n  {shlex.join(plain)}\n    {t_plain:.1f} s\n  {shlex.join(report)}\n    {t_report:.1f} s\n"
              f"  report/plain {ratio:.2f} (target <= {TARGET:g})")
    print(f"worst ratio {worst:.2f}: {'ok' if worst <= TARGET else 'OVER TARGET'}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
