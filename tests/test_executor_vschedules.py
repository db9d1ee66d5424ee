"""ZB-V and DualPipeV on real gloo ranks against the single-process reference.

One ``pipetrain`` launch per case (p=2 on tiny-gpt, whose tied embedding and head both sit on
rank 0 in the V; p=4 on resmlp, 8 stages of its 9 blocks). DualPipeV at m = 2p and m = 3p. Losses
are compared for bit equality: each micro-batch's forward and backward run the same ops on the
same tensors as in one process (a full B on a stage with deferred linear weight gradients is its
I followed at once by its W, the same ops as the reference's backward), and gradients accumulate
over micro-batches in the same order per parameter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402
from pipetrain.planner.trace import trace_graph  # noqa: E402
from pipetrain.program import lower  # noqa: E402
from pipetrain.program.catalog import rank_peak_activation_bytes, rank_peak_in_flight  # noqa: E402
from pipetrain.schedules import make_schedule, peak_in_flight  # noqa: E402
from pipetrain.topology import resolve_topology  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

STEPS = 4
#: (model, dataset, p, m, schedule)
CASES = [("tiny-gpt", "stdlib-text", 2, 4, "zbv"), ("tiny-gpt", "stdlib-text", 2, 4, "dualpipev"),
         ("resmlp", "synthetic", 4, 8, "zbv"), ("resmlp", "synthetic", 4, 12, "dualpipev")]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("model,data,p,m,name", CASES, ids=[f"{c[4]}-p{c[2]}-m{c[3]}" for c in CASES])
def test_v_schedule_matches_single_process(tmp_path: Path, model: str, data: str, p: int, m: int, name: str) -> None:
    plan = simple_plan(model, pp=p, m=m, mbs=2, seq_len=16 if model == "tiny-gpt" else 1, schedule=name)
    assert [st.rank for st in plan.stages] == [s if s < p else 2 * p - 1 - s for s in range(2 * p)]
    plan.save(tmp_path / "plan.json")
    r = subprocess.run([sys.executable, "-m", "pipetrain.executor.launch", str(tmp_path / "plan.json"), "--run-dir",
                        str(tmp_path / "run"), "--steps", str(STEPS), "--dataset", data], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = load_result(tmp_path / "run")
    ref = reference_run(plan, steps=STEPS, dataset=data)
    assert list(res.losses) == list(ref.losses)  # bit-identical
    assert list(res.grad_norms) == pytest.approx(list(ref.grad_norms), rel=1e-6)
    # the executor's in-flight count per stage is the schedule's own (the memory model's input)
    sched = make_schedule(name, p, m)
    peaks = peak_in_flight(sched)
    tel = read_telemetry(tmp_path / "run")
    for rank, recs in tel.items():
        steps = [x for x in recs if x["type"] == "step"]
        assert steps and all(x["in_flight_peak"] == {str(s): peaks[s] for s in sched.stages_of(rank)} for x in steps)
    _check_rank_peak(tel, sched)
    # the saved bytes the executor measured (saved-tensor hooks) are the memory model's rank peak: each
    # stage's traced activation bytes per micro-batch, held from its F to its backward, replayed in the
    # rank's order (ZB-V's two stages peak at different moments: less than the sum of their peaks)
    graph = trace_graph(model, micro_batch_size=2, seq_len=plan.seq_len, dtype="fp32")
    inp = lower(plan, resolve_topology(f"local-cpu:{p}"), None, graph=graph).sim_input
    assert inp is not None
    want = rank_peak_activation_bytes(sched, [st.activation_bytes for st in inp.stages])
    for rank, recs in tel.items():
        got = max(x["memory"]["activation_bytes_peak"] for x in recs if x["type"] == "step")
        assert got == pytest.approx(want[rank], abs=64), rank  # the last stage's loss scalar is saved too


def _check_rank_peak(tel: dict[int, list[dict[str, Any]]], sched: Any) -> None:
    """Per rank, the F/B events of one step replayed: the most activations held at once is the
    schedule's :func:`rank_peak_in_flight` (an I is recorded as a B event)."""
    want = rank_peak_in_flight(sched)
    for rank, recs in tel.items():
        evs = sorted((e for e in recs if e["type"] == "event" and e["kind"] in ("F", "B") and e["step"] == 2), key=lambda e: e["start_s"])
        cur = peak = 0
        for e in evs:
            cur += 1 if e["kind"] == "F" else -1
            peak = max(peak, cur)
        assert peak == want[rank]
