"""Measured collectives: the calibration's probe and fits, the simulator pricing tensor- and
data-parallel collectives with them, and a tensor-parallel run's telemetry and fidelity table.

The probe's fits against its own measurements are checked on the one launch of it that `pipetrain
calibrate` makes (tests/test_calibrate_cli.py::test_probe_measures_the_gloo_link); the run is the
executor's bare launcher on 4 ranks (tp = 2 x dp = 2, ZeRO-1): the launch tests/test_executor_parallel.py
compares with the reference (its plan and arguments; one launch per session for both, conftest's ``launches``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from calibration_data import block_profile, make_calibration  # (tests/)
from pipetrain.calibration.measured import Calibration, P2PCost, calibrated_topology
from pipetrain.calibration.tpcost import TensorParallelCost
from pipetrain.planner.trace import trace_graph
from pipetrain.sharding import CollectiveFit, collective_time_s
from pipetrain.topology import topology_preset
from pipetrain.validation.fidelity import compare, fidelity_lines, fidelity_table_head, simulate_plan

SEQ = 16


def test_collective_time_uses_a_matching_fit_else_the_ring() -> None:
    link = P2PCost(backend="gloo", latency_s=1e-4, bandwidth_bytes_per_s=1e9)
    fit = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=3e-4, per_byte_s=2e-9)
    assert collective_time_s("all_reduce", 1e6, 2, link, (fit,)) == pytest.approx(3e-4 + 2e-3)
    ring = 2 * (0.5 * 1e6 / 1e9 + 1e-4)
    assert collective_time_s("all_reduce", 1e6, 2, link) == pytest.approx(ring)
    assert collective_time_s("all_reduce", 1e6, 4, link, (fit,)) != pytest.approx(3e-4 + 2e-3)  # another group size: the ring
    assert collective_time_s("all_gather", 1e6, 2, link, (fit,)) == pytest.approx(ring / 2)


def _calibration(graph: Any, collectives: tuple[CollectiveFit, ...] = (), tp_costs: tuple[TensorParallelCost, ...] = ()) -> Calibration:
    prof = block_profile(graph.model, graph.micro_batch_size, graph.seq_len, tuple((n.name, n.kind, 2e-3, 3e-3) for n in graph.nodes))
    return make_calibration((prof,), topology="local-cpu:4", cores=4, collectives=collectives, tensor_parallel=tp_costs)


def _plan(**kw: Any) -> Any:
    pytest.importorskip("torch")
    from pipetrain.executor.plans import simple_plan

    return simple_plan("tiny-gpt", **{"mbs": 1, "seq_len": SEQ, **kw})


@pytest.fixture(scope="module")
def graph() -> Any:
    return trace_graph("tiny-gpt", micro_batch_size=1, seq_len=SEQ)


def test_simulator_prices_tp_collectives_with_the_calibrated_fit(graph: Any) -> None:
    """tp = 2, one stage, 4 micro-batches: each layer's 2 forward and 2 backward all-reduces of
    b*s*h fp32, the embedding's forward and the head's backward one, and the vocabulary-parallel
    cross-entropy's 3 forward all-reduces of s*b fp32 cost exactly the calibrated 1 ms + 1 ns/byte;
    the busy time is the profile plus them."""
    ar = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=1e-3, per_byte_s=1e-9)
    cal = _calibration(graph, (ar,))
    plan = _plan(pp=1, m=4, tp=2)
    topo = calibrated_topology(topology_preset("local-cpu:2"), cal)
    inp, sim, _ = simulate_plan(plan, calibration=cal, graph=graph, topology=topo)
    layers = [n for n in graph.nodes if n.layer is not None]
    hidden = layers[0].layer.hidden
    per_mb = (len(layers) * 4 + 2) * (1e-3 + 1 * SEQ * hidden * 4 * 1e-9) + 3 * (1e-3 + SEQ * 4 * 1e-9)
    assert inp.stages[0].t_tp_comm_s == pytest.approx(per_mb)
    assert sim.busy_s_per_stage[0] == pytest.approx(4 * (graph.num_nodes * 5e-3 + per_mb))
    ring = simulate_plan(plan, calibration=_calibration(graph), graph=graph, topology=topo)[0]
    assert ring.stages[0].t_tp_comm_s != pytest.approx(per_mb)  # without the fit: the ring on the link
    # measured tp compute: the profile times the executor's factors
    tpc = TensorParallelCost(model="tiny-gpt", micro_batch_size=1, seq_len=SEQ, tp=2, fwd_factor=0.5, bwd_factor=2.0,
                             measured_fwd_s=1.0, measured_bwd_s=1.0, measured_tp_comm_s=0.0, steps=3)
    scaled = simulate_plan(plan, calibration=_calibration(graph, (ar,), (tpc,)), graph=graph, topology=topo)[1]
    assert scaled.busy_s_per_stage[0] == pytest.approx(4 * (graph.num_nodes * (1e-3 + 6e-3) + per_mb))
    # the tp run also timed its collectives in place (per micro-batch, F 8 ms, B 12 ms, the whole model):
    # they replace the fit, spread over the layers
    timed = replace(tpc, tp_comm_fwd_s=8e-3, tp_comm_bwd_s=12e-3)
    inp2, sim2, _ = simulate_plan(plan, calibration=_calibration(graph, (ar,), (timed,)), graph=graph, topology=topo)
    assert inp2.stages[0].t_tp_comm_s == pytest.approx(20e-3)
    assert sim2.busy_s_per_stage[0] == pytest.approx(4 * (graph.num_nodes * (1e-3 + 6e-3) + 20e-3))
    topo4 = calibrated_topology(topology_preset("local-cpu:4"), cal)
    two = simulate_plan(_plan(pp=2, m=4, tp=2), calibration=_calibration(graph, (ar,), (timed,)), graph=graph, topology=topo4)[0]
    per_layer = 20e-3 / len(layers)
    assert [st.t_tp_comm_s for st in two.stages] == pytest.approx(
        [per_layer * sum(1 for n in graph.nodes[a:b] if n.layer is not None) for a, b in
         ((st.block_start, st.block_end) for st in _plan(pp=2, m=4, tp=2).stages)])


def test_calibration_file_keeps_the_collectives(graph: Any, tmp_path: Path) -> None:
    from pipetrain.calibration.measured import load_calibration
    from pipetrain.calibration.run import describe

    ar = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=1e-3, per_byte_s=1e-9, sizes_bytes=(1024, 4096),
                       seconds=(1e-3, 1.1e-3))
    cal = _calibration(graph, (ar,))
    assert load_calibration(cal.save(tmp_path / "c.json")) == cal
    assert ("all-reduce x2 (gloo)", "1000 us + 1.000 ns/byte (measured 1 KiB 1.00 ms, 4 KiB 1.10 ms)") in describe(cal)


def test_simulator_prices_the_zero_collective_with_the_calibrated_fit(graph: Any) -> None:
    """dp = 2 with ZeRO-1: the stage's data-parallel collective is the calibrated all-reduce of its bytes."""
    ar = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=2e-3, per_byte_s=3e-9)
    cal = _calibration(graph, (ar,))
    plan = _plan(pp=1, dp=2, m=2, zero=1)
    inp, sim, _ = simulate_plan(plan, calibration=cal, graph=graph, topology=calibrated_topology(topology_preset("local-cpu:2"), cal))
    (e,) = [e for e in sim.raw_events if e[2] == "ALLREDUCE" and e[6] == int(inp.stages[0].grad_bytes)]
    assert e[5] - e[4] == pytest.approx(2e-3 + 3e-9 * inp.stages[0].grad_bytes)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tp_zero_run_telemetry_has_collective_spans_and_the_fidelity_table_their_columns(launches: Any) -> None:
    """tp = 2 x dp = 2 with ZeRO-1 (FSDP2 over dp on the tp shards), 4 ranks, 4 micro-batches of 2, 3 steps."""
    pytest.importorskip("torch")
    from pipetrain.costs import AnalyticCostModel
    from pipetrain.executor.telemetry import read_telemetry
    from pipetrain.validation.measure import measure_run

    m, mbs, steps = 4, 2, 3  # tests/test_executor_parallel.py's M, MBS and STEPS: its launch
    plan = _plan(pp=1, dp=2, m=m, tp=2, zero=1, mbs=mbs)
    run_dir = launches.wait(plan, "--steps", str(steps), "--dataset", "stdlib-text", "--save-final")
    graph = trace_graph("tiny-gpt", micro_batch_size=mbs, seq_len=SEQ)
    layers = sum(1 for n in graph.nodes if n.layer is not None)
    tel = read_telemetry(run_dir)
    assert sorted(tel) == [0, 1, 2, 3]
    for rank, recs in tel.items():
        fb = [e for e in recs if e.get("type") == "event" and e["kind"] in ("F", "B")]
        assert len(fb) == steps * m * 2, rank
        for e in fb:  # DTensor's row-parallel all-reduces forward, the column-parallel input's backward, per layer;
            # and the vocabulary-parallel embedding's all-reduce forward, the head's input gradient's backward
            assert e["tp_collectives"] == 2 * layers + 1 and 0 < e["tp_comm_s"] < e["end_s"] - e["start_s"], e
            # FSDP2: the parameters' all-gather in the step's first forward, the gradients' reduce-scatter in its last backward
            edge = (e["kind"], e["microbatch"]) in (("F", 0), ("B", m - 1))
            assert (e["zero_collectives"] > 0) == edge, e
            assert (e["zero_comm_s"] > 0) == edge and e["tp_comm_s"] + e["zero_comm_s"] < e["end_s"] - e["start_s"], e
    meas = measure_run(run_dir, plan, warmup_steps=1)
    inp, sim, _ = simulate_plan(plan, cost=AnalyticCostModel(), graph=graph)
    f = compare(plan, inp, sim, meas)
    head = fidelity_table_head(f)
    assert head[-6:] == ("tp comm sim ms", "meas ms", "err", "zero comm sim ms", "meas ms", "err")
    (st,) = f.stages
    assert st.sim_tp_comm_s > 0 and 0 < st.meas_tp_comm_s < st.meas_busy_s
    assert st.sim_zero_comm_s > 0 and st.meas_zero_comm_s > 0
    d = f.to_dict()["stages"][0]
    assert d["meas_tp_comm_s"] == pytest.approx(st.meas_tp_comm_s) and "tp_comm_error" in d
    assert any("tp comm" in line for line in fidelity_lines(f))
    assert replace(f, has_tp=False).to_dict()["stages"][0].get("tp_comm_error") is None
    from pipetrain.reports.report import fidelity_section

    (table,) = fidelity_section(f.to_dict()).tables
    assert table[0][-6:] == ("tp comm sim", "tp comm meas", "error", "zero comm sim", "zero comm meas", "error")
    assert len(table[1][0]) == len(table[0])


def test_calibrate_tp_beyond_the_topology_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    from pipetrain.cli import main

    assert main(["calibrate", "--topology", "local-cpu:2", "--model", "tiny-gpt", "--tp", "4", "--no-probe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "--tp 4" in err[-1] and "2 devices" in err[-1]
