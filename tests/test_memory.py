"""Memory model: bytes per parameter, activations, recompute, buffers, tied copies, and the
infeasibility message. Synthetic graphs here; tests/test_profile.py checks the activation
bytes against autograd's saved tensors on real models."""

from __future__ import annotations

import pytest

from pipetrain.errors import ConfigError, InfeasibleError
from pipetrain.graph import Edge, LayerGraph, Node, TiedParam
from pipetrain.memory import (
    GiB,
    activation_bytes_per_microbatch,
    bytes_per_param,
    check_stage_memory,
    stage_input_bytes,
    stage_memory,
)


def chain(n: int = 4, *, dtype: str = "fp32") -> LayerGraph:
    """embed -> n-2 blocks -> head, with a tied embedding/head weight of 1000 params."""
    nodes = [Node(name="embed", kind="embedding", fwd_flops=0, bwd_flops=0, param_count=1000, param_bytes=4000,
                  output_bytes=512, output_shape=(2, 8, 8), saved_bytes=128)]
    nodes += [Node(name=f"b{i}", kind="block", fwd_flops=1e6, bwd_flops=2e6, wgrad_flops=1e6, param_count=100 * (i + 1),
                   param_bytes=400 * (i + 1), output_bytes=512, output_shape=(2, 8, 8), saved_bytes=3000 + i)
              for i in range(n - 2)]
    nodes.append(Node(name="head", kind="head", fwd_flops=2e6, bwd_flops=4e6, wgrad_flops=2e6, param_count=10, param_bytes=40,
                      output_bytes=8000, output_shape=(2, 8, 125), saved_bytes=9000))
    edges = tuple(Edge(src=i, dst=i + 1) for i in range(n - 1))
    tied = (TiedParam(name="wte.weight", owner=0, users=(n - 1,), param_count=1000, param_bytes=4000),)
    return LayerGraph(model="synthetic", granularity="block", micro_batch_size=2, seq_len=8, dtype=dtype,
                      nodes=tuple(nodes), edges=edges, input_shape=(2, 8), input_dtype="int64", tied=tied)


def test_bytes_per_param_table() -> None:
    assert bytes_per_param("fp32", "adamw").total == 16
    mp = bytes_per_param("bf16", "adamw")
    assert (mp.weights, mp.grads, mp.optimizer, mp.total) == (2, 2, 12, 16)
    assert bytes_per_param("fp32", "sgd").total == 8
    assert bytes_per_param("fp32", "sgd", momentum=True).total == 12
    assert bytes_per_param("fp16", "sgd").total == 8
    with pytest.raises(ConfigError, match="optimizer 'lion'"):
        bytes_per_param("fp32", "lion")
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        bytes_per_param("int8", "adamw")


def test_stage_memory_components_by_hand() -> None:
    g = chain(4)
    m = stage_memory(g, 1, 3, in_flight=3, buffers=2)
    assert m.param_count == 100 + 200
    assert (m.weights_bytes, m.grads_bytes, m.optimizer_bytes) == (1200, 1200, 2400)
    assert m.tied_bytes == 0
    assert m.activation_bytes == 3 * (3000 + 3001)
    assert m.recompute_working_bytes == 0
    assert m.buffer_bytes == 2 * 512 + 512  # two activation slots in, one gradient slot from the next stage
    assert m.total_bytes == 4800 + 18003 + 1536


def test_recompute_keeps_each_layer_input_plus_one_layer_working_set() -> None:
    g = chain(6)
    full = stage_memory(g, 1, 5, in_flight=4)
    rc = stage_memory(g, 1, 5, in_flight=4, recompute=True)
    act = activation_bytes_per_microbatch(g, 1, 5)
    assert full.activation_bytes == 4 * act
    # Megatron's per-layer checkpoint: four layers' 512-byte inputs per micro-batch, and one
    # layer (the largest, b3 with 3003 saved bytes) recomputed at a time
    assert rc.activation_bytes == 4 * 4 * 512 and rc.recompute_working_bytes == 3003
    assert rc.total_bytes < full.total_bytes
    # the first stage keeps the token ids when it recomputes: 2*8 int64
    assert stage_input_bytes(g, 0) == 128
    assert stage_memory(g, 0, 2, in_flight=2, recompute=True).activation_bytes == 2 * (128 + 512)


