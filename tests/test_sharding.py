"""ZeRO's model-state bytes, Megatron's tensor-parallel communication and the ring collectives, against their papers."""

from __future__ import annotations

import pytest

from pipetrain.costs import ring_allreduce_time_s
from pipetrain.errors import ConfigError
from pipetrain.sharding import collective_time_s, model_state_bytes, param_state_bytes, tp_collectives_per_layer, tp_collectives_vocab
from pipetrain.topology import Link

PSI = 7.5e9  # the ZeRO paper's example: a 7.5B-parameter model
K = 12


@pytest.mark.parametrize("n", [1, 4, 64])
def test_zero_stages_are_the_papers_forms(n: int) -> None:
    # Rajbhandari et al. 2020, fig. 1: fp16 weights and gradients, K = 12 bytes of Adam state
    want = {0: (4 + K) * PSI, 1: 4 * PSI + K * PSI / n, 2: 2 * PSI + (2 + K) * PSI / n, 3: (4 + K) * PSI / n}
    for zero, total in want.items():
        got = model_state_bytes(PSI, zero=zero, dp=n, precision="fp16-mixed")
        assert got.total_bytes == pytest.approx(total, rel=1e-12), zero
    # the paper's headline figures at N = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB
    if n == 64:
        assert [round(model_state_bytes(PSI, zero=z, dp=n, precision="fp16-mixed").total_bytes / 1e9, 1) for z in range(4)] == \
            [120.0, 31.4, 16.6, 1.9]


def test_bf16_mixed_is_megatrons_distributed_optimizer_table() -> None:
    # Megatron-LM docs ("Distributed Optimizer"): bf16 params, fp32 grads: 18 bytes/param; 6 + 12/d sharded
    assert sum(param_state_bytes("bf16-mixed")) == 18
    for d in (1, 8, 32):
        got = model_state_bytes(1.0, zero=1, dp=d, precision="bf16-mixed")
        assert got.total_bytes == pytest.approx(6 + 12 / d, rel=1e-12)
        assert (got.weights_bytes, got.grads_bytes) == (2.0, 4.0)
    assert model_state_bytes(10.0, zero=2, dp=4, precision="bf16-mixed").total_bytes == pytest.approx(10 * (2 + 16 / 4))
    assert model_state_bytes(10.0, zero=0, dp=4, precision="amp-autocast").total_bytes == 10 * 16  # fp32 weights, grads, m, v
    assert model_state_bytes(10.0, zero=3, dp=5, precision="fp32", optimizer="sgd", momentum=True).total_bytes == 10 * 12 / 5


def test_bad_zero_inputs_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="zero must be one of"):
        model_state_bytes(1.0, zero=4, dp=2, precision="bf16-mixed")
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        model_state_bytes(1.0, zero=1, dp=2, precision="fp8")


def test_tp_volume_per_layer_is_megatrons_count() -> None:
    b, s, h = 4, 2048, 12288
    plain = tp_collectives_per_layer(micro_batch_size=b, seq_len=s, hidden=h, tp=8)
    # Shoeybi et al. 2019 fig. 4: 2 all-reduces of b*s*h forward, 2 backward, per layer
    assert [(c.kind, c.phase) for c in plain] == [("all_reduce", "F")] * 2 + [("all_reduce", "B")] * 2
    assert all(c.nbytes == b * s * h * 2 for c in plain)
    sp = tp_collectives_per_layer(micro_batch_size=b, seq_len=s, hidden=h, tp=8, sequence_parallel=True)
    assert sorted(c.kind for c in sp) == ["all_gather"] * 4 + ["reduce_scatter"] * 4
    # same bytes on the wire: an all-reduce is a reduce-scatter plus an all-gather (Korthikanti et al. 2022, 4.2.2)
    link = Link(kind="nvswitch", bandwidth_bytes_per_s=450e9, latency_s=0.0)
    t_plain = sum(collective_time_s(c.kind, c.nbytes, 8, link) for c in plain)
    t_sp = sum(collective_time_s(c.kind, c.nbytes, 8, link) for c in sp)
    assert t_plain == pytest.approx(t_sp, rel=1e-12)
    assert t_plain == pytest.approx(4 * 2 * 7 / 8 * b * s * h * 2 / 450e9, rel=1e-12)
    assert tp_collectives_per_layer(micro_batch_size=b, seq_len=s, hidden=h, tp=1) == ()


