"""torch's own pipeline schedules in pipetrain's simulator (pipetrain.torchsched, ``simulate --torch-schedule``).

Times in the flag-driven cases are milliseconds per micro-batch for one rank (``--t-fwd``,
``--t-bwd``, ``--t-wgrad``) and a link latency (``--t-comm``); the simulator works in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from pipetrain.cli import main
from pipetrain.errors import ConfigError, ScheduleError, TorchScheduleError
from pipetrain.program import POST, RUN, Op
from pipetrain.schedules import Action, gpipe, interleaved, one_f_one_b
from pipetrain.simulator import fast_evaluate, simulate, uniform
from pipetrain.torchsched import (
    TORCH_SCHEDULES,
    convert,
    flag_inputs,
    import_torch_schedule,
    parse_cell,
    torch_input,
    torch_orders,
)

pytest.importorskip("torch.distributed.pipelining.schedules")

MS = 1e-3


def _compute(rows: tuple[tuple[str, ...], ...]) -> list[list[str]]:
    """torch's compute rows without their REDUCE_GRAD bookkeeping (as test_schedules_vs_torch compares them)."""
    return [[a for a in row if not a.endswith("REDUCE_GRAD")] for row in rows]


def _cli_json(argv: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())


def _steps(name: str, p: int, m: int, *, chunks: int = 2, t_comm_ms: float = 0.1, t_wgrad_ms: float = 0.0,
           own: str = "1f1b") -> dict[str, float]:
    """Step times (ms) of torch's program (post, in-order; deferred in-order), its compute order and ``own``."""
    out: dict[str, float] = {}
    for defer in (False, True):
        imp = import_torch_schedule(name, p, m, chunks=chunks, defer_pp_recv=defer)
        ideal, mine = flag_inputs(imp, own, t_fwd_s=1 * MS, t_bwd_s=2 * MS, t_wgrad_s=t_wgrad_ms * MS, t_comm_s=t_comm_ms * MS,
                                  chunks=chunks if own == "interleaved" else 1)
        tag = "deferred " if defer else ""
        for mode in ("post", "in-order"):
            out[f"{tag}{mode}"] = simulate(torch_input(ideal, imp, mode)).step_time_s / MS
        out["compute only"] = simulate(ideal).step_time_s / MS
        out["own"] = simulate(mine).step_time_s / MS
    return out


# ----- the acceptance case: front-loaded receives on an NCCL stream (pytorch/pytorch#172668, #188833) -----
def test_interleaved_front_loaded_receives_bubble_and_defer_pp_recv_removes_it() -> None:
    """torch 2.13's ``_add_send_recv`` posts each RECV_F where the *sender's* forward is lowered, so in
    the warm-up rank 0 posts the receive of stage p (from rank p-1) before its own sends of stage 0;
    on an in-order stream those sends wait for that receive's data, a full trip round the pipeline."""
    t = _steps("ScheduleInterleaved1F1B", 4, 8, own="interleaved")
    print(f"\nScheduleInterleaved1F1B p=4 m=8 v=2, F 1 ms, B 2 ms per rank, link 0.1 ms: compute-only order "
          f"{t['compute only']:.4g} ms, torch's lowered program in-order {t['in-order']:.4g} ms, "
          f"with defer_pp_recv=True in-order {t['deferred in-order']:.4g} ms")
    # torch's compute order is pipetrain's interleaved order for m > p (test_schedules_vs_torch): same step
    assert t["compute only"] == pytest.approx(t["own"], rel=1e-12)
    assert t["compute only"] == pytest.approx(29.9, abs=1e-9)
    # the bubble: 8.1 ms, 27 % of the step, from the warm-up's blocked sends
    assert t["in-order"] == pytest.approx(38.0, abs=1e-9)
    assert t["in-order"] > 1.25 * t["compute only"]
    # deferral posts each receive just before its consumer: the gap is gone, exactly
    assert t["deferred in-order"] == pytest.approx(t["compute only"], rel=1e-12)
    # gloo (post): a posted receive holds nothing back, so the early posts cost nothing...
    assert t["post"] == pytest.approx(t["compute only"], rel=1e-12)
    # ...while late posts there expose the link's latency (a gloo send waits for its receive)
    assert t["deferred post"] > t["compute only"] + 1.0


