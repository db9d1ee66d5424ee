"""`pipetrain calibrate`: a real (small) calibration run, its JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipetrain.cli import main

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cal_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cal") / "cal.json"
    rc = main(["calibrate", "--topology", "local-cpu:2", "--model", "mlp-uneven", "--microbatch-sizes", "2,8",
               "--repeats", "2", "--rounds", "2", "--no-probe", "-o", str(out)])
    assert rc == 0
    return out


def _block_factor(cal: Any, i: int) -> float:
    """The executor's factor on the profiled blocks of shape ``i`` (Calibration.overhead_for): the one-rank
    run's, its spans' part replaced by the two-rank pipeline's back-to-back actions where measured."""
    o, mc = cal.runtime[i], cal.messages[i]
    assert mc.pipeline_hot_actions > 0 and o.span_factor > 0  # both runs measured it here
    return max(1e-3, o.factor - o.span_factor + mc.pipeline_hot_ratio)


def test_calibration_file_has_profiles_fit_and_optimizer(cal_file: Path) -> None:
    from pipetrain.calibration.measured import load_calibration

    cal = load_calibration(cal_file)
    assert cal.topology == "local-cpu:2" and cal.device_type == "local-cpu" and cal.threads == 1
    assert [(p.model, p.micro_batch_size) for p in cal.profiles] == [("mlp-uneven", 2), ("mlp-uneven", 8)]
    assert all(b.fwd_s > 0 and b.bwd_s > 0 for p in cal.profiles for b in p.blocks)
    assert cal.profiles[0].repeats == 4  # 2 rounds x 2 repeats
    assert cal.fit.num_samples == 2 * 2 * 9 and 0 <= cal.fit.error_after <= cal.fit.error_before + 1e-9
    adamw = cal.optimizer("adamw")
    assert adamw is not None and adamw.per_param_s > 0 and len(adamw.params) == 3
    # the fit reproduces the measured optimizer times it was fitted to within a factor of 2
    for n, t in zip(adamw.params, adamw.seconds):
        assert 0.5 * t <= adamw.time_s(n) <= 2.0 * t
    # the one-rank executor run, split by its telemetry into compute, end of step and the rest
    assert [(o.model, o.micro_batch_size) for o in cal.runtime] == [("mlp-uneven", 2), ("mlp-uneven", 8)]
    for o in cal.runtime:
        assert 0.3 < o.factor < 5 and o.fixed_s >= 0 and o.measured_step_s[1] > o.measured_step_s[0]
        assert o.param_count == 1534026 and 0 < o.end_of_step_s < o.measured_step_s[0]
        m1, _m2 = o.num_microbatches  # the parts add up to the measured step (medians of parts: roughly)
        between = o.between_steps_s + m1 * o.between_steps_per_microbatch_s  # the host work between two steps
        assert 0 < between < o.measured_step_s[0]
        assert m1 * o.factor * o.profiled_microbatch_s + o.end_of_step_s + o.fixed_s + between == pytest.approx(o.measured_step_s[0], rel=0.3)
    # the simulated end of step is the optimizer fit scaled to the executor's own
    scale = cal.optimizer_scale("mlp-uneven")
    assert scale == pytest.approx(sorted(o.end_of_step_s / adamw.time_s(o.param_count) for o in cal.runtime)[1] * 0.5
                                  + sorted(o.end_of_step_s / adamw.time_s(o.param_count) for o in cal.runtime)[0] * 0.5)
    assert cal.optimizer_scale("tiny-gpt") == 1.0  # not run
    # host CPU per message, from the executor on one and on two ranks: two ranks spend more outside their spans
    assert [(mc.model, mc.micro_batch_size) for mc in cal.messages] == [("mlp-uneven", 2), ("mlp-uneven", 8)]
    for mc in cal.messages:
        assert mc.messages_per_rank == 16 and len(mc.outside_two_ranks_s) == 2
        assert 0 < mc.host_s < 5e-3
        assert mc.host_s == pytest.approx(max(0.0, (sum(mc.outside_two_ranks_s) / 2 - mc.outside_one_rank_s) / 16))
    assert cal.message_host_s("mlp-uneven", 2, cal.profiles[0].seq_len) == cal.messages[0].host_s
    assert cal.message_host_s("tiny-gpt", 4, 64) == pytest.approx(sum(mc.host_s for mc in cal.messages) / 2)  # not measured: the mean
    # --no-probe keeps the topology's loopback figures and measures no wake-up latency
    assert cal.p2p.backend == "gloo" and cal.p2p.sizes_bytes == () and cal.wakeup is None


