"""The executor issues exactly the lowered program's communication, on real gloo ranks.

For every runnable schedule at p = 2 and p = 4, each rank runs one step of the plan with
pipetrain's Trainer and telemetry records the communication as issued (receive posts, receive
waits, send posts). It must equal :meth:`pipetrain.program.Program.comm_order` for that rank.
One process group per p serves all schedules (a launch costs more than a step).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

from pipetrain.executor.launch import free_port  # noqa: E402
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402
from pipetrain.program import POST, RUNNABLE_SCHEDULES, lower, lower_schedule  # noqa: E402
from pipetrain.schedules import make_schedule  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL, M, MBS = "resmlp", 4, 2
#: (schedule, chunks): interleaved with two virtual stages per rank (resmlp has 9 blocks: p=4 x 2 fits)
CASES = [(s, 2 if s == "interleaved" else 1) for s in RUNNABLE_SCHEDULES]


def _m(sched: str, p: int) -> int:
    return 2 * p if sched == "dualpipev" else M  # DualPipeV needs m >= 2p (torch's rule)

WORKER = textwrap.dedent('''
    import datetime, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.stage import build_meta, load_spec
    from pipetrain.executor.trainer import Trainer
    from pipetrain.plan import Plan
    spec = load_spec(sys.argv[1])
    for path in sys.argv[2:]:
        plan = Plan.load(path)
        run_dir = Path(path).parent / "run"
        cfg = RunConfig(plan_path=path, run_dir=str(run_dir), steps=1, timeout_s=60)
        trainer = Trainer(cfg, plan, spec, build_meta(spec), torch.device("cpu"), timeout, rank, run_dir)
        trainer.train_step(0)
        trainer.telemetry.close()
        dist.barrier()
    dist.destroy_process_group()
''')


def _launch(p: int, plans: list[Path], tmp: Path) -> None:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for r in range(p):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(p), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), MODEL, *map(str, plans)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [pr.communicate(timeout=180)[0] for pr in procs]
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    for r, (pr, out) in enumerate(zip(procs, outs)):
        assert pr.returncode == 0, f"rank {r}:\n{out[-3000:]}"


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], dict[int, list[str]]]:
    """(p, schedule) -> rank -> the communication telemetry recorded in the first step."""
    out: dict[tuple[int, str], dict[int, list[str]]] = {}
    for p in (2, 4):
        base = tmp_path_factory.mktemp(f"p{p}")
        paths = []
        for sched, chunks in CASES:
            plan = simple_plan(MODEL, pp=p, m=_m(sched, p), mbs=MBS, seq_len=1, schedule=sched, chunks=chunks)
            path = base / sched / "plan.json"
            plan.save(path)
            paths.append(path)
        _launch(p, paths, base)
        for (sched, _), path in zip(CASES, paths):
            recs = read_telemetry(path.parent / "run")
            out[(p, sched)] = {r: next(x["comm_order"] for x in rs if x.get("type") == "step") for r, rs in recs.items()}
    return out


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("sched,chunks", CASES, ids=[s for s, _ in CASES])
def test_executor_issues_the_lowered_communication(issued: dict, p: int, sched: str, chunks: int) -> None:
    plan = simple_plan(MODEL, pp=p, m=_m(sched, p), mbs=MBS, seq_len=1, schedule=sched, chunks=chunks)
    prog = lower(plan)
    got = issued[(p, sched)]
    assert sorted(got) == list(range(p))
    for r in range(p):
        want = list(prog.comm_order(r))
        assert got[r] == want, f"rank {r}: executor issued\n{got[r]}\nlowered\n{want}"
        # the three orders the issue names, each checked on its own as well
        for pick in (lambda x: x.startswith("post:"), lambda x: "RECV" in x and not x.startswith("post:"), lambda x: "SEND" in x):
            assert [x for x in got[r] if pick(x)] == [x for x in want if pick(x)]
    # every receive is posted before it is waited on, and each message is both sent and received once
    sends = sum(1 for r in range(p) for x in got[r] if "SEND" in x)
    waits = sum(1 for r in range(p) for x in got[r] if "RECV" in x and not x.startswith("post:"))
    cuts = sum(1 for s in range(prog.schedule.num_stages - 1) if prog.schedule.stage_to_rank[s] != prog.schedule.stage_to_rank[s + 1])
    assert sends == waits == 2 * _m(sched, p) * cuts


def test_prefetch_posts_as_the_pools_allow() -> None:
    """Pure: with one buffer per stage a receive is posted only after the previous micro-batch's B
    (or W) gave the slot back; with enough buffers every receive is posted at the start."""
    one = lower_schedule(make_schedule("gpipe", 2, 2, buffers=[2, 2]), [2, 2])
    assert [str(op) for op in one.rank_ops(1)][:2] == ["post:1RECV_F0", "post:1RECV_F1"]
    tight = lower_schedule(make_schedule("1f1b", 2, 3, buffers=[1, 1]), [1, 1])
    ops = [str(op) for op in tight.rank_ops(1)]
    # stage 1 has one input slot: micro-batch k+1's receive is posted right after 1B{k}
    assert ops[:3] == ["post:1RECV_F0", "1RECV_F0", "1F0"]
    assert ops.index("post:1RECV_F1") == ops.index("1B0") + 1
    assert ops.index("post:1RECV_F2") == ops.index("1B1") + 1
    # split backward: the slot comes back at W, and the pool has room for the micro-batches waiting for W
    zb = lower_schedule(make_schedule("zb-h1", 2, 4), [1, 1])
    assert zb.act_slots[1] > 1
    assert all(op.verb == POST or op.action.is_compute or op.action.kind in ("SEND_F", "SEND_B", "RECV_F", "RECV_B")
               for op in zb.rank_ops(0))
