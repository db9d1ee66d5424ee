"""Hugging Face models (``hf:NAME_OR_PATH``): built from transformers configs shipped here or written by
the tests (HF_HUB_OFFLINE: nothing reaches a hub), against the transformers models themselves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# before transformers is imported (huggingface_hub reads it once); the executor's workers inherit it
os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from pipetrain.cli import main  # noqa: E402
from pipetrain.errors import ModelError  # noqa: E402
from pipetrain.planner.trace import trace_graph  # noqa: E402
from pipetrain.planner.zoo import get_model_spec  # noqa: E402
from pipetrain.planner.zoo.hf import HF_PRESETS, SUPPORTED_FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: one tiny config per supported family; Llama with GQA, Mistral with a sliding window shorter than
#: the test sequences, Qwen2 with a head tied to the embedding and attention biases
TINY: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0},
    "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 64,
              "rope_theta": 500000.0, "bos_token_id": 0, "eos_token_id": 0},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 1, "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 64,
                "sliding_window": 5, "bos_token_id": 0, "eos_token_id": 0},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 64,
              "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0},
}


def write_config(directory: Path, cfg: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def hf_model(config_source: str, attn: str = "sdpa") -> Any:
    """The plain transformers model of a config (meta when built inside a meta device context)."""
    config = transformers.AutoConfig.from_pretrained(config_source)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def graph_params(name: str) -> int:
    g = trace_graph(name, micro_batch_size=1, seq_len=8)
    return sum(n.param_count for n in g.nodes)


@pytest.mark.parametrize("preset", HF_PRESETS)
def test_shipped_presets_count_what_transformers_counts(preset: str) -> None:
    with torch.device("meta"):
        want = hf_model(str(ROOT / "pipetrain/planner/zoo/hf_configs" / f"{preset}.json")).num_parameters()
    assert graph_params(f"hf:{preset}") == want
    # fp32 master weights although the Llama and Mistral configs record bfloat16
    assert {p.dtype for p in get_model_spec(f"hf:{preset}").build("meta").parameters()} == {torch.float32}
    # the public sizes: GPT-2 124M, Llama-3-8B 8.03B, Mistral-7B 7.24B
    assert want == {"gpt2": 124_439_808, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096}[preset]


def test_gpt2_blocks_kinds_tie_and_layer_shape() -> None:
    g = trace_graph("hf:gpt2", micro_batch_size=2, seq_len=32)
    assert [n.kind for n in g.nodes] == ["embedding", *["transformer"] * 12, "head"]
    assert [(t.name, t.owner, t.users) for t in g.tied] == [("wte.weight", 0, (13,))]
    layer = g.nodes[1].layer
    assert layer is not None and (layer.hidden, layer.heads, layer.kv_heads, layer.ffn_hidden, layer.gated_mlp) == (768, 12, 12, 3072, False)
    # same matmuls as the zoo's own GPT-2, block by block (attention counted causal, as flash computes it)
    zoo = trace_graph("gpt2", micro_batch_size=2, seq_len=32)
    assert [n.fwd_flops for n in g.nodes] == [n.fwd_flops for n in zoo.nodes]
    assert [n.bwd_flops for n in g.nodes] == [n.bwd_flops for n in zoo.nodes]


def test_llama_3_8b_gqa_shape_and_flash_saved_bytes() -> None:
    g = trace_graph("hf:llama-3-8b", micro_batch_size=1, seq_len=2048, dtype="bf16")
    layer = g.nodes[1].layer
    assert layer is not None and (layer.hidden, layer.heads, layer.kv_heads, layer.ffn_hidden, layer.gated_mlp) == (4096, 32, 8, 14336, True)
    assert g.tied == () and g.nodes[-1].output_shape == (1, 2048, 128256)
    # the meta trace runs the flash kernel: saved bytes grow linearly in T (the math path would save
    # the T x T scores, 32 heads x 2048^2 x 2 bytes = 256 MiB more at 2048)
    half = trace_graph("hf:llama-3-8b", micro_batch_size=1, seq_len=1024, dtype="bf16")
    assert g.nodes[1].saved_bytes == 2 * half.nodes[1].saved_bytes


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_tiny_family_counts_and_logits_equal_transformers(family: str, tmp_path: Path) -> None:
    """Parameters equal ``num_parameters()``; the pipeline's blocks, from the pipeline's initial weights
    loaded into the transformers model by name, give that model's logits."""
    path = write_config(tmp_path / family, TINY[family])
    name = f"hf:{path}"  # a config.json file; the directory form is tested with weights below
    spec = get_model_spec(name)
    pipe = spec.build("cpu", seed=3)
    ref = hf_model(str(path))
    assert graph_params(name) == ref.num_parameters()
    loaded = ref.load_state_dict(pipe.hf_state_dict(), strict=False)
    assert set(loaded.missing_keys) <= {"lm_head.weight"} and not loaded.unexpected_keys  # a tied head: its embedding
    ref.eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = pipe(ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    if family == "mistral":  # the sliding window (5 < 12 tokens) matters: plain causal attention differs
        ref.config.sliding_window = None
        ref.model.config.sliding_window = None
        with torch.no_grad():
            assert not torch.allclose(ref(input_ids=ids).logits, want, atol=1e-3)
    ties = {"gpt2": "wte.weight", "qwen2": "embed_tokens.weight"}
    assert [t[0] for t in _ties(pipe)] == ([ties[family]] if family in ties else [])


def _ties(model: Any) -> Any:
    from pipetrain.planner.zoo import tied_parameters

    return tied_parameters(model)


def test_unsupported_architecture_names_the_families(tmp_path: Path) -> None:
    write_config(tmp_path, {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 96, "vocab_size": 300})
    with pytest.raises(ModelError, match="'bert' is not supported.*gpt2, llama, mistral, qwen2"):
        get_model_spec(f"hf:{tmp_path}")


def test_bad_references_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no config.json"):
        get_model_spec(f"hf:{tmp_path}")
    with pytest.raises(ModelError, match="cannot load a config from 'no-such-org/no-such-model'"):
        get_model_spec("hf:no-such-org/no-such-model")  # offline: neither cached nor fetched


def test_cli_without_transformers_is_one_error_line() -> None:
    """Importing pipetrain and tracing's modules imports no transformers; with it missing (None in
    sys.modules makes its import fail), an hf: model is one `error:` line naming the extra, exit 2."""
    code = ("import sys\n"
            "import pipetrain, pipetrain.planner.trace, pipetrain.planner.zoo\n"
            "from pipetrain.cli import main\n"
            "assert 'transformers' not in sys.modules\n"
            "sys.modules['transformers'] = None\n"
            "sys.exit(main(['graph', 'hf:gpt2']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install -e '.[hf]'" in lines[0], r.stderr


def test_plan_llama_3_8b_on_one_dgx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "hf:llama-3-8b", "--topology", "dgx-h100:1", "--global-batch", "64", "--seq-len", "1024",
                 "--pp", "4", "--schedule", "1f1b", "--no-pin-cost", "--top-k", "1", "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    # tp = 1: the executor does not split Hugging Face modules over tensor-parallel ranks, so the
    # planner does not offer tp for them (it would on the zoo's llama; simulation-only plans may)
    assert plan["model"] == "hf:llama-3-8b" and plan["pp"] == 4 and plan["tp"] == 1 and plan["pp"] * plan["dp"] == 8
    assert plan["stages"][0]["block_start"] == 0 and plan["stages"][-1]["block_end"] == 34  # embed, 32 layers, head
    assert "predicted" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_weights_of_a_saved_directory_are_loaded(family: str, tmp_path: Path) -> None:
    config = transformers.AutoConfig.for_model(**TINY[family])
    torch.manual_seed(1)
    saved = transformers.AutoModelForCausalLM.from_config(config)
    saved.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    spec = get_model_spec(f"hf:{tmp_path}")
    assert "weights from the directory" in spec.description
    pipe = spec.build("cpu", seed=0)
    want = dict(saved.named_parameters())
    checked = 0
    for i, block in enumerate(pipe.blocks):
        for n, p in block.named_parameters():
            assert torch.equal(p, want[pipe.hf_names[i][n]]), (i, n)
            checked += 1
    assert checked == len(list(saved.parameters())) + (1 if family == "gpt2" else 0)  # the tied wte in the head too
    # a random init from the same config differs: the values came from the file
    (tmp_path / "model.safetensors").unlink()
    fresh = get_model_spec(f"hf:{tmp_path}").build("cpu", seed=0)
    assert not torch.equal(fresh.blocks[1].layer.mlp.c_fc.weight if family == "gpt2" else fresh.blocks[1].layer.mlp.up_proj.weight,
                           pipe.blocks[1].layer.mlp.c_fc.weight if family == "gpt2" else pipe.blocks[1].layer.mlp.up_proj.weight)


# ----- the executor: one torchrun launch, pp=2 on gloo, against LlamaForCausalLM itself -------------------
EXEC_CFG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 256, "max_position_embeddings": 64,
            "bos_token_id": 0, "eos_token_id": 0}
STEPS, M, MBS, SEQ = 3, 2, 2, 16


def _hf_losses(config_path: Path, name: str, seed: int) -> tuple[list[float], list[float]]:
    """Train LlamaForCausalLM as the pipeline defines a step (m micro-batches, loss / m, clip 1.0, AdamW default lr),
    from the pipeline's initial weights, on the executor's data; its losses and gradient norms."""
    from pipetrain.executor.data import BatchSampler, batch_tensor, make_source
    from pipetrain.executor.optim import OptimConfig, clip_coefficient, make_optimizer, squared_norms

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the kernels' reduction order depends on it
    try:
        ref = hf_model(str(config_path))
        ref.load_state_dict(get_model_spec(name).build("cpu", seed=seed).hf_state_dict(), strict=True)
        ref.train()
        params = list(ref.parameters())
        opt = make_optimizer(params, OptimConfig(name="adamw"))
        source = make_source("synthetic", task="lm", seq_len=SEQ, vocab_size=EXEC_CFG["vocab_size"], seed=seed)
        sampler = BatchSampler(num_samples=source.num_samples, micro_batch_size=MBS, num_microbatches=M, dp=1, seed=seed)
        losses, norms = [], []
        for step in range(STEPS):
            for p in params:
                p.grad = None
            total = 0.0
            for ids in sampler.indices(step)[0]:
                x, y = batch_tensor(source.inputs, ids, "cpu"), batch_tensor(source.targets, ids, "cpu")
                loss = F.cross_entropy(ref(input_ids=x).logits.flatten(0, -2).float(), y.flatten())
                (loss / M).backward()
                total += float(loss.detach())
            norm = math.sqrt(sum(squared_norms([p.grad for p in params if p.grad is not None])))
            coef = clip_coefficient(norm, 1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
            opt.step()
            losses.append(total / M)
            norms.append(norm)
        return losses, norms
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_executor_pp2_matches_llama_for_causal_lm(tmp_path: Path) -> None:
    from pipetrain.executor.plans import simple_plan
    from pipetrain.executor.result import load_result

    config_path = write_config(tmp_path / "tiny-llama", EXEC_CFG)
    name = f"hf:{config_path}"  # absolute: the torchrun workers resolve it again
    plan = simple_plan(name, pp=2, m=M, mbs=MBS, seq_len=SEQ, schedule="1f1b")
    assert [(s.block_start, s.block_end) for s in plan.stages] == [(0, 3), (3, 6)]
    plan.save(tmp_path / "plan.json")
    r = subprocess.run([sys.executable, "-m", "pipetrain.executor.launch", str(tmp_path / "plan.json"), "--run-dir",
                        str(tmp_path / "run"), "--steps", str(STEPS)], capture_output=True, text=True, timeout=150,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = load_result(tmp_path / "run")
    want_losses, want_norms = _hf_losses(config_path, name, plan.seed)
    assert len(res.losses) == STEPS
    for got, want in zip(res.losses, want_losses):
        assert abs(got - want) <= 1e-5 * abs(want), (res.losses, want_losses)
    for got, want in zip(res.grad_norms, want_norms):
        assert abs(got - want) <= 1e-5 * want, (res.grad_norms, want_norms)
    assert want_losses[-1] < want_losses[0]  # the optimizer moved the weights between the compared steps


def test_planner_offers_tp_to_hf_modules_only_for_simulation() -> None:
    """The executor splits the zoo's blocks over tp, not Hugging Face modules: unpinned, the search
    tries tp > 1 for the zoo's llama and for an hf: llama only when the plan is simulation-only."""
    from pipetrain.planner.job import Job
    from pipetrain.planner.search import _parallelism
    from pipetrain.planner.trace import trace_graph
    from pipetrain.topology import topology_preset

    topo = topology_preset("dgx-h100:1")
    graph = trace_graph("tiny-llama", micro_batch_size=1, seq_len=16)  # its 4 heads split 1, 2 or 4 ways
    for model, sim_only, want in (("llama2-7b", False, (1, 2, 4)), ("hf:llama-3-8b", False, (1,)),
                                  ("hf:llama-3-8b", True, (1, 2, 4))):
        job = Job(model=model, topology="dgx-h100:1", global_batch=8, seq_len=16, simulation_only=sim_only)
        assert _parallelism(job, topo, graph, "gpu").tps == want, (model, sim_only)