def test_calibration_drives_the_simulated_stage_times(cal_file: Path) -> None:
    from pipetrain.calibration.measured import load_calibration
    from pipetrain.executor.plans import simple_plan
    from pipetrain.validation.fidelity import simulate_plan

    cal = load_calibration(cal_file)
    plan = simple_plan("mlp-uneven", pp=2, m=4, mbs=8, seq_len=1, schedule="1f1b")
    _inp, sim, source = simulate_plan(plan, calibration=cal)
    prof = cal.profiles[1]
    k = _block_factor(cal, 1)
    for st in plan.stages:
        want = 4 * k * sum(b.fwd_s + b.bwd_s for b in prof.blocks[st.block_start:st.block_end])
        assert sim.busy_s_per_stage[st.index] == pytest.approx(want)
    assert source == "calibration"
    # each message sent or received holds its rank for the measured host time: 8 per rank here, on the
    # critical path of both ranks at least once each way, none of it busy time
    assert _inp.t_message_host_s == cal.messages[1].host_s > 0
    from dataclasses import replace

    from pipetrain.simulator import simulate

    free = simulate(replace(_inp, t_message_host_s=0.0))
    assert free.busy_s_per_stage == sim.busy_s_per_stage
    assert sim.step_time_s >= free.step_time_s + 4 * cal.messages[1].host_s - 1e-12


def test_measured_overheads_let_the_planner_choose_zero_bubble_on_cpu(cal_file: Path) -> None:
    """On CPU ranks zb-h1 is a candidate unasked only with a calibration that measured the executor
    (grid.AUTO_SCHEDULES): with it, the unpinned search screens it; without, it never appears."""
    from pipetrain.calibration.measured import calibrated_for
    from pipetrain.planner.job import job_from_mapping
    from pipetrain.planner.search import search

    job = job_from_mapping({"model": "mlp-uneven", "topology": "local-cpu:2", "global_batch": 32, "seq_len": 1, "dtype": "fp32",
                            "pp": 2, "dp": 1, "microbatch_size": 8}, source="test")
    topo, cost = calibrated_for("local-cpu:2", cal_file)
    measured = search(job, topology=topo, cost=cost, top_k=3)
    assert any(e.candidate.schedule == "zb-h1" for e in measured.screened)
    plain = search(job, top_k=3)
    assert all(e.candidate.schedule != "zb-h1" for e in plain.screened)


