"""Wrong input, generated: every broken plan JSON or job YAML is one ``error:`` line and exit 2.

Hypothesis mutates a valid plan (tiny-gpt, pp=2) and a valid job into ones that are well-shaped
but wrong: negative or zero counts, boundaries out of range, an unknown schedule, a fingerprint
of another model, values of the wrong type, missing and unknown keys, and text that is not JSON
or YAML at all. Each goes through the CLI in process (``cli.main``): ``pipetrain simulate PLAN``
and ``pipetrain plan JOB``. No traceback, no hang, nothing but one line on stderr.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipetrain.cli import main

pytestmark = pytest.mark.timeout(120)

#: a valid plan for tiny-gpt (6 blocks) at pp=2: what pipetrain.executor.plans.simple_plan writes
BASE_PLAN: dict[str, Any] = {
    "model": "tiny-gpt", "graph_fingerprint": "cd53d0ea1beaf03ea6d17571ec9bae208c88d723dcbd59ef84d2c4fc993857e9",
    "topology": "local", "pp": 2, "dp": 1, "micro_batch_size": 2, "num_microbatches": 4, "seq_len": 16, "schedule": "1f1b",
    "stages": [
        {"index": 0, "block_start": 0, "block_end": 3, "rank": 0, "device": "cpu", "buffers": 2, "recompute": False,
         "inputs": [], "outputs": [{"shape": [2, 16, 64], "dtype": "float32"}],
         "predicted_peak_memory_bytes": 0.0, "memory_cap_bytes": 0.0},
        {"index": 1, "block_start": 3, "block_end": 6, "rank": 1, "device": "cpu", "buffers": 1, "recompute": False,
         "inputs": [{"shape": [2, 16, 64], "dtype": "float32"}], "outputs": [],
         "predicted_peak_memory_bytes": 0.0, "memory_cap_bytes": 0.0},
    ],
    "chunks": 1, "dtype": "fp32", "optimizer": "adamw", "seed": 0, "predicted": None, "alternatives": [],
    "simulation_only": False, "schema_version": 2,
}
BASE_JOB: dict[str, Any] = {"model": "tiny-gpt", "topology": "local-cpu:2", "global_batch": 8, "seq_len": 16}

_COUNTS = ["pp", "dp", "micro_batch_size", "num_microbatches", "seq_len", "chunks"]
_STAGE_INTS = ["index", "block_start", "block_end", "rank", "buffers"]
_WRONG_TYPES = st.sampled_from(["four", [1, 2], {"a": 1}, None, 1.5, True])


def _plan_mutation() -> st.SearchStrategy[Any]:
    """(description, mutate(plan dict) -> plan dict | raw text): each one makes the plan invalid."""
    def set_top(key: str, value: Any) -> Any:
        def f(d: dict[str, Any]) -> dict[str, Any]:
            d[key] = value
            return d
        return f

    def set_stage(i: int, key: str, value: Any) -> Any:
        def f(d: dict[str, Any]) -> dict[str, Any]:
            d["stages"][i][key] = value
            return d
        return f

    def drop(key: str) -> Any:
        def f(d: dict[str, Any]) -> dict[str, Any]:
            del d[key]
            return d
        return f

    return st.one_of(
        st.builds(lambda k, v: (f"{k}={v}", set_top(k, v)), st.sampled_from(_COUNTS), st.integers(-10**6, 0)),
        st.builds(lambda k, v: (f"{k}={v!r}", set_top(k, v)), st.sampled_from(_COUNTS + ["schedule", "dtype", "model"]), _WRONG_TYPES),
        st.builds(lambda v: (f"schedule={v}", set_top("schedule", v)), st.text(min_size=1, max_size=12).filter(
            lambda s: s not in ("gpipe", "1f1b", "interleaved", "zb-h1"))),
        st.builds(lambda v: (f"fingerprint={v}", set_top("graph_fingerprint", v)), st.text("0123456789abcdef", min_size=64, max_size=64).filter(
            lambda s: s != BASE_PLAN["graph_fingerprint"])),
        st.builds(lambda i, k, v: (f"stage{i}.{k}={v}", set_stage(i, k, v)), st.integers(0, 1), st.sampled_from(_STAGE_INTS),
                  st.integers(-50, -1)),
        st.builds(lambda v: (f"stage1.block_end={v}", set_stage(1, "block_end", v)), st.integers(7, 10**6)),
        st.builds(lambda v: (f"stage0.block_end={v}", set_stage(0, "block_end", v)), st.integers(4, 6)),
        st.builds(lambda k: (f"missing {k}", drop(k)), st.sampled_from(["model", "pp", "stages", "schedule", "graph_fingerprint"])),
        st.builds(lambda k: (f"unknown key {k}", set_top(k, 1)), st.text("abcxyz_", min_size=3, max_size=10).filter(lambda s: s not in BASE_PLAN)),
        st.builds(lambda v: (f"schema_version={v}", set_top("schema_version", v)), st.integers(3, 99)),
        st.builds(lambda n: ("truncated", lambda d: json.dumps(d)[:n]), st.integers(0, 200)),
        st.just(("stages=[]", set_top("stages", []))),
        st.just(("model=no-such-model", set_top("model", "no-such-model"))),
    )


def _job_mutation() -> st.SearchStrategy[Any]:
    def with_(key: str, value: Any) -> Any:
        return lambda d: {**d, key: value}

    return st.one_of(
        st.builds(lambda k, v: (f"{k}={v}", with_(k, v)), st.sampled_from(["global_batch", "seq_len", "pp", "dp", "microbatches"]),
                  st.integers(-10**6, 0)),
        # None means "search it" for the knobs, so only other wrong types here
        st.builds(lambda k, v: (f"{k}={v!r}", with_(k, v)), st.sampled_from(["global_batch", "model", "topology", "schedule"]),
                  _WRONG_TYPES.filter(lambda v: v is not None)),
        st.builds(lambda k: (f"unknown key {k}", with_(k, 1)), st.text("abcxyz_", min_size=3, max_size=10).filter(lambda s: s not in BASE_JOB)),
        st.builds(lambda v: (f"schedule={v}", with_("schedule", v)), st.text("abcdefgh-", min_size=1, max_size=10).filter(
            lambda s: s not in ("gpipe", "1f1b", "interleaved", "zb-h1"))),
        st.just(("model=no-such-model", with_("model", "no-such-model"))),
        st.just(("topology=mars:3", with_("topology", "mars:3"))),
        st.just(("not a mapping", lambda d: "- just\n- a list\n")),
        st.just(("bad yaml", lambda d: "model: [unclosed\n")),
        st.just(("pp beyond blocks", with_("pp", 64))),
    )


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


_DIR = Path(tempfile.mkdtemp(prefix="pipetrain-fuzz-"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_plan_mutation())
def test_broken_plan_is_one_error_line(capsys: pytest.CaptureFixture[str], mutation: Any) -> None:
    what, mutate = mutation
    out = mutate(copy.deepcopy(BASE_PLAN))
    path = _DIR / "plan.json"
    path.write_text(out if isinstance(out, str) else json.dumps(out))
    capsys.readouterr()
    code = main(["simulate", str(path)])
    err = capsys.readouterr().err
    assert code == 2, (what, err)
    _one_error_line(err)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_job_mutation())
def test_broken_job_is_one_error_line(capsys: pytest.CaptureFixture[str], mutation: Any) -> None:
    what, mutate = mutation
    out = mutate(dict(BASE_JOB))
    path = _DIR / "job.yaml"
    path.write_text(out if isinstance(out, str) else yaml.safe_dump(out))
    capsys.readouterr()
    code = main(["plan", str(path), "--no-pin-cost"])
    err = capsys.readouterr().err
    assert code == 2, (what, err)
    _one_error_line(err)


def test_the_unbroken_inputs_are_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    """The mutations start from inputs that work: the failures above are the mutations' doing."""
    path = _DIR / "ok.json"
    path.write_text(json.dumps(BASE_PLAN))
    assert main(["simulate", str(path)]) == 0
    job = _DIR / "ok.yaml"
    job.write_text(yaml.safe_dump(BASE_JOB))
    assert main(["plan", str(job), "--no-pin-cost"]) == 0
    capsys.readouterr()
