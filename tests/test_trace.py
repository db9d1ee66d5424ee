"""Tracing models into LayerGraphs: FLOPs, saved bytes, DAG cuts, JSON, fingerprints."""

from __future__ import annotations

import pytest

from pipetrain.errors import ConfigError, ModelError
from pipetrain.graph import LayerGraph
from pipetrain.planner.trace import model_fingerprint, trace_graph
from pipetrain.planner.zoo.gpt import GPT_PRESETS
from pipetrain.planner.zoo.llama import LLAMA_PRESETS


def _kaplan_fwd_per_token(n_params: int, n_layer: int, n_ctx: int, d_model: int) -> float:
    """Kaplan et al. 2020, Table 1: C_forward ~= 2 N + 2 n_layer n_ctx d_model per token.

    N here is the full parameter count (tied weights once, embeddings included). Kaplan's
    N excludes embeddings, but that form leaves out the LM head matmul (2 d vocab FLOPs per
    token, 29% of GPT-2's forward); the full N counts it and overcounts only the input
    embedding lookups, which do no matmul (0.6% for GPT-2, 1.8% for Llama 2 7B). The
    attention term 2 n_layer n_ctx d matches a causal mask counted as computed (half the
    score entries), which is how trace.flop_formulas counts it.
    """
    return 2 * n_params + 2 * n_layer * n_ctx * d_model


@pytest.mark.parametrize("name,cfgs", [("gpt2", GPT_PRESETS), ("llama2-7b", LLAMA_PRESETS)])
def test_forward_flops_match_the_standard_estimate_and_backward_is_twice(name: str, cfgs: dict) -> None:
    cfg = cfgs[name]
    g = trace_graph(name, micro_batch_size=1, seq_len=cfg.n_ctx)
    tokens = g.micro_batch_size * g.seq_len
    est = _kaplan_fwd_per_token(g.param_count, cfg.n_layer, cfg.n_ctx, cfg.d_model)
    per_token = g.fwd_flops / tokens
    assert abs(per_token / est - 1) < 0.03, (per_token, est)
    assert g.bwd_flops / g.fwd_flops == pytest.approx(2.0, rel=0.10)
    # the gap is the embedding lookup (and norms/biases): the traced value is below the estimate
    assert per_token < est