def test_json_roundtrip_and_version_error(cal_file: Path, tmp_path: Path) -> None:
    from pipetrain.calibration.measured import load_calibration
    from pipetrain.errors import ConfigError

    cal = load_calibration(cal_file)
    again = tmp_path / "again.json"
    cal.save(again)
    assert load_calibration(again) == cal
    data = json.loads(cal_file.read_text())
    data["schema_version"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="re-run `pipetrain calibrate`"):
        load_calibration(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_calibration(tmp_path / "missing.json")


def test_older_calibration_file_is_a_one_line_error(cal_file: Path, tmp_path: Path) -> None:
    """Files from before ``ResumeCost.slowdown`` was dropped (version 1) and before the runtime entries
    measured the host work between steps (version 2), before the measured collectives (version 3) and
    before the pipeline's latency distribution (version 4) name both versions and the fix."""
    from pipetrain.calibration.measured import CALIBRATION_FILE_VERSION, load_calibration
    from pipetrain.errors import ConfigError

    assert CALIBRATION_FILE_VERSION == 5
    for version in (1, 2, 3, 4):
        data = json.loads(cal_file.read_text())
        data.pop("collectives", None)
        data["schema_version"] = version
        for r in data.get("resume", []) if version == 1 else []:
            r["slowdown"] = 1.5
        for o in data.get("runtime", []) if version == 2 else []:
            del o["between_steps_s"], o["between_steps_per_microbatch_s"]
        old = tmp_path / f"old{version}.json"
        old.write_text(json.dumps(data))
        with pytest.raises(ConfigError) as e:
            load_calibration(old)
        msg = str(e.value)
        assert "\n" not in msg and f"version {version}" in msg and "reads version 5" in msg and "re-run `pipetrain calibrate`" in msg


@pytest.mark.parametrize("argv, msg", [
    (["--topology", "nope:3"], "unknown topology preset"),
    (["--topology", "local-cpu:2", "--microbatch-sizes", "0"], "--microbatch-sizes"),
    (["--topology", "local-cpu:2", "--microbatch-sizes", "a,b"], "--microbatch-sizes"),
    (["--topology", "local-cpu:2", "--model", "no-such-model", "--no-probe"], "no-such-model"),
    (["--topology", "dgx-h100:1", "--no-probe"], "calibrate a local-cpu:N topology here"),
    (["--topology", "local-cpu:2", "--repeat", "0"], "--repeat must be >= 1"),
    (["--model", "tiny-gpt"], "--topology is required"),
    (["--inter-node-rank", "0", "--inter-node-master", "10.0.0.1"], "--inter-node-master must be HOST:PORT"),
    (["--inter-node-rank", "2", "--inter-node-master", "127.0.0.1:1"], "rank must be 0 or 1"),
    (["--inter-node-rank", "0", "--inter-node-master", "127.0.0.1:1", "--inter-node-sizes", "x"], "--inter-node-sizes"),
])
def test_bad_input_is_one_line_exit_2(argv: list[str], msg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if "dgx" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["calibrate", *argv, "-o", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err


#: the probes' sizes in test_probe_measures_the_gloo_link: each still measures what its assertions check
#: (several sizes for a fit, busy against idle cores, 1 and 2 co-running ranks, paired timings), at a
#: fraction of `pipetrain calibrate`'s defaults, which a calibration needs for precise figures. The
#: p2p probe keeps its defaults: on a loaded machine every size's round trip can be a scheduler
#: wake-up (a 4-byte message as slow as a 1 MiB one), its time is mostly the processes' start, and
#: its fit's own bounds are tests/test_commprobe.py's
COLL_SIZES, COLL_REPEATS = (16 << 10, 256 << 10, 2 << 20), 6
WAKEUP_REPEATS, CORUN_PHASE_S, RESUME_PAIRS = 40, 0.4, 20


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_probe_measures_the_gloo_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipetrain calibrate` with its probes: each probe's figures are sane and the calibrated topology
    carries them. Most probes run with fewer repeats and rounds than a calibration's (functools.partial
    over the same functions, which run_calibration looks up when it calls them); this one launch of
    the wake-up and collective probes also holds the checks of their own figures (busy cores slowing a
    blocked receiver, the collectives' fits), so no other test launches them again."""
    import functools
    import os
    import statistics

    from pipetrain.calibration import collprobe, commprobe, corun

    monkeypatch.setattr(collprobe, "probe_collectives",
                        functools.partial(collprobe.probe_collectives, sizes_bytes=COLL_SIZES, repeats=COLL_REPEATS))
    monkeypatch.setattr(commprobe, "probe_wakeup", functools.partial(commprobe.probe_wakeup, repeats=WAKEUP_REPEATS, rounds=1))
    monkeypatch.setattr(corun, "probe_corun", functools.partial(corun.probe_corun, phase_s=CORUN_PHASE_S, rounds=1))
    monkeypatch.setattr(corun, "probe_resume", functools.partial(corun.probe_resume, pairs=RESUME_PAIRS))
    out = tmp_path / "c.json"
    assert main(["calibrate", "--topology", "local-cpu:2", "--model", "mlp-uneven", "--microbatch-sizes", "2",
                 "--repeats", "1", "--rounds", "1", "--no-runtime", "-o", str(out)]) == 0
    from pipetrain.calibration.measured import calibrated_topology, load_calibration
    from pipetrain.topology import topology_preset

    cal = load_calibration(out)
    assert cal.p2p.backend == "gloo" and len(cal.p2p.sizes_bytes) == len(cal.p2p.one_way_s) >= 3
    assert 0 < cal.p2p.latency_s < 0.1 and cal.p2p.bandwidth_bytes_per_s > 1e6
    topo = calibrated_topology(topology_preset("local-cpu:2"), cal)
    link = topo.link_between(0, 1)
    assert link.bandwidth_bytes_per_s == cal.p2p.bandwidth_bytes_per_s
    # with as many busy processes as cores, a blocked receiver waits for a core: the one-way time of
    # the same ping-pong grows (by a scheduler time slice's order: 0.3-3 ms seen here)
    w = cal.wakeup
    assert w is not None and w.busy_processes == (os.cpu_count() or 1) and w.nbytes == 16384
    assert 0 < w.idle_one_way_s < 0.05
    assert w.busy_one_way_s > w.idle_one_way_s and w.wakeup_s == pytest.approx(w.busy_one_way_s - w.idle_one_way_s)
    # the latency a blocked receiver sees: the wake-up probe's idle one-way time less the wire time
    assert link.latency_s == pytest.approx(max(cal.p2p.latency_s, w.idle_one_way_s - w.nbytes / cal.p2p.bandwidth_bytes_per_s))
    assert link.latency_s >= cal.p2p.latency_s
    from dataclasses import replace

    assert calibrated_topology(topology_preset("local-cpu:2"), replace(cal, wakeup=None)).link_between(0, 1).latency_s == cal.p2p.latency_s
    # the collectives over the node's 2 ranks: each one's alpha-beta fit against its own measured medians
    assert [(f.kind, f.ranks, f.backend) for f in cal.collectives] == [(k, 2, "gloo") for k in ("all_reduce", "all_gather", "reduce_scatter")]
    for f in cal.collectives:
        assert f.sizes_bytes == COLL_SIZES and len(f.seconds) == 3 and all(t > 0 for t in f.seconds)
        # a probe timing nothing would fail here: 2 MiB between two processes goes through memory at
        # most at a memcpy's 50 GB/s (the sizes' own order is not asserted: on a loaded machine the
        # 16 KiB median came out above the 2 MiB one, gloo's fixed cost being most of both)
        assert f.seconds[-1] >= COLL_SIZES[-1] / 50e9, (f.kind, f.seconds)
        errors = [abs(f.latency_s + b * f.per_byte_s - t) / t for b, t in zip(f.sizes_bytes, f.seconds)]
        # the machine is shared: one size may be off by a burst of load, the fit must hold at the others
        assert statistics.median(errors) < 0.5, (f.kind, f.seconds, errors)
        # and the price the simulator takes is the measurement at the measured sizes
        assert [f.time_s(b) for b in f.sizes_bytes] == pytest.approx(list(f.seconds))
    # the co-run speed of 1 and 2 ranks computing at once, carried by the node
    (c,) = cal.corun
    assert (c.model, c.micro_batch_size, len(c.speed)) == ("mlp-uneven", 2, 2) and c.speed[0] == 1.0 and 0 < c.speed[1] <= 1.5
    assert topo.nodes[0].corun_speed == cal.corun_speed() == c.speed
    # what a wait costs the next action, carried by the node too
    (rc,) = cal.resume
    assert rc.model == "mlp-uneven" and rc.pairs == RESUME_PAIRS and rc.gap_s == pytest.approx(3e-3) and 0 < rc.hot_s < 1.0
    assert rc.resume_s == max(0.0, rc.cold_s - rc.hot_s)
    # after another process ran the same blocks on its core (Linux: both pinned to one core)
    assert rc.after_other_s > 0 and rc.switch_s == max(0.0, rc.after_other_s - rc.hot_s)
    assert (topo.nodes[0].resume_s, topo.nodes[0].switch_s) == (cal.resume_s(), cal.switch_s()) == (rc.resume_s, rc.switch_s)


def test_simulate_plan_with_calibration_uses_measured_blocks(cal_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from pipetrain.calibration.measured import load_calibration
    from pipetrain.executor.plans import simple_plan

    plan = replace(simple_plan("mlp-uneven", pp=2, m=4, mbs=8, seq_len=1, schedule="gpipe"), topology="local-cpu:2")
    path = plan.save(tmp_path / "plan.json")
    assert main(["simulate", str(path), "--calibration", str(cal_file), "--json", "-"]) == 0
    got = json.loads(capsys.readouterr().out)
    cal = load_calibration(cal_file)
    prof, k = cal.profiles[1], _block_factor(cal, 1)
    for st in plan.stages:
        want = 4 * k * sum(b.fwd_s + b.bwd_s for b in prof.blocks[st.block_start:st.block_end])
        assert got["busy_s_per_stage"][st.index] == pytest.approx(want)
    # simulated as the executor runs it: the same step `pipetrain run` compares its measurement with
    from pipetrain.validation.fidelity import simulate_plan

    assert got["step_time_s"] == pytest.approx(simulate_plan(plan, calibration=cal)[1].step_time_s)
    assert main(["simulate", str(path), "--json", "-"]) == 0  # analytic: other numbers
    assert json.loads(capsys.readouterr().out)["busy_s_per_stage"][0] != pytest.approx(got["busy_s_per_stage"][0])
    assert main(["simulate", "-p", "2", "-m", "2", "--t-fwd", "1", "--t-bwd", "1", "--calibration", str(cal_file)]) == 2
    assert "needs a PLAN.json" in capsys.readouterr().err


def test_plan_with_calibration(cal_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipetrain.plan import Plan

    base = ["plan", "--model", "mlp-uneven", "--topology", "local-cpu:2", "--global-batch", "32", "--seq-len", "1",
            "--dtype", "fp32", "--pp", "2", "--microbatch-size", "8", "--schedule", "1f1b", "--no-pin-cost"]
    assert main(base + ["--calibration", str(cal_file), "-o", str(tmp_path / "cal.json")]) == 0
    assert main(base + ["-o", str(tmp_path / "ana.json")]) == 0
    cal_plan, ana_plan = Plan.load(tmp_path / "cal.json"), Plan.load(tmp_path / "ana.json")
    assert cal_plan.predicted is not None and ana_plan.predicted is not None
    # each plan's prediction is its own cost model's: the calibrated one the simulator's step with the
    # measured blocks and link (not the analytic roofline of a nominal CPU, which may land anywhere
    # near it on a given machine), the analytic one the roofline's
    from pipetrain.calibration.measured import calibrated_for
    from pipetrain.planner.explain import plan_sim_input
    from pipetrain.simulator import simulate

    topo, cost = calibrated_for("local-cpu:2", cal_file)
    assert cal_plan.predicted.step_time_s == pytest.approx(simulate(plan_sim_input(cal_plan, topology=topo, cost=cost)).step_time_s,
                                                           rel=1e-9)
    assert ana_plan.predicted.step_time_s == pytest.approx(simulate(plan_sim_input(ana_plan)).step_time_s, rel=1e-9)
    assert simulate(plan_sim_input(ana_plan, topology=topo, cost=cost)).step_time_s != simulate(plan_sim_input(ana_plan)).step_time_s
    capsys.readouterr()
    assert main(base[:4] + ["dgx-h100:1"] + base[5:] + ["--calibration", str(cal_file)]) == 2
    assert "is for device type 'local-cpu'" in capsys.readouterr().err


def test_rescaled_calibration_scales_every_measured_time(cal_file: Path) -> None:
    """Calibration.rescaled(k): the machine k times slower; compute and end of step double, links do not."""
    from pipetrain.calibration.measured import load_calibration
    from pipetrain.errors import ConfigError
    from pipetrain.executor.plans import simple_plan
    from pipetrain.validation.fidelity import simulate_plan

    cal = load_calibration(cal_file)
    plan = simple_plan("mlp-uneven", pp=2, m=4, mbs=8, seq_len=1, schedule="1f1b")
    inp, sim, _ = simulate_plan(plan, calibration=cal)
    inp2, sim2, _ = simulate_plan(plan, calibration=cal.rescaled(2.0))
    assert sim2.busy_s_per_stage == pytest.approx([2 * b for b in sim.busy_s_per_stage])
    assert [s.t_optimizer_s for s in inp2.stages] == pytest.approx([2 * s.t_optimizer_s for s in inp.stages])
    assert inp2.t_message_host_s == pytest.approx(2 * inp.t_message_host_s) and inp2.boundaries == inp.boundaries
    assert cal.rescaled(2.0).optimizer_scale("mlp-uneven") == pytest.approx(cal.optimizer_scale("mlp-uneven"))
    with pytest.raises(ConfigError, match="rescale"):
        cal.rescaled(0.0)


def test_combined_calibration_is_the_median_of_each_measured_number(cal_file: Path) -> None:
    """Three snapshots of the machine at 1x, 2x and 3x the time: the combination is the 2x one,
    number by number (what is not a measured time, the link, stays); calibrations of other
    models or shapes are refused."""
    from dataclasses import replace

    from pipetrain.calibration.measured import combine_calibrations, load_calibration
    from pipetrain.errors import ConfigError

    cal = load_calibration(cal_file)
    got = combine_calibrations([cal.rescaled(3.0), cal, cal.rescaled(2.0)])
    want = cal.rescaled(2.0)
    assert got.profiles == want.profiles and got.runtime == want.runtime and got.messages == want.messages
    assert got.optimizers[0].per_param_s == pytest.approx(want.optimizers[0].per_param_s) and got.p2p == cal.p2p
    assert got.elapsed_s == pytest.approx(3 * cal.elapsed_s)
    with pytest.raises(ConfigError, match=r"calibration\.profiles\[0\]\.model"):
        combine_calibrations([cal, replace(cal, profiles=(replace(cal.profiles[0], model="tiny-gpt"), cal.profiles[1]))])
    with pytest.raises(ConfigError, match="lengths differ"):
        combine_calibrations([cal, replace(cal, profiles=cal.profiles[:1])])
