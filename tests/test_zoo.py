"""Model zoo: exact parameter counts, block contract, fx tracing, deterministic per-block init."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from pipetrain.errors import ModelError
from pipetrain.planner.zoo import ModelSpec, PipelineModel, get_model_spec, init_block_, list_presets, materialize, tied_parameters
from pipetrain.planner.zoo.common import causal_attention

# Public counts: GPT-2 (Radford et al. 2019; Hugging Face GPT2LMHeadModel, tied head counted once),
# Llama 2 (Touvron et al. 2023; Meta checkpoints), BERT-large = Hugging Face BertForMaskedLM
# bert-large-uncased (BertModel with pooler: 335,141,888).
EXACT_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "bert-large": 335_174_458,
    "tiny-gpt": 224_640,
    "resmlp": 8 * (2 * 256 + 256 * 1024 + 1024 + 1024 * 256 + 256) + 256 * 10 + 10,
}


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_counts_on_meta(name: str) -> None:
    model = get_model_spec(name).build()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]  # parameters() dedups tied weights


def test_public_shapes() -> None:
    llama70 = get_model_spec("llama2-70b").build()
    layer = llama70.blocks[1]
    assert tuple(layer.wq.weight.shape) == (8192, 8192)
    assert tuple(layer.wk.weight.shape) == (1024, 8192)  # 8 KV heads of 128
    assert tuple(layer.w1.weight.shape) == (28672, 8192)
    assert len(llama70.blocks) == 82
    gpt2 = get_model_spec("gpt2").build()
    assert tuple(gpt2.blocks[0].wpe.weight.shape) == (1024, 768)
    assert gpt2.blocks[0].wte.weight is gpt2.blocks[-1].wte.weight
    assert tied_parameters(gpt2) == (("wte.weight", 0, (13,)),)
    assert tied_parameters(llama70) == ()
    assert get_model_spec("llama2-13b").build().blocks[1].w2.weight.shape == (5120, 13824)


def test_every_preset_blocks_map_one_tensor_to_one_tensor() -> None:
    for name in list_presets():
        spec = get_model_spec(name)
        model = spec.build()
        seq = min(spec.default_seq_len, 16)
        x = spec.example_input(2, seq)
        for block in model.blocks:
            x = block(x)
            assert isinstance(x, torch.Tensor)
        expected = (2, seq, spec.vocab_size) if spec.task == "lm" else (2, spec.vocab_size)
        assert tuple(x.shape) == expected, name


@pytest.mark.parametrize("name", list_presets())
def test_presets_are_fx_traceable(name: str) -> None:
    gm = torch.fx.symbolic_trace(get_model_spec(name).build())
    ops = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert len(ops) > 10


def test_tiny_gpt_fx_graph_runs_like_eager() -> None:
    spec = get_model_spec("tiny-gpt")
    model = spec.build("cpu", seed=5)
    gm = torch.fx.symbolic_trace(model)
    x = spec.example_input(2, 32, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(gm(x), model(x))
    attention_calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is causal_attention]
    assert len(attention_calls) == 4  # one leaf node per layer


def test_init_block_is_per_block_deterministic() -> None:
    spec = get_model_spec("tiny-gpt")
    whole = spec.build("cpu", seed=7)
    part = spec.build()  # meta
    materialize(part, "cpu", seed=7, blocks=[2, 3])
    for i in (2, 3):
        a = dict(whole.blocks[i].named_parameters())
        b = dict(part.blocks[i].named_parameters())
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert all(p.device.type == "meta" for p in part.blocks[1].parameters())
    other = spec.build("cpu", seed=8)
    assert not torch.equal(other.blocks[2].c_fc.weight, whole.blocks[2].c_fc.weight)
    # re-initializing one block reproduces it exactly
    before = whole.blocks[1].c_attn.weight.clone()
    with torch.no_grad():
        whole.blocks[1].c_attn.weight.zero_()
    init_block_(whole, 1, seed=7)
    assert torch.equal(whole.blocks[1].c_attn.weight, before)
    # GPT init: weights N(0, 0.02), biases 0, LayerNorm 1
    w = whole.blocks[1].c_fc.weight
    assert abs(w.std().item() - 0.02) < 0.002 and torch.count_nonzero(whole.blocks[1].c_fc.bias) == 0
    assert torch.equal(whole.blocks[1].ln_1.weight, torch.ones(64))


def test_tied_weight_identical_on_a_rank_holding_only_the_head() -> None:
    spec = get_model_spec("tiny-gpt")
    whole = spec.build("cpu", seed=3)
    assert whole.blocks[0].wte.weight is whole.blocks[-1].wte.weight
    head_only = spec.build()
    materialize(head_only, "cpu", seed=3, blocks=[len(head_only.blocks) - 1])
    assert torch.equal(head_only.blocks[-1].wte.weight, whole.blocks[0].wte.weight)
    assert torch.equal(head_only.blocks[-1].ln_f.weight, whole.blocks[-1].ln_f.weight)
    assert head_only.blocks[1].c_fc.weight.device.type == "meta"


def test_resnet_init_is_deterministic_and_runs() -> None:
    spec = get_model_spec("resnet")
    a, b = spec.build("cpu", seed=1), spec.build("cpu", seed=1)
    x = spec.example_input(2, None, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(a(x), b(x))
    bound = 1 / math.sqrt(3 * 3 * 3)  # stem conv fan-in 27: U(-1/sqrt(27), 1/sqrt(27))
    assert a.blocks[0].conv.weight.abs().max().item() <= bound


def test_lm_loss_at_init_is_log_vocab() -> None:
    spec = get_model_spec("tiny-gpt")
    model = spec.build("cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = spec.example_input(4, 64, "cpu", g), spec.example_target(4, 64, "cpu", g)
    out = model(x)
    loss = spec.loss(out, y)
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)  # near-uniform logits at init
    assert torch.allclose(loss, F.cross_entropy(out.reshape(-1, 256), y.reshape(-1)))
    assert spec.example_target(3, 10).shape == (3, 10)
    assert get_model_spec("resmlp").example_target(3).shape == (3,)


def test_causal_attention_matches_reference_with_gqa() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k = torch.randn(2, 2, 6, 8, generator=g)
    v = torch.randn(2, 2, 6, 8, generator=g)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    ref = scores.softmax(-1) @ vv
    assert torch.allclose(causal_attention(q, k, v, True), ref, atol=1e-5)
    meta = causal_attention(q.to("meta"), k.to("meta"), v.to("meta"), True)
    assert meta.shape == ref.shape


def test_unknown_model_lists_presets() -> None:
    with pytest.raises(ModelError, match="known presets: .*gpt2.*llama2-70b"):
        get_model_spec("gpt3")
    with pytest.raises(ModelError, match="cannot import module"):
        get_model_spec("no_such_pkg.mod:make")
    with pytest.raises(ModelError, match="has no callable"):
        get_model_spec("math:no_such_factory")
    with pytest.raises(ModelError, match="must return a pipetrain PipelineModel or ModelSpec"):
        get_model_spec("builtins:object")


def test_shape_checks() -> None:
    spec = get_model_spec("gpt2")
    assert spec.check_shape(1) == 1024
    with pytest.raises(ModelError, match="exceeds the context"):
        spec.check_shape(1, 1025)
    with pytest.raises(ModelError, match="micro-batch size"):
        spec.check_shape(0, 8)
    with pytest.raises(ModelError, match="sequence length must be"):
        spec.check_shape(1, 0)
    with pytest.raises(ModelError, match="no sequence length"):
        get_model_spec("resnet").check_shape(1, 16)
    assert get_model_spec("resnet").example_input(2).shape == (2, 3, 32, 32)


def test_user_factory_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from pipetrain.planner.zoo import PipelineModel, ModelSpec

        class Emb(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.e = torch.nn.Embedding(50, 8)
            def forward(self, x):
                return self.e(x)

        def make():
            return PipelineModel([Emb(), torch.nn.Linear(8, 50)], ["emb", "out"])

        def make_spec():
            return ModelSpec(name="mine", task="lm", default_seq_len=12, vocab_size=50, factory=make)

        def bad_tie():
            shared = torch.nn.Linear(8, 8)
            a, b = torch.nn.Module(), torch.nn.Module()
            a.x, b.y = shared, shared
            return PipelineModel([a, b])
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = get_model_spec("my_models:make")
    assert isinstance(spec, ModelSpec) and spec.vocab_size == 50 and spec.task == "lm"
    model = spec.build()
    assert isinstance(model, PipelineModel) and model.block_names == ("emb", "out")
    assert sum(p.numel() for p in model.parameters()) == 50 * 8 + 8 * 50 + 50
    assert get_model_spec("my_models:make_spec").default_seq_len == 12
    with pytest.raises(ModelError, match="share the submodule"):
        get_model_spec("my_models:bad_tie")
