"""The torch export, run by torch: ``pipetrain export --to torch`` files loaded into
``torch.distributed.pipelining``'s ``_PipelineScheduleRuntime`` on a real gloo process group.

Plans: resmlp (9 blocks: 5 | 4) on pp=2, m=4, 1F1B and ZB-H1 (whose CSV has torch's ``I`` and
``W`` actions). One launch of two torch ranks runs both CSVs (tests/export_torch_worker.py: stages
built from the exported module FQNs, torch's runtime for forward and backward); pipetrain's own
executor runs the same plans; both must equal the single-process reference within 1e-5 per step.
Then every schedule's CSV goes through torch's own loader, validator and comms lowering (no
processes), and torch's deadlock simulation where it can run the schedule.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipetrain.cli import main  # noqa: E402
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.export.common import schedule_csv  # noqa: E402
from pipetrain.schedules import make_schedule  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

SCHEDULES = ("1f1b", "zb-h1")
STEPS, M, MBS = 4, 4, 2
WORKER = Path(__file__).parent / "export_torch_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("export_torch")
    plans = {}
    for name in SCHEDULES:
        plans[name] = simple_plan("resmlp", pp=2, m=M, mbs=MBS, seq_len=1, schedule=name)
        plans[name].save(base / name / "plan.json")
        assert main(["export", str(base / name / "plan.json"), "--to", "torch", "-o", str(base / name)]) == 0
    port = _free_port()
    env = {"PYTHONPATH": str(ROOT), **{k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}}
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(port), str(STEPS), str(base / f"torch{r}.json"),
                                 *(str(base / n) for n in SCHEDULES)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for r in range(2)]
    try:
        ours = {}
        for name in SCHEDULES:  # pipetrain's executor on the same plans, while torch's ranks run
            r = subprocess.run([sys.executable, "-m", "pipetrain.executor.launch", str(base / name / "plan.json"), "--run-dir",
                                str(base / name / "run"), "--steps", str(STEPS), "--dataset", "synthetic", "--no-telemetry"],
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stderr[-3000:]
            ours[name] = list(load_result(base / name / "run").losses)
        logs = [w.communicate(timeout=180)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)[-4000:]
    theirs = json.loads((base / "torch1.json").read_text())  # rank 1 holds the last stage
    # the reference does not depend on the schedule: one for both plans
    ref = list(reference_run(plans["1f1b"], steps=STEPS, dataset="synthetic").losses)
    return {"torch": theirs, "pipetrain": ours, "reference": ref, "dir": base}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", SCHEDULES)
def test_torch_runtime_runs_the_export_as_pipetrain_does(runs: dict[str, Any], name: str) -> None:
    ref = runs["reference"]
    assert len(set(ref)) == STEPS  # the weights move: each step's loss depends on every update before it
    for side in ("torch", "pipetrain"):
        got = runs[side][name]
        assert len(got) == STEPS
        for k, (a, b) in enumerate(zip(got, ref)):
            assert abs(a - b) <= 1e-5 * abs(b), (side, name, k, got, ref)
    assert runs["torch"][name] == pytest.approx(runs["pipetrain"][name], rel=1e-5)
    assert "I" in (runs["dir"] / name / "schedule.csv").read_text() or name == "1f1b"


CSV_CASES = [("gpipe", 2, 4, 1), ("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2), ("zb-h1", 4, 8, 1), ("zbv", 4, 8, 2),
             ("dualpipev", 4, 12, 2)]


@pytest.mark.parametrize("name,p,m,v", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_every_schedule_csv_loads_in_torch(tmp_path: Path, name: str, p: int, m: int, v: int) -> None:
    """torch's ``_load_csv`` parses every row, validates it (``_validate_schedule``: every F, backward
    and W once, in order) and infers the stage placement, which must be pipetrain's; its lowering adds
    the SEND/RECV; its simulator (not for OVERLAP_F_B pairs, which it does not model) finishes."""
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime, _simulate_comms_compute

    sched = make_schedule(name, p, m, v)
    path = tmp_path / "s.csv"
    path.write_text(schedule_csv(sched))
    # the runtime reads only these attributes of its stages to load a schedule (no process group)
    stages = [SimpleNamespace(num_stages=sched.num_stages, group_size=p, group_rank=0, stage_index=s,
                              is_first=s == 0, is_last=s == sched.num_stages - 1, submod=None) for s in sched.stages_of(0)]
    rt = _PipelineScheduleRuntime(stages, n_microbatches=m)
    rt._load_csv(str(path))
    assert rt.stage_index_to_group_rank == dict(enumerate(sched.stage_to_rank))
    assert [[str(a) for a in rt.pipeline_order[r]] for r in range(p)] == sched.to_strings(compute_only=True)
    sends = sum(str(a).count("SEND_F") for acts in rt.pipeline_order_with_comms.values() for a in acts)
    assert sends == sum(1 for s in range(sched.num_stages - 1) if sched.stage_to_rank[s] != sched.stage_to_rank[s + 1]) * m
    if name != "dualpipev":
        comms = {r: [a for a in acts if a.computation_type.value not in ("UNSHARD", "RESHARD", "REDUCE_GRAD")]
                 for r, acts in rt.pipeline_order_with_comms.items()}
        done = _simulate_comms_compute(comms, lambda s: rt.stage_index_to_group_rank[s], sched.num_stages)
        assert sum(a is not None for acts in done.values() for a in acts) == sum(len(a) for a in comms.values())