@pytest.mark.parametrize("name, own", [("Schedule1F1B", "1f1b"), ("ScheduleGPipe", "gpipe")])
def test_1f1b_and_gpipe_import_equal_pipetrain_exactly(name: str, own: str) -> None:
    # no latency: every form is the closed form (m + p - 1)(F + B) = 11 x 3 ms
    t = _steps(name, 4, 8, t_comm_ms=0.0, own=own)
    for key, v in t.items():
        assert v == pytest.approx(33.0, rel=1e-12), key
    # 0.1 ms links: the compute order, and torch's deferred program on an in-order stream, equal pipetrain's exactly
    t = _steps(name, 4, 8, own=own)
    assert t["compute only"] == pytest.approx(t["own"], rel=1e-12)
    assert t["deferred in-order"] == pytest.approx(t["own"], rel=1e-12)
    assert t["in-order"] >= t["own"] - 1e-9


def test_1f1b_ir_fix_is_reported() -> None:
    # torch 2.13's Schedule1F1B IR numbers the last rank's forwards 1..m (see test_schedules_vs_torch)
    o = torch_orders("Schedule1F1B", 4, 8)
    assert o.compute[3][:2] == ("3F0", "3B0") and "3F8" not in o.compute[3]
    assert any("renumbered" in n for n in o.notes)
    assert _compute(o.compute[:3]) == one_f_one_b(4, 8).to_strings(compute_only=True)[:3]


# ----- every schedule named, through the command ---------------------------------------------------------
@pytest.mark.parametrize("name", TORCH_SCHEDULES)
def test_every_torch_schedule_simulates(name: str) -> None:
    p, m = 2, 4
    j = _cli_json(["simulate", "--torch-schedule", name, "-p", str(p), "-m", str(m), "--t-fwd", "1", "--t-bwd", "2",
                   "--t-wgrad", "1", "--t-comm", "0.1", "--recv-mode", "in-order", "--json", "-"])
    work = m * (1 + 2 + 1)  # each rank computes all its micro-batches' F, B and W: 16 ms
    for key in ("torch", "compute_only", "own"):
        assert work <= j[key]["step_time_s"] / MS < 1.5 * work, key
    assert j["own"]["step_time_s"] == pytest.approx(20.4 * MS, rel=1e-12)  # pipetrain's 1f1b, as in the test above
    assert j["dropped"]["REDUCE_GRAD"] == (p if name in ("Schedule1F1B", "ScheduleGPipe") else 2 * p)
    split = name in ("ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble", "ScheduleDualPipeV")
    stages = p if name in ("Schedule1F1B", "ScheduleGPipe") else 2 * p
    per = j["torch"]["num_compute_actions"] / (m * stages)  # F and B: 2 per micro-batch and stage; F, I and W: 3
    assert (per == 3 if name != "ScheduleDualPipeV" else 2 < per < 3) if split else per == 2


def test_command_prints_both_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--torch-schedule", "ScheduleInterleaved1F1B", "-p", "4", "-m", "8", "--chunks", "2", "--t-fwd", "1",
                 "--t-bwd", "2", "--t-comm", "0.1", "--schedule", "interleaved", "--recv-mode", "in-order"]) == 0
    out = capsys.readouterr().out
    assert "torch's program, recv in-order" in out and "its compute order" in out and "pipetrain's own" in out
    assert "│ ScheduleInterleaved1F1B │ torch's program, recv in-order │      38 │" in out
    assert "dropped from torch's program: 8 REDUCE_GRAD, 8 RESHARD, 8 UNSHARD" in out


def test_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", "tiny-gpt", "--topology", "local-cpu:2", "--global-batch", "16", "--seq-len", "64",
                 "--dtype", "fp32", "--pp", "2", "--microbatches", "8", "--schedule", "1f1b", "--no-pin-cost", "-o", str(plan)]) == 0
    capsys.readouterr()
    j = _cli_json(["simulate", "--torch-schedule", "Schedule1F1B", "--plan", str(plan), "--json", "-"])
    # the same stages and compute order: the same activations in flight; torch keeps a receive buffer per
    # micro-batch (8) where the plan gives stage 1 one, so only rank 1 holds more
    mem = j["peak_memory_bytes_per_rank"]
    assert mem["torch"] == mem["compute_only"] and min(mem["own"]) > 0
    assert mem["compute_only"][0] == mem["own"][0] and mem["compute_only"][1] > mem["own"][1]
    assert j["compute_only"]["peak_in_flight_per_stage"] == j["own"]["peak_in_flight_per_stage"] == [2, 1]
    # more receive buffers (torch keeps one per micro-batch) can only help the same order
    assert j["compute_only"]["step_time_s"] <= j["own"]["step_time_s"] + 1e-12
    j = _cli_json(["simulate", "--torch-schedule", "ScheduleZBVZeroBubble", "--plan", str(plan), "--json", "-"])
    assert any("re-cut into torch's 4" in n for n in j["notes"])
    assert j["torch"]["peak_memory_bytes_per_stage"] and len(j["peak_memory_bytes_per_rank"]["torch"]) == 2


