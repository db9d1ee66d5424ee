"""`pipetrain plan` and `pipetrain sweep` as a user runs them: outputs, pins, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipetrain.cli import main
from pipetrain.errors import PlanError
from pipetrain.plan import Plan
from pipetrain.program.catalog import RUNNABLE_SCHEDULES

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-gpt", "--topology", "local-cpu:2", "--global-batch", "16", "--seq-len", "64", "--dtype", "fp32"]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_plan_example_config_writes_a_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", str(ROOT / "examples/tiny-gpt-cpu.yaml"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stages" in text and "alternatives" in text and "predicted (simpy)" in text and "pins cost" in text
    plan = Plan.load(out)
    assert plan.model == "tiny-gpt" and plan.pp == 2 and plan.global_batch == 16
    assert plan.schedule in RUNNABLE_SCHEDULES and not plan.simulation_only
    assert plan.predicted is not None and plan.predicted.step_time_s > 0
    assert all(st.predicted_peak_memory_bytes <= st.memory_cap_bytes for st in plan.stages)
    assert plan.stages[1].inputs and plan.stages[1].inputs[0].shape[-1] == 64  # tiny-gpt's hidden size crosses the cut


def test_every_knob_pinned_by_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", *TINY, "--pp", "2", "--dp", "1", "--microbatches", "8", "--schedule", "1f1b", "--buffers", "2,1",
            "--recompute", "1,0", "--boundaries", "3", "--json", "--no-pin-cost"]
    assert main(args) == 0
    plan = Plan.from_dict(json.loads(capsys.readouterr().out))
    assert (plan.pp, plan.dp, plan.num_microbatches, plan.micro_batch_size, plan.schedule) == (2, 1, 8, 2, "1f1b")
    assert [st.buffers for st in plan.stages] == [2, 1] and [st.recompute for st in plan.stages] == [True, False]
    assert plan.boundaries == (3,)


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--model", "no-such-model", "--topology", "local-cpu:2", "--global-batch", "8", "--seq-len", "64"], "unknown model"),
    (["plan", "--model", "tiny-gpt", "--topology", "dgx-z9:2", "--global-batch", "8", "--seq-len", "64"], "unknown topology preset"),
    (["plan", *TINY, "--pp", "9"], "no plan fits"),
    (["plan", *TINY, "--schedule", "warp"], "schedule 'warp' is unknown"),
    (["plan", "--model", "llama2-7b", "--topology", "local-cpu:2", "--global-batch", "8", "--seq-len", "4096",
      "--recompute", "false"], "no plan fits"),
    (["plan", *TINY, "--max-memory", "lots"], "max_memory"),
    (["sweep", *TINY, "--vary", "q=1,2"], "unknown knob 'q'"),
])
def test_wrong_input_is_one_line_and_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert needle in _one_line_error(capsys)


def test_config_typo_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: tiny-gpt\ntopology: local-cpu:2\nglobal_bach: 16\nseq_len: 64\n")
    assert main(["plan", str(cfg)]) == 2
    assert "unknown key 'global_bach' (did you mean 'global_batch'?)" in _one_line_error(capsys)


def test_simulation_only_what_if(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import pipetrain.planner.search as search_mod
    import pipetrain.program.catalog as catalog_mod

    for mod in (search_mod, catalog_mod):  # an executor without zb-h1
        monkeypatch.setattr(mod, "RUNNABLE_SCHEDULES", ("gpipe", "1f1b", "interleaved"))
    assert main(["plan", *TINY, "--schedule", "zb-h1"]) == 2
    assert "simulation-only" in _one_line_error(capsys)
    assert main(["plan", *TINY, "--pp", "2", "--schedule", "zb-h1", "--simulation-only", "--json", "--no-pin-cost"]) == 0
    plan = Plan.from_dict(json.loads(capsys.readouterr().out))
    assert plan.schedule == "zb-h1" and plan.simulation_only


def test_plan_for_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipetrain.planner.explain import plan_sim_input
    from pipetrain.planner.trace import trace_graph

    out = tmp_path / "plan.json"
    assert main(["plan", *TINY, "--pp", "2", "-o", str(out), "--no-pin-cost"]) == 0
    plan = Plan.load(out)
    other = trace_graph("gpt2", micro_batch_size=plan.micro_batch_size, seq_len=64, dtype="fp32")
    with pytest.raises(PlanError, match="made for model 'tiny-gpt'"):
        plan_sim_input(plan, graph=other)
    mine = trace_graph("tiny-gpt", micro_batch_size=plan.micro_batch_size, seq_len=64, dtype="fp32")
    from pipetrain.simulator import simulate

    assert simulate(plan_sim_input(plan, graph=mine)).step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-12)


def test_plan_from_a_graph_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipetrain.planner.trace import trace_graph

    g = trace_graph("tiny-gpt", micro_batch_size=2, seq_len=64, dtype="fp32")
    path = g.save(tmp_path / "g.json")
    assert main(["plan", "--graph", str(path), "--topology", "local-cpu:2", "--global-batch", "16", "--seq-len", "64",
                 "--pp", "2", "--json", "--no-pin-cost"]) == 0
    plan = Plan.from_dict(json.loads(capsys.readouterr().out))
    assert plan.model == "tiny-gpt" and plan.micro_batch_size == 2 and plan.graph_fingerprint == g.fingerprint


def test_sweep_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", *TINY, "--pp", "2", "--vary", "m=2,8", "--vary", "schedule=gpipe,1f1b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["m"], r["schedule"]) for r in rows] == [(2, "gpipe"), (2, "1f1b"), (8, "gpipe"), (8, "1f1b")]
    assert all(r["error"] is None and r["step_time_s"] > 0 for r in rows)
    by = {(r["m"], r["schedule"]): r for r in rows}
    assert by[(8, "1f1b")]["bubble_fraction"] < by[(2, "1f1b")]["bubble_fraction"]  # more micro-batches, smaller bubble
    assert main(["sweep", *TINY, "--pp", "2", "--vary", "bandwidth=1e6,1e10"]) == 0
    assert "sweep of tiny-gpt" in capsys.readouterr().out


def test_memory_caps_and_job_keys_parse() -> None:
    from pipetrain.errors import ConfigError
    from pipetrain.planner.job import job_from_mapping, parse_memory

    assert parse_memory("70GiB") == (70 * 2**30, None)
    assert parse_memory("80GB") == (80e9, None)
    assert parse_memory("75e9") == (75e9, None)
    assert parse_memory(1024) == (1024.0, None)
    assert parse_memory("90%") == (None, 0.9)
    for bad in ("0%", "120%", "-5GiB", "lots", True):
        with pytest.raises(ConfigError):
            parse_memory(bad)
    job = job_from_mapping({"model": "m", "topology": "t", "global-batch": 8, "seq_len": 4, "buffers": "2,1",
                            "recompute": [True, "no"], "boundaries": [3], "max_memory": "50%"})
    assert job.buffers == (2, 1) and job.recompute == (True, False) and job.boundaries == (3,) and job.max_memory_fraction == 0.5
    assert job.pinned == {"buffers": (2, 1), "recompute": (True, False), "boundaries": (3,)}
    with pytest.raises(ConfigError, match="not global_batch"):
        job_from_mapping({"model": "m", "topology": "t", "global_batch": 8, "seq_len": 4, "dp": 2, "microbatches": 3,
                          "microbatch_size": 1})


def test_sweep_device_type(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", "--model", "gpt2", "--topology", "dgx-h100:1", "--global-batch", "64", "--seq-len", "256", "--pp", "2",
            "--vary", "device=h100-sxm,a100-80g", "--json"]
    assert main(argv) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    # same plan space, a slower chip (312 vs 989 dense bf16 TFLOP/s): a longer step
    assert rows["a100-80g"]["step_time_s"] > 1.5 * rows["h100-sxm"]["step_time_s"]
    assert main(argv[:-3] + ["--vary", "device=tpu-v9"]) == 2
    assert "device type 'tpu-v9' is unknown" in _one_line_error(capsys)