def test_vocabulary_parallel_collectives_are_megatrons() -> None:
    """The embedding all-reduces its b*s*h output forward; the head all-reduces its input's gradient
    backward, and the vocabulary-parallel cross-entropy three fp32 values per token forward (max,
    sum of exponentials, target logit); with sequence parallelism the same bytes as reduce-scatter
    and all-gather."""
    b, s, h = 2, 1024, 4096
    kw = {"micro_batch_size": b, "seq_len": s, "hidden": h, "dtype_bytes": 2}
    emb = tp_collectives_vocab("embedding", tp=4, **kw)
    assert [(c.kind, c.phase, c.nbytes) for c in emb] == [("all_reduce", "F", b * s * h * 2)]
    head = tp_collectives_vocab("head", tp=4, **kw)
    assert sorted((c.kind, c.phase, c.nbytes) for c in head) == sorted([("all_reduce", "F", b * s * 4)] * 3 + [("all_reduce", "B", b * s * h * 2)])
    emb_sp = tp_collectives_vocab("embedding", tp=4, sequence_parallel=True, **kw)
    assert [(c.kind, c.phase) for c in emb_sp] == [("reduce_scatter", "F"), ("all_gather", "B")]
    head_sp = tp_collectives_vocab("head", tp=4, sequence_parallel=True, **kw)
    assert [(c.kind, c.phase) for c in head_sp if c.nbytes == b * s * h * 2] == [("all_gather", "F"), ("reduce_scatter", "B")]
    assert tp_collectives_vocab("head", tp=1, **kw) == ()
    with pytest.raises(ConfigError, match="embedding"):
        tp_collectives_vocab("mlp", tp=2, **kw)


def test_ring_collectives_alpha_beta() -> None:
    link = Link(kind="infiniband", bandwidth_bytes_per_s=50e9, latency_s=5e-6)
    n, nbytes = 16, 1e9
    ag = collective_time_s("all_gather", nbytes, n, link)
    assert ag == pytest.approx(15 / 16 * nbytes / 50e9 + 15 * 5e-6)
    assert collective_time_s("reduce_scatter", nbytes, n, link) == ag
    assert collective_time_s("all_reduce", nbytes, n, link) == pytest.approx(2 * ag) == pytest.approx(ring_allreduce_time_s(nbytes, n, link))
    assert collective_time_s("all_gather", nbytes, 1, link) == 0.0
    with pytest.raises(ConfigError, match="collective kind"):
        collective_time_s("broadcast", nbytes, n, link)


def test_a_measured_collective_follows_its_measurements_between_sizes() -> None:
    from pipetrain.sharding import CollectiveFit

    fit = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=1e-4, per_byte_s=1e-9,
                        sizes_bytes=(1000, 3000, 2000), seconds=(2e-4, 8e-4, 4e-4))
    assert fit.time_s(0) == 0.0
    assert fit.time_s(500) == 2e-4  # below the smallest size: its time (latency-bound)
    assert fit.time_s(1500) == pytest.approx(3e-4)  # between 1000 and 2000 (sizes sorted)
    assert fit.time_s(2500) == pytest.approx(6e-4)
    assert fit.time_s(5000) == pytest.approx(8e-4 + 2000 * 1e-9)  # above: the largest + the fit's per-byte cost
    bare = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=1e-4, per_byte_s=1e-9)
    assert bare.time_s(1000) == pytest.approx(1e-4 + 1e-6)