# ----- CSV in torch's _load_csv format -------------------------------------------------------------------
def test_csv_compute_only_and_compute_comms(tmp_path: Path) -> None:
    o = torch_orders("ScheduleInterleaved1F1B", 4, 8, chunks=2)
    (tmp_path / "c.csv").write_text("\n".join(",".join(row) for row in o.compute) + "\n")
    (tmp_path / "cc.csv").write_text("\n".join(",".join(row) for row in o.lowered) + "\n")
    base = ["-p", "4", "-m", "8", "--t-fwd", "1", "--t-bwd", "2", "--t-comm", "0.1", "--recv-mode", "in-order", "--json", "-"]
    by_name = _cli_json(["simulate", "--torch-schedule", "ScheduleInterleaved1F1B", "--chunks", "2", *base])
    for path in (tmp_path / "c.csv", tmp_path / "cc.csv"):
        j = _cli_json(["simulate", "--torch-schedule", str(path), *base])
        assert j["torch"]["step_time_s"] == pytest.approx(by_name["torch"]["step_time_s"], rel=1e-12)
        assert j["torch"]["step_time_s"] == pytest.approx(38.0 * MS, rel=1e-12)


# ----- refusals: one line, exit 2 ------------------------------------------------------------------------
def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


FLAGS = ["-p", "2", "-m", "4", "--t-fwd", "1", "--t-bwd", "2"]


def test_untested_torch_version_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.raises(TorchScheduleError, match=r"tested with torch 2\.13 only; install torch 2\.13"):
        torch_orders("Schedule1F1B", 2, 4)
    assert "torch 2.99.0" in _error(["simulate", "--torch-schedule", "Schedule1F1B", *FLAGS], capsys)


