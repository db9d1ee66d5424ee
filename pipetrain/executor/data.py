"""Training data every rank can index identically, without shipping labels through the pipe.

A :class:`TokenDataset` / :class:`TensorDataset` is a fixed array of samples. A
:class:`BatchSampler` turns ``(seed, step)`` into the sample indices of every micro-batch of
every data-parallel replica: a seeded permutation per epoch, the global batch cut into ``dp``
even, disjoint, contiguous shards, each cut into ``m`` equal micro-batches. Since the order is
a pure function of ``(seed, step)``, the first stage loads only inputs, the last stage only
targets, and they agree without communicating. The remainder of an epoch that does not fill a
global batch is dropped (with a warning, once).

Built-in sources: ``synthetic`` (seeded random tokens or features), ``stdlib-text`` (bytes of the
Python standard library's own ``.py`` files, sorted, from ``sysconfig``) and a user ``.npy``
token file (read through a numpy memmap).
"""

from __future__ import annotations

import functools
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.errors import ConfigError

__all__ = [
    "DATASETS",
    "SampleSource",
    "BatchSampler",
    "stdlib_py_files",
    "stdlib_text_tokens",
    "make_source",
    "warn_dropped",
    "batch_tensor",
]

DATASETS = ("synthetic", "stdlib-text")
#: Cap on stdlib bytes read, so start-up stays fast; deterministic for a given Python.
STDLIB_MAX_BYTES = 4 << 20


@dataclass(frozen=True, kw_only=True)
class SampleSource:
    """``inputs[i]`` / ``targets[i]`` of sample ``i`` as numpy arrays (views, no copies)."""

    name: str
    inputs: Any  # np.ndarray [N, ...]
    targets: Any  # np.ndarray [N, ...]

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ConfigError(f"dataset {self.name}: {len(self.inputs)} inputs but {len(self.targets)} targets")
        if len(self.inputs) == 0:
            raise ConfigError(f"dataset {self.name} has no samples: use a longer token file or a shorter --seq-len")

    @property
    def num_samples(self) -> int:
        return int(len(self.inputs))


@dataclass(frozen=True, kw_only=True)
class BatchSampler:
    """Deterministic sample order: ``indices(step)[replica][microbatch] -> sample ids``."""

    num_samples: int
    micro_batch_size: int
    num_microbatches: int
    dp: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch > self.num_samples:
            raise ConfigError(
                f"the dataset has {self.num_samples} samples but one step needs {self.global_batch} "
                f"(micro_batch_size {self.micro_batch_size} x m {self.num_microbatches} x dp {self.dp}): use more data or a smaller batch"
            )

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_samples - self.steps_per_epoch * self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.seed, epoch, self.num_samples)

    def indices(self, step: int) -> np.ndarray:
        """Sample ids of 0-based ``step``, shaped ``[dp, m, micro_batch_size]``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        ids = perm[k * self.global_batch:(k + 1) * self.global_batch]
        return ids.reshape(self.dp, self.num_microbatches, self.micro_batch_size)


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    # once per epoch, not per step: a step needs a slice of it, and permuting a corpus of 10^5
    # windows costs milliseconds, which every rank would otherwise spend between two steps, on the
    # pipeline's critical path. Read-only, since every caller shares the cached array.
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def stdlib_py_files() -> list[Path]:
    """The standard library's own ``.py`` files, sorted by relative path (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError(f"the Python standard library directory {root} is missing: use --dataset synthetic or a .npy file")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath) / f
                out.append((str(p.relative_to(root)), p))
    out.sort()
    return [p for _, p in out]


def stdlib_text_tokens(max_bytes: int = STDLIB_MAX_BYTES) -> np.ndarray:
    """Bytes of the stdlib ``.py`` files in sorted order, concatenated, up to ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    for p in stdlib_py_files():
        try:
            b = p.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    return np.frombuffer(data, dtype=np.uint8)


def _windows(tokens: np.ndarray, seq_len: int, name: str) -> SampleSource:
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ConfigError(f"dataset {name} has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")
    # sample i = tokens[i*seq_len : i*seq_len + seq_len + 1]; inputs and targets are shifted views
    base = np.lib.stride_tricks.as_strided
    x = base(tokens, shape=(n, seq_len), strides=(tokens.strides[0] * seq_len, tokens.strides[0]), writeable=False)
    y = base(tokens[1:], shape=(n, seq_len), strides=(tokens.strides[0] * seq_len, tokens.strides[0]), writeable=False)
    return SampleSource(name=name, inputs=x, targets=y)


def make_source(dataset: str, *, task: str, seq_len: int, vocab_size: int, seed: int,
                input_shape: tuple[int, ...] = (), num_classes: int = 0,
                synthetic_samples: int = 4096) -> SampleSource:
    """Build the named dataset for a model (``task`` "lm" reads tokens, "classification" features)."""
    if dataset == "synthetic":
        rng = np.random.default_rng([seed, 7919])
        if task == "lm":
            toks = rng.integers(0, vocab_size, size=synthetic_samples * seq_len + 1, dtype=np.int64)
            return _windows(toks, seq_len, "synthetic")
        x = rng.standard_normal((synthetic_samples, *input_shape), dtype=np.float32)
        y = rng.integers(0, max(num_classes, 1), size=synthetic_samples, dtype=np.int64)
        return SampleSource(name="synthetic", inputs=x, targets=y)
    if task != "lm":
        raise ConfigError(f"dataset {dataset!r} holds tokens, but this model's task is {task!r}: use --dataset synthetic")
    if dataset == "stdlib-text":
        if vocab_size < 256:
            raise ConfigError(f"stdlib-text is byte-level (256 symbols) but the model's vocabulary is {vocab_size}: use a model with vocab >= 256")
        return _windows(stdlib_text_tokens(), seq_len, "stdlib-text")
    if dataset.endswith(".npy"):
        p = Path(dataset)
        if not p.is_file():
            raise ConfigError(f"token file {dataset!r} does not exist: give a .npy of token ids, or --dataset synthetic|stdlib-text")
        toks = np.load(p, mmap_mode="r")
        if toks.ndim != 1 or toks.dtype.kind not in "iu":
            raise ConfigError(f"token file {dataset!r} must be a 1-D integer array, got {toks.ndim}-D {toks.dtype}")
        hi = int(toks.max()) if len(toks) else 0
        if hi >= vocab_size or (len(toks) and int(toks.min()) < 0):
            raise ConfigError(f"token file {dataset!r} has ids up to {hi} but the model's vocabulary is {vocab_size}: re-tokenize or pick another model")
        return _windows(toks, seq_len, p.name)
    raise ConfigError(f"dataset {dataset!r} is unknown: use synthetic, stdlib-text or a PATH.npy token file")


def warn_dropped(sampler: BatchSampler, name: str) -> None:
    if sampler.dropped_per_epoch:
        warnings.warn(
            f"dataset {name}: {sampler.dropped_per_epoch} of {sampler.num_samples} samples per epoch do not fill a "
            f"global batch of {sampler.global_batch} and are dropped", stacklevel=2)


def batch_tensor(arr: Any, ids: np.ndarray, device: Any) -> Any:
    """The samples ``ids`` of ``arr`` as one tensor on ``device`` (int64 for integer data, else float32)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr[np.asarray(ids)]).astype(np.int64 if arr.dtype.kind in "iu" else np.float32)).to(device)
