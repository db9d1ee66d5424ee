"""Executor data: deterministic sample order, even disjoint shards, built-in datasets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from pipetrain.errors import ConfigError
from pipetrain.executor.data import BatchSampler, make_source, stdlib_py_files, stdlib_text_tokens, warn_dropped


def test_sampler_shards_are_even_disjoint_and_deterministic() -> None:
    s = BatchSampler(num_samples=1000, micro_batch_size=3, num_microbatches=4, dp=2, seed=7)
    assert s.global_batch == 24 and s.steps_per_epoch == 41 and s.dropped_per_epoch == 1000 - 41 * 24
    ids = s.indices(5)
    assert ids.shape == (2, 4, 3)
    flat = ids.reshape(-1)
    assert len(set(flat.tolist())) == 24  # disjoint across replicas and micro-batches
    # every rank (first stage: inputs, last stage: targets) computes the same order, independently
    again = BatchSampler(num_samples=1000, micro_batch_size=3, num_microbatches=4, dp=2, seed=7)
    assert np.array_equal(again.indices(5), ids)
    other_seed = BatchSampler(num_samples=1000, micro_batch_size=3, num_microbatches=4, dp=2, seed=8)
    assert not np.array_equal(other_seed.indices(5), ids)


def test_one_epoch_visits_each_sample_at_most_once_and_epochs_reshuffle() -> None:
    s = BatchSampler(num_samples=100, micro_batch_size=2, num_microbatches=2, dp=3, seed=1)
    assert s.steps_per_epoch == 8 and s.dropped_per_epoch == 4
    epoch0 = np.concatenate([s.indices(k).reshape(-1) for k in range(8)])
    assert len(set(epoch0.tolist())) == 96 and epoch0.min() >= 0 and epoch0.max() < 100
    epoch1 = np.concatenate([s.indices(8 + k).reshape(-1) for k in range(8)])
    assert len(set(epoch1.tolist())) == 96
    assert not np.array_equal(epoch0, epoch1)


def test_remainder_is_dropped_with_a_warning() -> None:
    s = BatchSampler(num_samples=10, micro_batch_size=2, num_microbatches=2, dp=1, seed=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        warn_dropped(s, "toy")
    assert len(w) == 1 and "2 of 10 samples" in str(w[0].message)
    with pytest.raises(ConfigError, match="one step needs 12"):
        BatchSampler(num_samples=10, micro_batch_size=2, num_microbatches=3, dp=2, seed=0)


def test_stdlib_files_sorted_and_text_windows() -> None:
    files = stdlib_py_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == stdlib_py_files()
    toks = stdlib_text_tokens(max_bytes=200_000)
    assert len(toks) == 200_000 and toks.dtype == np.uint8
    assert bytes(toks[:64]) == files[0].read_bytes()[:64]
    src = make_source("stdlib-text", task="lm", seq_len=32, vocab_size=256, seed=0)
    x, y = src.inputs, src.targets
    assert x.shape[1] == 32 and y.shape == x.shape
    assert np.array_equal(x[5][1:], y[5][:-1])  # targets are the next bytes
    assert np.array_equal(x[6][0:1], y[5][-1:])  # consecutive, non-overlapping windows of seq_len+1
    assert b"def " in bytes(np.asarray(x[:200]).reshape(-1))


def test_npy_token_file(tmp_path: Path) -> None:
    toks = (np.arange(1000) % 50).astype(np.int32)
    np.save(tmp_path / "toks.npy", toks)
    src = make_source(str(tmp_path / "toks.npy"), task="lm", seq_len=9, vocab_size=50, seed=0)
    assert src.num_samples == (1000 - 1) // 9
    assert src.inputs[2].tolist() == list(range(18, 27)) and src.targets[2].tolist() == list(range(19, 28))
    with pytest.raises(ConfigError, match="vocabulary is 40"):
        make_source(str(tmp_path / "toks.npy"), task="lm", seq_len=9, vocab_size=40, seed=0)
    np.save(tmp_path / "f.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(ConfigError, match="1-D integer array"):
        make_source(str(tmp_path / "f.npy"), task="lm", seq_len=4, vocab_size=40, seed=0)
    with pytest.raises(ConfigError, match="does not exist"):
        make_source(str(tmp_path / "missing.npy"), task="lm", seq_len=4, vocab_size=40, seed=0)
    with pytest.raises(ConfigError, match="unknown"):
        make_source("imagenet", task="lm", seq_len=4, vocab_size=40, seed=0)


def test_synthetic_sources() -> None:
    lm = make_source("synthetic", task="lm", seq_len=16, vocab_size=100, seed=3, synthetic_samples=64)
    assert lm.num_samples == 64 and int(np.max(lm.inputs)) < 100
    again = make_source("synthetic", task="lm", seq_len=16, vocab_size=100, seed=3, synthetic_samples=64)
    assert np.array_equal(np.asarray(lm.inputs), np.asarray(again.inputs))
    cls = make_source("synthetic", task="classification", seq_len=1, vocab_size=10, seed=3, input_shape=(8,),
                      num_classes=10, synthetic_samples=32)
    assert cls.inputs.shape == (32, 8) and cls.inputs.dtype == np.float32 and int(cls.targets.max()) < 10
    with pytest.raises(ConfigError, match="task is 'classification'"):
        make_source("stdlib-text", task="classification", seq_len=1, vocab_size=10, seed=0)
