from __future__ import annotations

import pytest

from pipetrain.errors import ConfigError
from pipetrain.validation.compare import StageParamDiff, compare_runs, tolerances_for

TOL = tolerances_for("fp32")


def test_identical_runs_pass_with_speedup() -> None:
    c = compare_runs(pipeline_loss=[3.0, 2.5], reference_loss=[3.0, 2.5], tolerances=TOL,
                     pipeline_tokens_per_s=150.0, reference_tokens_per_s=100.0,
                     params=[StageParamDiff(stage=0, max_abs=1e-7, rel=1e-8)])
    assert c.passed and c.first_divergence is None and c.speedup == pytest.approx(1.5)


def test_grad_norm_names_stage_and_step_before_loss_moves() -> None:
    # stage 1's gradient is wrong from step 2; the loss only moves at step 3
    c = compare_runs(pipeline_loss=[3.0, 2.5, 2.4], reference_loss=[3.0, 2.5, 2.2],
                     pipeline_grad_norms=[[1.0, 2.0], [1.0, 2.6], [1.0, 2.0]],
                     reference_grad_norms=[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], tolerances=TOL)
    assert not c.passed
    assert (c.first_divergence.step, c.first_divergence.stage) == (2, 1)
    assert "step 2 in stage 1" in c.messages[0]


def test_loss_only_divergence_and_param_failure() -> None:
    c = compare_runs(pipeline_loss=[3.0, 2.6], reference_loss=[3.0, 2.5], tolerances=TOL,
                     params=[StageParamDiff(stage=0, max_abs=0.0, rel=0.0), StageParamDiff(stage=1, max_abs=1e-2, rel=1e-3)])
    assert c.first_divergence.step == 2 and c.first_divergence.stage is None
    assert c.max_loss_rel_diff == pytest.approx(0.04)
    assert any("stage 1 final parameters" in m for m in c.messages)


def test_mismatched_lengths_is_a_user_error() -> None:
    with pytest.raises(ConfigError, match="same number of steps"):
        compare_runs(pipeline_loss=[1.0], reference_loss=[1.0, 2.0], tolerances=TOL)


def test_several_stages_off_names_the_one_off_the_most() -> None:
    # a bug in stage 1 leaks into stage 0 through a tied weight; stage 1 is off the most
    c = compare_runs(pipeline_loss=[3.0], reference_loss=[3.0], pipeline_grad_norms=[[1.1, 3.0]],
                     reference_grad_norms=[[1.0, 2.0]], tolerances=TOL)
    assert (c.first_divergence.step, c.first_divergence.stage) == (1, 1)