@pytest.mark.parametrize("argv, needle", [
    (["--torch-schedule", "ScheduleDualPipeV", "-p", "4", "-m", "6", "--t-fwd", "1", "--t-bwd", "2"], "use m >= 8"),
    (["--torch-schedule", "ScheduleWarp", *FLAGS], "torch schedule 'ScheduleWarp' is unknown"),
    (["--torch-schedule", "Schedule1F1B", "--recv-mode", "fifo", *FLAGS], "--recv-mode 'fifo' is unknown"),
    (["--torch-schedule", "Schedule1F1B", "--evaluator", "fast", *FLAGS], "needs the simpy engine"),
    (["--defer-pp-recv", *FLAGS], "add --torch-schedule"),
    (["--recv-mode", "blocking", "--evaluator", "fast", *FLAGS], "needs the simpy engine"),
    (["--torch-schedule", "Schedule1F1B", "-p", "4", "-m", "2", "--t-fwd", "1", "--t-bwd", "2"], "refuses p=4, m=2"),
])
def test_refusals(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in _error(["simulate", *argv], capsys)


def test_bad_csv(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("0F0,0Q0\n")
    with pytest.raises(TorchScheduleError, match="cannot read torch action '0Q0'"):
        torch_orders(str(bad))


# ----- conversion ---------------------------------------------------------------------------------------
def test_parse_cell() -> None:
    assert parse_cell("(0F3;3B1)OVERLAP_F_B") == ("compute", (Action(stage=0, kind="F", microbatch=3), Action(stage=3, kind="B", microbatch=1)))
    assert parse_cell("1REDUCE_GRAD") == ("REDUCE_GRAD", ())
    assert parse_cell(" ") == ("idle", ())
    assert parse_cell("2RECV_B0") == ("comm", (Action(stage=2, kind="RECV_B", microbatch=0),))


def test_convert_places_posts_where_torch_issues_them() -> None:
    # rank 1 posts its receive first thing; its wait sits right before the forward that reads it
    imp = convert(name="t", num_microbatches=1, stage_to_rank=(0, 1), compute=[["0F0", "0B0"], ["1F0", "1B0"]],
                  lowered=[["0UNSHARD", "0F0", "0SEND_F0", "0RECV_B0", "0B0"], ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]])
    assert [str(op) for op in imp.ops[0]] == ["0F0", "0SEND_F0", "post:0RECV_B0", "0RECV_B0", "0B0"]
    assert [str(op) for op in imp.ops[1]] == ["post:1RECV_F0", "1RECV_F0", "1F0", "1B0", "1SEND_B0"]
    assert imp.dropped == (("UNSHARD", 1),)
    with pytest.raises(TorchScheduleError, match="before posting 1RECV_F0"):
        convert(name="t", num_microbatches=1, stage_to_rank=(0, 1), compute=[["0F0", "0B0"], ["1F0", "1B0"]],
                lowered=[["0F0", "0SEND_F0", "0RECV_B0", "0B0"], ["1F0", "1RECV_F0", "1B0", "1SEND_B0"]])


# ----- the receive modes in the simpy engine: tiny programs, exact times ---------------------------------
def _front_loaded_1f1b(prefetch_rank1: bool) -> tuple[tuple[Op, ...], ...]:
    """1F1B, p=2, m=2, with rank 0 posting its first gradient receive right after its first send."""
    run = lambda s: Op(verb=RUN, action=Action.parse(s))  # noqa: E731
    post = lambda s: Op(verb=POST, action=Action.parse(s))  # noqa: E731
    r0 = (run("0F0"), run("0SEND_F0"), post("0RECV_B0"), run("0F1"), run("0SEND_F1"), run("0RECV_B0"), run("0B0"),
          post("0RECV_B1"), run("0RECV_B1"), run("0B1"))
    head = (post("1RECV_F0"), post("1RECV_F1")) if prefetch_rank1 else (post("1RECV_F0"),)
    r1 = (*head, run("1RECV_F0"), run("1F0"), run("1B0"), run("1SEND_B0"), *(() if prefetch_rank1 else (post("1RECV_F1"),)),
          run("1RECV_F1"), run("1F1"), run("1B1"), run("1SEND_B1"))
    return r0, r1


def test_in_order_stream_holds_a_send_behind_a_posted_receive() -> None:
    """F 1 s, B 2 s, link latency 0.1 s. post: rank 0's 0SEND_F1 (at 2) waits only for rank 1's post
    (at 4.1), lands 4.2, rank 1 runs F1 4.2-5.2, B1 5.2-7.2, its gradient lands 7.3, rank 0's B1 ends
    9.3. in-order: 0SEND_F1 waits behind 0RECV_B0, whose data lands at 4.2: it lands 4.3, and
    everything after shifts by 0.1 s: 9.4."""
    sched = one_f_one_b(2, 2)
    base = uniform(2, 2, sched, t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=0.1)
    ops = _front_loaded_1f1b(prefetch_rank1=False)
    from dataclasses import replace

    post = simulate(replace(base, ops=ops)).step_time_s
    in_order = simulate(replace(base, ops=ops, recv_mode="in-order")).step_time_s
    assert post == pytest.approx(9.3, abs=1e-12)
    assert in_order == pytest.approx(9.4, abs=1e-12)
    # without ops, pipetrain's own lowering (all receives posted ahead here) agrees with the longest path, as before
    assert simulate(base).step_time_s == pytest.approx(fast_evaluate(base).step_time_s, rel=1e-12)


def test_in_order_deadlock_is_named() -> None:
    """Rank 1 pre-posts its second forward receive: on in-order streams each rank's next send waits
    behind a receive whose data the other rank's blocked send carries (an NCCL hang); gloo finishes."""
    from dataclasses import replace

    base = uniform(2, 2, one_f_one_b(2, 2), t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=0.1)
    ops = _front_loaded_1f1b(prefetch_rank1=True)
    assert simulate(replace(base, ops=ops)).step_time_s == pytest.approx(9.2, abs=1e-12)
    with pytest.raises(ScheduleError, match="cannot finish in recv_mode 'in-order'.*defer_pp_recv=True"):
        simulate(replace(base, ops=ops, recv_mode="in-order"))


def test_explicit_ops_are_checked_and_fast_refuses_in_order() -> None:
    from dataclasses import replace

    base = uniform(2, 2, one_f_one_b(2, 2), t_fwd_s=1.0, t_bwd_s=2.0)
    r0, r1 = _front_loaded_1f1b(prefetch_rank1=False)
    with pytest.raises(ConfigError, match="waited on before it is posted"):
        replace(base, ops=(tuple(op for op in r0 if op.verb != POST), r1))
    with pytest.raises(ConfigError, match="recv_mode must be one of post, in-order"):
        replace(base, recv_mode="fifo")
    with pytest.raises(ConfigError, match="use the simpy engine"):
        fast_evaluate(replace(base, recv_mode="in-order"))


def test_gpipe_and_interleaved_orders_still_match() -> None:
    # the torch-side import uses the same orders test_schedules_vs_torch checks
    assert _compute(torch_orders("ScheduleGPipe", 4, 8).compute) == gpipe(4, 8).to_strings(compute_only=True)
    assert _compute(torch_orders("ScheduleInterleaved1F1B", 4, 8, chunks=2).compute) == interleaved(4, 8, 2).to_strings(
        compute_only=True)
