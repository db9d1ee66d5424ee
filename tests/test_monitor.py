"""Live monitor aggregation on synthetic telemetry lines, the tail reader, and the plain-line mode."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from pipetrain.events import Event
from pipetrain.executor.monitor import Aggregator, LiveMonitor, TelemetryTail, format_plain
from pipetrain.plan import Plan, StagePlan
from pipetrain.timeline import match_transfers, percentile, stage_breakdown

MS = 1e-3


def _plan(pp: int = 2, m: int = 2) -> Plan:
    stages = tuple(StagePlan(index=s, block_start=s, block_end=s + 1, rank=s, device=f"cpu{s}", buffers=2,
                             predicted_peak_memory_bytes=float(4 << 20)) for s in range(pp))
    return Plan(model="tiny-gpt", graph_fingerprint="x", topology="local-cpu:2", pp=pp, dp=1, micro_batch_size=2,
                num_microbatches=m, seq_len=16, schedule="gpipe", stages=stages)


def _ev(stage: int, kind: str, mb: int, a_ms: float, b_ms: float, step: int) -> dict:
    return {"type": "event", "stage": stage, "rank": stage, "kind": kind, "microbatch": mb, "start_s": a_ms * MS,
            "end_s": b_ms * MS, "bytes": 1024 if kind in ("SEND", "RECV") else 0, "step": step}


def _step_records(step: int, base: float) -> dict[int, list[dict]]:
    """GPipe, 2 stages, 2 micro-batches; F = 2 ms, B = 4 ms; every transfer takes 1 ms on the wire."""
    b = base
    r0 = [_ev(0, "F", 0, b + 0, b + 2, step), _ev(0, "SEND", 0, b + 2, b + 3, step),
          _ev(0, "F", 1, b + 2, b + 4, step), _ev(0, "SEND", 1, b + 4, b + 5, step),
          _ev(0, "RECV", 0, b + 1, b + 12, step), _ev(0, "B", 0, b + 12, b + 16, step),
          _ev(0, "RECV", 1, b + 1, b + 16, step), _ev(0, "B", 1, b + 16, b + 20, step)]
    r1 = [_ev(1, "RECV", 0, b + 0, b + 3, step), _ev(1, "F", 0, b + 3, b + 5, step),
          _ev(1, "RECV", 1, b + 0, b + 5, step), _ev(1, "F", 1, b + 5, b + 7, step),
          _ev(1, "B", 0, b + 7, b + 11, step), _ev(1, "SEND", 0, b + 11, b + 12, step),
          _ev(1, "B", 1, b + 11, b + 15, step), _ev(1, "SEND", 1, b + 15, b + 16, step)]
    mem = {"tensor_bytes": 6 << 20}
    r0.append({"type": "step", "rank": 0, "step": step, "loss": None, "step_time_s": 0.021, "grad_norm": 1.0, "memory": mem})
    r1.append({"type": "step", "rank": 1, "step": step, "loss": 3.5 - step, "step_time_s": 0.020, "grad_norm": 1.0,
               "memory": {"tensor_bytes": (5 << 20) + step}})
    return {0: r0, 1: r1}


def test_transfers_matched_by_direction_and_latency() -> None:
    recs = _step_records(0, 0.0)
    evs = [Event.from_dict(r) for rr in recs.values() for r in rr if r["type"] == "event"]
    tr = match_transfers(evs, 2)
    assert [(t.src_stage, t.dst_stage, t.microbatch) for t in tr] == [(1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1)]
    # activations: posted at 2 and 4 ms, received at 3 and 5 ms; gradients: posted 11/15, received 12/16
    assert [round(t.latency_s / MS, 9) for t in tr] == [1.0, 1.0, 1.0, 1.0]


def test_stage_breakdown_adds_up_to_the_span() -> None:
    recs = _step_records(0, 0.0)
    evs = [Event.from_dict(r) for rr in recs.values() for r in rr if r["type"] == "event"]
    br = stage_breakdown(evs, 2, [0, 1])
    # span 0..20 ms; stage 0 computes 12 ms; idle 4..12 and 20..20: it waits on the wire during 11..12 only
    assert br[0].span_s == pytest.approx(20 * MS)
    assert br[0].compute_s == pytest.approx(12 * MS) and br[0].busy_fraction == pytest.approx(0.6)
    assert br[0].comm_s == pytest.approx(1 * MS) and br[0].bubble_s == pytest.approx(7 * MS)
    # stage 1 computes 3..15 = 12 ms; idle 0..3 (2..3 on the wire) and 15..20 (no transfer to it)
    assert br[1].compute_s == pytest.approx(12 * MS)
    assert br[1].comm_s == pytest.approx(1 * MS) and br[1].bubble_s == pytest.approx(7 * MS)
    for b in br:
        assert b.compute_s + b.comm_s + b.bubble_s == pytest.approx(b.span_s)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)


def test_aggregator_snapshot_from_synthetic_lines() -> None:
    plan = _plan()
    agg = Aggregator(plan, total_steps=10)
    assert agg.snapshot() is None
    for step in range(3):
        for recs in _step_records(step, 100.0 * step).values():
            agg.add_all(recs)
    # a step that only one rank finished is not complete yet
    agg.add_all(_step_records(3, 300.0)[1])
    snap = agg.snapshot()
    assert snap is not None and snap.step == 3 and snap.total_steps == 10
    assert snap.loss == pytest.approx(1.5)
    assert snap.step_time_s == pytest.approx(0.021)  # the slowest rank
    assert snap.tokens_per_s == pytest.approx(2 * 2 * 16 / 0.021)
    s0, s1 = snap.stages
    assert s0.busy_fraction == pytest.approx(0.6) and s0.bubble_fraction == pytest.approx(0.4)
    assert s1.p2p_p50_s == pytest.approx(1 * MS) and s1.p2p_p95_s == pytest.approx(1 * MS)
    assert s0.memory_bytes == 6 << 20 and s1.memory_bytes == (5 << 20) + 3  # peak so far, incomplete step included
    assert s0.predicted_memory_bytes == 4 << 20
    line = format_plain(snap)
    assert line.startswith("step 3/10  loss 1.5000") and "s1 busy 60% bubble 40% p2p p50 1.00 ms" in line
    assert "mem 6.0 MiB/4.0 MiB pred" in line


def test_tail_reads_only_complete_lines_and_restarts_on_new_file(tmp_path: Path) -> None:
    d = tmp_path / "telemetry"
    d.mkdir()
    f = d / "rank0.jsonl"
    f.write_text(json.dumps({"type": "step", "step": 0}) + "\n" + '{"type": "st')
    tail = TelemetryTail(tmp_path)
    assert [r["step"] for r in tail.poll()] == [0]
    with open(f, "a") as fh:
        fh.write('ep", "step": 1}\n')
    assert [r["step"] for r in tail.poll()] == [1]
    assert tail.poll() == []
    f.unlink()  # a new run replaces the file
    f.write_text(json.dumps({"type": "step", "step": 7}) + "\n")
    assert [r["step"] for r in tail.poll()] == [7]


def test_plain_mode_prints_lines_while_files_grow(tmp_path: Path) -> None:
    plan = _plan()
    (tmp_path / "telemetry").mkdir()
    buf = io.StringIO()
    console = Console(file=buf, width=300, force_terminal=False)
    steps = 4

    def writer() -> None:
        for step in range(steps):
            for r, recs in _step_records(step, 100.0 * step).items():
                with open(tmp_path / "telemetry" / f"rank{r}.jsonl", "a") as fh:
                    fh.write("".join(json.dumps(x) + "\n" for x in recs))
            time.sleep(0.05)

    mon = LiveMonitor(tmp_path, plan, steps, console=console, interactive=False, interval_s=0.02, plain_interval_s=0.0)
    with mon:
        t = threading.Thread(target=writer)
        t.start()
        t.join()
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("step ")]
    assert lines, buf.getvalue()
    assert lines[-1].startswith(f"step {steps}/{steps}  loss {3.5 - (steps - 1):.4f}")
    nums = [int(ln.split()[1].split("/")[0]) for ln in lines]
    assert nums == sorted(set(nums))  # one line per new step, in order
    assert mon.last is not None and mon.last.step == steps
    assert "\x1b[" not in buf.getvalue()  # plain text, no terminal control codes


def test_terminal_mode_renders_the_live_table(tmp_path: Path) -> None:
    plan = _plan()
    (tmp_path / "telemetry").mkdir()
    for step in range(2):
        for r, recs in _step_records(step, 100.0 * step).items():
            with open(tmp_path / "telemetry" / f"rank{r}.jsonl", "a") as fh:
                fh.write("".join(json.dumps(x) + "\n" for x in recs))
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=True, color_system=None)
    with LiveMonitor(tmp_path, plan, 5, console=console, interactive=True, interval_s=0.02):
        time.sleep(0.1)
    text = buf.getvalue()
    assert "step 2/5" in text and "loss 2.5000" in text and "tokens/s" in text
    for col in ("busy %", "bubble %", "p2p p50", "p2p p95", "memory", "predicted", "meas/pred"):
        assert col in text
    assert "1.50x" in text  # stage 0: 6 MiB measured / 4 MiB predicted
