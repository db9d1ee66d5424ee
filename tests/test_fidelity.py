"""Fidelity: measuring a run from telemetry, simulating its plan with a calibration, comparing them."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest

from pipetrain.calibration.fit import CalibrationFit
from pipetrain.calibration.measured import Calibration, MeasuredCostModel, OptimizerCost, P2PCost, calibrated_topology
from pipetrain.calibration.profile import BlockProfile, BlockTiming
from pipetrain.plan import Plan, StagePlan
from pipetrain.planner.trace import trace_graph
from pipetrain.topology import topology_preset
from pipetrain.validation.fidelity import compare, mape, simulate_plan, spearman
from pipetrain.validation.measure import measure_run


# ----- summaries -------------------------------------------------------------------------------------
def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(3, 15)
        a = [rng.choice([1.0, 2.0, 3.0, 4.0, rng.random()]) for _ in range(n)]
        b = [x + rng.gauss(0, 1) for x in a]
        want = spearmanr(a, b).statistic
        if math.isnan(want):
            continue
        assert spearman(a, b) == pytest.approx(want, abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_mape() -> None:
    assert mape([0.1, -0.3]) == pytest.approx(0.2)
    assert mape([]) == 0.0


# ----- measuring from telemetry ----------------------------------------------------------------------
def _plan2(m: int = 2) -> Plan:
    st = (StagePlan(index=0, block_start=0, block_end=3, rank=0, device="cpu", buffers=2),
          StagePlan(index=1, block_start=3, block_end=6, rank=1, device="cpu", buffers=2))
    return Plan(model="tiny-gpt", graph_fingerprint="x", topology="local", pp=2, dp=1, micro_batch_size=1,
                num_microbatches=m, seq_len=16, schedule="gpipe", stages=st)


def _write_telemetry(run_dir: Path, steps: dict[int, dict[int, list[tuple[str, int, float, float]]]],
                     step_times: dict[int, dict[int, float]], act: dict[int, int]) -> None:
    (run_dir / "telemetry").mkdir(parents=True)
    for rank in (0, 1):
        lines = [{"type": "meta", "rank": rank}]
        for k, per_rank in steps.items():
            for kind, mb, a, b in per_rank[rank]:
                lines.append({"type": "event", "stage": rank, "rank": rank, "kind": kind, "microbatch": mb, "start_s": a,
                              "end_s": b, "bytes": 0, "step": k})
            lines.append({"type": "step", "rank": rank, "step": k, "step_time_s": step_times[k][rank],
                          "in_flight_peak": {str(rank): 2 - rank}, "memory": {"activation_bytes_peak": act[rank]}})
        (run_dir / "telemetry" / f"rank{rank}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_measure_run_medians_busy_bubble_and_memory(tmp_path: Path) -> None:
    # step k (offset 10k): rank 0 F0 [0,1] F1 [1,2] B1 [5,7] B0 [7,9]; rank 1 F0 [1.5,2.5] B0 [2.5,4.5] ... scaled by s
    steps, times = {}, {}
    for k, s in ((0, 5.0), (1, 1.0), (2, 1.2), (3, 1.1)):  # step 0 is warm-up (slow)
        o = 10.0 * k
        steps[k] = {0: [("F", 0, o, o + s), ("F", 1, o + s, o + 2 * s), ("B", 1, o + 5 * s, o + 7 * s), ("B", 0, o + 7 * s, o + 9 * s)],
                    1: [("F", 0, o + 1.5 * s, o + 2.5 * s), ("B", 0, o + 2.5 * s, o + 4.5 * s), ("RECV", 1, o, o + 1),
                        ("F", 1, o + 2.5 * s, o + 3.5 * s), ("B", 1, o + 3.5 * s, o + 5 * s)]}
        times[k] = {0: 9.5 * s, 1: 9.0 * s}
    _write_telemetry(tmp_path, steps, times, {0: 1000, 1: 300})
    meas = measure_run(tmp_path, _plan2(), warmup_steps=1)
    assert meas.steps == (1, 2, 3)
    assert meas.step_time_s == pytest.approx(9.5 * 1.1)  # median of the slowest rank's times
    assert meas.pipeline_time_s == pytest.approx(9.0 * 1.1)
    assert meas.busy_s_per_stage == pytest.approx((6.0 * 1.1, 5.5 * 1.1))  # RECV is not compute
    assert meas.bubble_fraction_per_stage == pytest.approx((1 - 6 / 9, 1 - 5.5 / 9))
    assert meas.peak_activation_bytes_per_rank == (1000.0, 300.0)
    assert meas.peak_in_flight_per_stage == (2, 1)
    assert meas.step_time_iqr_s[0] == pytest.approx(9.5)  # lower quartile: the least disturbed steps
    assert meas.quiet_busy_s_per_stage == pytest.approx((6.0, 5.5))


def test_measure_run_pools_several_runs_each_without_its_warmup(tmp_path: Path) -> None:
    """Runs of the same plan spread over time pool their steps (each run's own warm-up left out):
    two runs of 3 steps at 1 s and 2 s per unit give 4 measured steps, median 1.5 units."""
    dirs = []
    for i, s in enumerate((1.0, 2.0)):
        steps, times = {}, {}
        for k, f in ((0, 5.0), (1, 1.0), (2, 1.0)):  # step 0 is warm-up
            u, o = s * f, 10.0 * k
            steps[k] = {0: [("F", 0, o, o + u), ("B", 0, o + 2 * u, o + 3 * u)], 1: [("F", 0, o + u, o + 2 * u)]}
            times[k] = {0: 3.0 * u, 1: 2.0 * u}
        _write_telemetry(tmp_path / f"run{i}", steps, times, {0: 100 * (i + 1), 1: 50})
        dirs.append(tmp_path / f"run{i}")
    meas = measure_run(dirs, _plan2(), warmup_steps=1)
    assert meas.steps == (1, 2, 1_000_001, 1_000_002)
    assert meas.step_time_s == pytest.approx(3.0 * 1.5) and meas.busy_s_per_stage == pytest.approx((2.0 * 1.5, 1.5))
    assert meas.peak_activation_bytes_per_rank == (200.0, 50.0)  # the peak over all runs
    assert measure_run(dirs[:1], _plan2(), warmup_steps=1).step_time_s == pytest.approx(3.0)


def test_measure_run_without_telemetry_is_a_run_error(tmp_path: Path) -> None:
    from pipetrain.errors import RunError

    with pytest.raises(RunError, match="telemetry"):
        measure_run(tmp_path, _plan2())


# ----- simulating with a calibration -----------------------------------------------------------------
def _calibration(graph, fwd_ms: float = 2.0, bwd_ms: float = 3.0) -> Calibration:  # type: ignore[no-untyped-def]
    blocks = tuple(BlockTiming(name=n.name, kind=n.kind, fwd_s=fwd_ms * 1e-3, bwd_s=bwd_ms * 1e-3) for n in graph.nodes)
    prof = BlockProfile(model=graph.model, micro_batch_size=graph.micro_batch_size, seq_len=graph.seq_len, dtype=graph.dtype,
                        device="cpu:test:1thr", device_kind="cpu", warmup=0, repeats=1, blocks=blocks)
    fit = CalibrationFit(device_type="local-cpu", dtype="fp32", efficiency_by_kind={}, default_efficiency=0.3,
                         bwd_efficiency_scale=1.0, memory_efficiency=0.8, overhead_fwd_s=0.0, overhead_bwd_s=0.0,
                         error_before=0.5, error_after=0.1, num_samples=2)
    return Calibration(topology="local-cpu:4", device_type="local-cpu", device="cpu:test:1thr", device_kind="cpu", threads=1, cores=2,
                       p2p=P2PCost(backend="gloo", latency_s=1e-4, bandwidth_bytes_per_s=1e9),
                       optimizers=(OptimizerCost(optimizer="adamw", fixed_s=1e-3, per_param_s=1e-8),), fit=fit, profiles=(prof,))


def _topology(n: int, cores: int):  # type: ignore[no-untyped-def]
    t = topology_preset(f"local-cpu:{n}")
    return replace(t, nodes=(replace(t.nodes[0], cores=cores),))


def _plan(pp: int, m: int, schedule: str, dp: int = 1) -> Plan:
    pytest.importorskip("torch")
    from pipetrain.executor.plans import simple_plan

    return simple_plan("tiny-gpt", pp=pp, dp=dp, m=m, mbs=1, seq_len=16, schedule=schedule)


@pytest.fixture(scope="module")
def graph():  # type: ignore[no-untyped-def]
    return trace_graph("tiny-gpt", micro_batch_size=1, seq_len=16)


def test_simulated_busy_is_the_calibrated_block_times(graph) -> None:  # type: ignore[no-untyped-def]
    cal = _calibration(graph)
    plan = _plan(2, 4, "1f1b")
    inp, sim, source = simulate_plan(plan, calibration=cal, graph=graph, topology=calibrated_topology(_topology(2, 2), cal))
    assert source == "calibration"
    for st in plan.stages:  # 4 micro-batches x blocks x (2 + 3) ms
        assert sim.busy_s_per_stage[st.index] == pytest.approx(4 * st.num_blocks * 5e-3)
    assert inp.boundaries[0].link.latency_s == pytest.approx(1e-4)  # the measured link
    assert inp.stages[0].t_optimizer_s == pytest.approx(1e-3 + 1e-8 * sum(n.param_count for n in graph.nodes[:3]))
    assert not inp.compute_groups  # 2 ranks, 2 cores: nobody shares


def test_ranks_outnumbering_cores_share_them(graph) -> None:  # type: ignore[no-untyped-def]
    """4 ranks on 2 cores: a compute group of capacity 2 -- the topology's cores, nothing fitted."""
    cal = _calibration(graph)
    plan = _plan(4, 8, "gpipe")
    shared = simulate_plan(plan, calibration=cal, graph=graph, topology=calibrated_topology(_topology(4, 2), cal))
    alone = simulate_plan(plan, calibration=cal, graph=graph, topology=calibrated_topology(_topology(4, 4), cal))
    (g,) = shared[0].compute_groups
    assert g.ranks == (0, 1, 2, 3) and g.capacity == 2
    from pipetrain.validation.measure import Measured

    n = plan.num_stages
    meas = Measured(steps=(1,), step_time_s=1.0, pipeline_time_s=1.0, busy_s_per_stage=(0.1,) * n, bubble_fraction_per_stage=(0.5,) * n,
                    bubble_fraction=0.5, peak_activation_bytes_per_rank=(1.0,) * n, peak_in_flight_per_stage=(8,) * n)
    assert all(s.shared for s in compare(plan, shared[0], shared[1], meas).stages)
    assert not any(s.shared for s in compare(plan, alone[0], alone[1], meas).stages)
    assert not alone[0].compute_groups
    work = sum(shared[1].busy_s_per_stage)
    assert shared[1].pipeline_time_s >= work / 2 - 1e-9  # two cores can do no better
    assert shared[1].pipeline_time_s > alone[1].pipeline_time_s * 1.2
    # data parallel: 2 replicas x 2 stages on 2 cores -> each replica's ranks share one core
    dp = simulate_plan(_plan(2, 4, "1f1b", dp=2), calibration=cal, graph=graph, topology=calibrated_topology(_topology(4, 2), cal))
    (g2,) = dp[0].compute_groups
    assert g2.capacity == 1 and dp[1].pipeline_time_s >= sum(dp[1].busy_s_per_stage) - 1e-9


def test_compare_errors_are_signed_relative(graph, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cal = _calibration(graph)
    plan = _plan2()
    plan = replace(plan, graph_fingerprint=graph.fingerprint)
    inp, sim, _ = simulate_plan(plan, calibration=cal, graph=graph, topology=calibrated_topology(_topology(2, 2), cal))
    from pipetrain.validation.measure import Measured

    meas = Measured(steps=(1,), step_time_s=sim.step_time_s * 1.25, pipeline_time_s=sim.pipeline_time_s,
                    busy_s_per_stage=(sim.busy_s_per_stage[0] / 0.8, sim.busy_s_per_stage[1]),
                    bubble_fraction_per_stage=(0.1, 0.2), bubble_fraction=0.15,
                    peak_activation_bytes_per_rank=(inp.stages[0].activation_bytes * 2, inp.stages[1].activation_bytes * 1.1),
                    peak_in_flight_per_stage=(2, 1))
    f = compare(plan, inp, sim, meas)
    assert f.step_error == pytest.approx(-0.2)
    assert f.stages[0].busy_error == pytest.approx(-0.2) and f.stages[1].busy_error == pytest.approx(0.0)
    assert f.stages[0].sim_in_flight == 2  # GPipe, m=2: both micro-batches in flight on stage 0
    assert f.stages[0].activation_error == pytest.approx(0.0)
    assert f.stages[1].activation_error == pytest.approx(sim.peak_in_flight_per_stage[1] / 1.1 - 1)
    assert f.stages[1].bubble_error_pp == pytest.approx((sim.bubble_fraction_per_stage[1] - 0.2) * 100)
    assert json.loads(json.dumps(f.to_dict()))["stages"][0]["busy_error"] == pytest.approx(-0.2)


def test_measured_cost_model_falls_back_to_the_fit_for_other_shapes(graph) -> None:  # type: ignore[no-untyped-def]
    cal = _calibration(graph)
    cost = MeasuredCostModel(cal)
    dt = topology_preset("local-cpu:2").devices[0].type
    t = cost.node_times(graph, dt)
    assert t.fwd_s == (2e-3,) * graph.num_nodes
    other = trace_graph("tiny-gpt", micro_batch_size=2, seq_len=16)
    t2 = cost.node_times(other, dt)
    assert t2.fwd_s != (2e-3,) * other.num_nodes and all(x >= 0 for x in t2.fwd_s)  # the fitted analytic model
    assert cost.optimizer_step_time_s(1000, dt) == pytest.approx(1e-3 + 1e-5)
    assert cost.optimizer_step_time_s(1000, dt, optimizer="sgd") > 0  # not calibrated: analytic


# ----- a real run ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_real_run_fidelity_plumbing(tmp_path: Path) -> None:
    """One tiny real run: activation bytes match exactly, times are real and within a loose bound."""
    pytest.importorskip("torch")
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.plans import simple_plan
    from pipetrain.validation.fidelity import run_fidelity

    os.environ["PIPETRAIN_PROFILE_CACHE"] = str(tmp_path / "profiles")
    plan = simple_plan("tiny-gpt", pp=2, m=4, mbs=2, seq_len=32, schedule="1f1b")
    plan.save(tmp_path / "plan.json")
    launch(RunConfig(plan_path=str(tmp_path / "plan.json"), run_dir=str(tmp_path / "run"), steps=5, timeout_s=90))
    f = run_fidelity(tmp_path / "run", plan, warmup_steps=1)
    assert f.steps_measured == 4
    assert f.meas_step_s > 0 and f.sim_step_s > 0 and math.isfinite(f.step_error)
    assert abs(f.step_error) < 3.0  # loose: a shared 2-core machine; the benchmark measures accuracy
    for s in f.stages:
        assert s.meas_busy_s > 0 and s.sim_busy_s > 0
        assert s.sim_in_flight == s.meas_in_flight
        assert abs(s.activation_error) < 0.01, s  # saved-for-backward bytes: the memory model is exact here


def test_clip_sync_makes_every_optimizer_step_wait_for_the_last_rank() -> None:
    """The executor clips by the global gradient norm: one scalar all-reduced over all ranks before any update."""
    from pipetrain.simulator import Link, fast_evaluate, simulate, uniform

    base = uniform(2, 2, "gpipe", t_fwd_s=1e-3, t_bwd_s=2e-3, t_optimizer_s=5e-4)
    synced = replace(base, clip_sync_link=Link(name="p2p", latency_s=1e-3, bandwidth_bytes_per_s=1e12))
    for ev in (simulate, fast_evaluate):
        assert ev(base).step_time_s == pytest.approx(9.5e-3)  # rank 0 ends last at 9 ms, then its update
        r = ev(synced)
        assert r.pipeline_time_s == pytest.approx(9e-3)
        assert r.step_time_s == pytest.approx(9e-3 + 2 * 1e-3 + 5e-4, rel=1e-6)  # ring all-reduce of 8 bytes on 2 ranks
    opt = [e for e in simulate(synced).events if e.kind == "OPT"]
    assert len(opt) == 2 and all(e.start_s == pytest.approx(11e-3, rel=1e-6) for e in opt)


def test_time_sliced_cores_are_processor_sharing() -> None:
    """k jobs on c cores each progress at c/k: two jobs of 1 s and 3 s on one core end at 2 s and 4 s."""
    import simpy

    from pipetrain.simulator.sharing import SharedCores

    env = simpy.Environment()
    cores = SharedCores(env, 1)
    ends: dict[str, float] = {}

    def job(name: str, start: float, dur: float):  # type: ignore[no-untyped-def]
        yield env.timeout(start)
        yield cores.run(dur)
        ends[name] = env.now

    env.process(job("a", 0.0, 1.0))
    env.process(job("b", 0.0, 3.0))
    env.process(job("c", 5.0, 0.5))  # alone: full speed
    env.run()
    assert ends == pytest.approx({"a": 2.0, "b": 4.0, "c": 5.5})
    env2 = simpy.Environment()
    two = SharedCores(env2, 2)
    out: list[float] = []

    def j2(d: float):  # type: ignore[no-untyped-def]
        yield two.run(d)
        out.append(env2.now)

    for _ in range(4):
        env2.process(j2(1.0))
    env2.run()
    assert out == pytest.approx([2.0] * 4)  # four 1 s actions on two cores


def test_time_sliced_group_in_the_simulator(graph) -> None:  # type: ignore[no-untyped-def]
    """4 equal ranks on 2 time-sliced cores: never faster than the work over 2 cores, and actions are stretched."""
    from pipetrain.simulator import ComputeGroup, simulate

    cal = _calibration(graph)
    plan = _plan(4, 8, "gpipe")
    inp = simulate_plan(plan, calibration=cal, graph=graph, topology=calibrated_topology(_topology(4, 2), cal))[0]
    ts = replace(inp, compute_groups=(ComputeGroup(ranks=(0, 1, 2, 3), capacity=2, sharing="time-slice"),))
    r = simulate(ts)
    assert r.pipeline_time_s >= sum(r.busy_s_per_stage) / 2 - 1e-9
    longest = max(e.duration_s for e in r.events if e.kind in "FB")
    assert longest > max(max(s.t_fwd_s, s.t_bwd_s) for s in inp.stages) * 1.01  # stretched while >2 compute
    from pipetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="sharing"):
        ComputeGroup(ranks=(0, 1), sharing="round-robin")