def test_tied_head_copy_costs_full_state_on_the_last_stage() -> None:
    g = chain(4)
    last = stage_memory(g, 3, 4, in_flight=1)
    assert last.tied_bytes == 1000 * 16
    assert last.buffer_bytes == 512  # no gradient arrives at the last stage
    whole = stage_memory(g, 0, 4, in_flight=1)
    assert whole.tied_bytes == 0 and whole.buffer_bytes == 0


def test_mixed_precision_uses_graph_dtype() -> None:
    g = chain(4, dtype="bf16")
    m = stage_memory(g, 1, 3, in_flight=1)
    assert (m.weights_bytes, m.grads_bytes, m.optimizer_bytes) == (600, 600, 3600)
    assert stage_memory(g, 1, 3, in_flight=1, optimizer="sgd").optimizer_bytes == 1200


def test_infeasible_message_names_the_numbers_and_fixes() -> None:
    g = chain(4)
    m = stage_memory(g, 1, 3, in_flight=3)
    check_stage_memory(m, m.total_bytes, stage=1)  # exactly fits
    with pytest.raises(InfeasibleError) as exc:
        check_stage_memory(m, m.total_bytes - 1, stage=3, device="node0/gpu3")
    msg = str(exc.value)
    assert msg.startswith(f"stage 3 needs {m.total_bytes / GiB:.1f} GiB") and "node0/gpu3" in msg
    assert "raise pp, lower micro-batch size or enable recompute" in msg and "\n" not in msg
    rc = stage_memory(g, 1, 3, in_flight=3, recompute=True)
    with pytest.raises(InfeasibleError, match="lower micro-batch size$"):
        check_stage_memory(rc, 1, stage=0)


@pytest.mark.parametrize("kw", [dict(in_flight=0), dict(in_flight=1, buffers=0)])
def test_bad_arguments(kw: dict) -> None:
    with pytest.raises(ConfigError):
        stage_memory(chain(4), 0, 2, **kw)
    with pytest.raises(ConfigError, match="not within"):
        stage_memory(chain(4), 2, 9, in_flight=1)


def test_last_stage_carries_the_loss_activations() -> None:
    g = chain(4)  # head output (2, 8, 125): fp32 log-softmax 2000*4 B + int64 targets 16*8 B
    assert activation_bytes_per_microbatch(g, 3, 4) == 9000 + 8128
    assert activation_bytes_per_microbatch(g, 3, 4, include_loss=False) == 9000
    assert stage_memory(g, 2, 4, in_flight=2).activation_bytes == 2 * (3001 + 9000 + 8128)


def test_autocast_weight_copies_default_on_for_half_precision_and_per_microbatch() -> None:
    from pipetrain.memory import autocast_cast_params

    g = chain(4, dtype="bf16")  # embed (1000 params, tied to head), b0 100, b1 200, head 10
    assert autocast_cast_params(g, 0, 1) == 0  # an embedding lookup is not cast
    assert autocast_cast_params(g, 1, 3) == 300
    assert autocast_cast_params(g, 3, 4) == 10 + 1000  # the head casts the tied embedding weight
    assert autocast_cast_params(g, 0, 4) == 310 + 1000
    plain = stage_memory(g, 1, 3, in_flight=3, autocast_copies=False)
    amp = stage_memory(g, 1, 3, in_flight=3, autocast_copies=True)
    assert amp.activation_bytes - plain.activation_bytes == 3 * 2 * 300
    assert stage_memory(g, 1, 3, in_flight=3) == amp  # bf16 runs under autocast: on by default
    rc = stage_memory(g, 1, 3, in_flight=3, recompute=True, autocast_copies=True)
    # one layer recomputed at a time: the larger of b0 (3000 saved + 2 x 100 cast) and b1 (3001 + 2 x 200)
    assert rc.recompute_working_bytes == 3001 + 400
    # bf16-mixed keeps bf16 weights: no cast per micro-batch
    assert stage_memory(g, 1, 3, in_flight=3, precision="bf16-mixed").activation_bytes == plain.activation_bytes
    assert stage_memory(chain(4), 1, 3, in_flight=3, autocast_copies=True) == stage_memory(chain(4), 1, 3, in_flight=3)