def test_tiny_gpt_flops_exact() -> None:
    """Per layer: 12 d^2 matmul MACs per token, plus causal attention over T(T+1)/2 pairs."""
    b, t, d, h = 2, 128, 64, 4
    g = trace_graph("tiny-gpt", micro_batch_size=b)
    layer = g.nodes[1]
    matmul = 2 * b * t * 12 * d * d
    attention = 2 * 2 * b * h * (d // h) * (t * (t + 1) // 2)
    assert layer.fwd_flops == matmul + attention == 29_392_896
    assert layer.bwd_flops == 2 * layer.fwd_flops
    assert layer.wgrad_flops == matmul  # weight grads of the four linears; attention has no weights
    head = g.nodes[-1]
    assert head.fwd_flops == 2 * b * t * d * 256 and head.wgrad_flops == head.fwd_flops
    assert g.nodes[0].fwd_flops == 0 and g.nodes[0].param_count == 256 * 64 + 128 * 64
    assert head.param_count == 2 * d  # ln_f only: the tied wte counts at its owner
    assert [(t.name, t.owner, t.users, t.param_count) for t in g.tied] == [("wte.weight", 0, (5,), 256 * 64)]
    assert g.param_count == 224_640


def test_saved_bytes_count_activations_once_and_exclude_parameters() -> None:
    g = trace_graph("resmlp", micro_batch_size=4)
    block = g.nodes[0]
    b, d, hidden = 4, 256, 1024
    # LayerNorm input + its mean and rstd [4,1], fc1 input, gelu input, fc2 input; fp32
    expected = 4 * (b * d + 2 * b + b * d + b * hidden + b * hidden)
    assert block.saved_bytes == expected == 40_992
    assert block.param_bytes == 4 * (2 * d + d * hidden + hidden + hidden * d + d)
    assert block.output_bytes == 4 * b * d and block.output_shape == (4, 256)
    # the first block's input is data and needs no gradient, so all its backward work serves the
    # weights (fc1's input grad is still needed, for the LayerNorm weight): wgrad == bwd == 2 fwd
    assert block.bwd_flops == block.wgrad_flops == 2 * block.fwd_flops == 4 * 2 * b * d * hidden
    stem = trace_graph("resnet", micro_batch_size=2).nodes[0]  # conv straight on the image: no dgrad at all
    assert stem.bwd_flops == stem.wgrad_flops == stem.fwd_flops == 2 * 2 * 32 * 32 * 32 * 3 * 9
    assert g.nodes[1].bwd_flops == 2 * g.nodes[1].fwd_flops and g.nodes[1].wgrad_flops == g.nodes[1].fwd_flops
    ops = trace_graph("resmlp", micro_batch_size=4, granularity="op")
    assert ops.bwd_flops == g.bwd_flops and ops.fwd_flops == g.fwd_flops


def test_bf16_halves_bytes_not_flops() -> None:
    a = trace_graph("tiny-gpt", micro_batch_size=2, seq_len=64)
    b = trace_graph("tiny-gpt", micro_batch_size=2, seq_len=64, dtype="bf16")
    assert b.fwd_flops == a.fwd_flops and b.bwd_flops == a.bwd_flops
    assert 2 * b.param_bytes == a.param_bytes
    assert 2 * b.nodes[1].output_bytes == a.nodes[1].output_bytes and b.nodes[1].output_dtype == "bfloat16"
    assert b.fingerprint == a.fingerprint


def test_resnet_cut_inside_a_residual_block_carries_two_tensors() -> None:
    g = trace_graph("resnet", micro_batch_size=2, granularity="op")
    names = [n.name for n in g.nodes]
    k = names.index("blocks_1_conv1") + 1  # after the first conv of the first residual block
    cut = g.cut(k)
    assert [t.name for t in cut.tensors] == ["relu", "blocks_1_conv1"]  # the skip (block input) and the branch
    assert [t.shape for t in cut.tensors] == [(2, 32, 32, 32), (2, 32, 32, 32)]
    assert [t.bytes for t in cut.tensors] == [262_144, 262_144]
    assert cut.bytes == 524_288 == 2 * (2 * 32 * 32 * 32 * 4)
    between = g.cut(names.index("relu_2") + 1)  # after the block's final relu: one tensor
    assert [t.name for t in between.tensors] == ["relu_2"] and between.bytes == 262_144
    assert g.param_count == trace_graph("resnet", micro_batch_size=2).param_count == 696_618
    # the downsampling block's 1x1 skip conv is a parallel branch: a DAG, not a chain
    assert any(e.dst - e.src > 1 for e in g.edges)


def test_op_granularity_totals_match_block_granularity() -> None:
    blocks = trace_graph("tiny-gpt", micro_batch_size=2, seq_len=32)
    ops = trace_graph("tiny-gpt", micro_batch_size=2, seq_len=32, granularity="op")
    assert ops.fwd_flops == blocks.fwd_flops
    assert ops.bwd_flops == blocks.bwd_flops
    assert ops.param_count == blocks.param_count
    assert sum(n.wgrad_flops for n in ops.nodes) == sum(n.wgrad_flops for n in blocks.nodes)
    assert len(ops.tied) == 1 and ops.tied[0].param_count == 256 * 64


def test_json_round_trip(tmp_path) -> None:
    for g in (trace_graph("gpt2", micro_batch_size=2, seq_len=256, dtype="bf16"),
              trace_graph("resnet", micro_batch_size=2, granularity="op")):
        again = LayerGraph.from_json(g.to_json())
        assert again == g and again.fingerprint == g.fingerprint
        assert [c.bytes for c in again.cuts] == [c.bytes for c in g.cuts]
    path = g.save(tmp_path / "g.json")
    assert LayerGraph.load(path) == g


def test_model_fingerprint_equals_traced_fingerprint() -> None:
    g = trace_graph("gpt2", micro_batch_size=1, seq_len=128)
    assert model_fingerprint("gpt2") == g.fingerprint
    assert trace_graph("gpt2", micro_batch_size=4, seq_len=64, dtype="fp16").fingerprint == g.fingerprint
    assert model_fingerprint("gpt2-medium") != g.fingerprint
    assert model_fingerprint("resnet") == trace_graph("resnet", micro_batch_size=3).fingerprint


def test_llama2_70b_traces_on_meta_with_repeated_layers_reused() -> None:
    g = trace_graph("llama2-70b", micro_batch_size=1, seq_len=512, dtype="bf16")
    assert g.num_nodes == 82 and g.param_count == 68_976_648_192
    assert g.param_bytes == 2 * 68_976_648_192
    assert len({(n.fwd_flops, n.saved_bytes) for n in g.nodes[1:-1]}) == 1
    est = 2 * g.param_count + 2 * 80 * 512 * 8192
    assert abs(g.fwd_flops / 512 / est - 1) < 0.03


def test_bad_arguments() -> None:
    with pytest.raises(ModelError, match="exceeds the context"):
        trace_graph("tiny-gpt", micro_batch_size=1, seq_len=129)
    with pytest.raises(ModelError, match="micro-batch size"):
        trace_graph("tiny-gpt", micro_batch_size=0)
    with pytest.raises(ConfigError, match="dtype"):
        trace_graph("tiny-gpt", micro_batch_size=1, dtype="fp8")
    with pytest.raises(ConfigError, match="granularity"):
        trace_graph("tiny-gpt", micro_batch_size=1, granularity="layer")


def test_untraceable_user_model_is_a_model_error(tmp_path, monkeypatch) -> None:
    (tmp_path / "odd_models.py").write_text(
        "import torch\n"
        "from pipetrain.planner.zoo import PipelineModel\n"
        "class DataDependent(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.e = torch.nn.Embedding(10, 4)\n"
        "    def forward(self, x):\n"
        "        return self.e(x) * 2 if x.sum().item() > 0 else self.e(x)\n"
        "def make():\n"
        "    return PipelineModel([DataDependent()])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="failed on the meta device"):
        trace_graph("odd_models:make", micro_batch_size=1, seq_len=4)
    with pytest.raises(ModelError, match="use --granularity block"):
        trace_graph("odd_models:make", micro_batch_size=1, seq_len=4, granularity="op")
