"""Hugging Face decoder models (``hf:NAME_OR_PATH``) as pipeline blocks, built on meta from a config.

``hf:REF`` resolves a ``transformers`` config, in this order:

1. a preset shipped in ``hf_configs/`` (``hf:gpt2``, ``hf:llama-3-8b``, ``hf:mistral-7b``): no network,
   even where a hub model of the same name exists (the shipped files are those models' public
   configs; write a local directory of the same name as a path, ``hf:./gpt2``);
2. an existing path: a directory holding ``config.json``, or a ``config.json`` file itself;
3. anything else is a hub name, resolved as ``transformers.AutoConfig.from_pretrained`` does
   (the local cache, then the network unless ``HF_HUB_OFFLINE=1``).

The ``*ForCausalLM`` model is built from the config on the meta device and cut into blocks that
hold its own modules: the token (and, for GPT-2, position) embeddings; one block per decoder
layer; the final norm and the LM head. A head tied to the embedding (GPT-2) holds the embedding
module itself, under the same name, so the pipeline shares one Parameter. A decoder-layer block
rebuilds what the HF model's forward passes its layers: position ids ``0..T-1``, the rotary
``position_embeddings`` (Llama, Mistral, Qwen2) and no attention mask: the attention function
this module registers with ``transformers`` (``pipetrain``) is causal (with the layer's sliding
window where the sequence is longer than it) and on meta runs the fused CPU flash kernel, as
:func:`~pipetrain.planner.zoo.common.causal_attention` does, so traced saved bytes are those of
a flash-attention run, not of the math path's T x T scores; on real tensors it is
``transformers``' own sdpa attention.

Dropout is switched off in the config: pipetrain's runs are a pure function of (seed, step), and
the single-process reference must reproduce the pipeline's losses. Weights: random by
pipetrain's per-block rules (``zoo.init``) unless the ``hf:`` path is a directory with weights
(``model.safetensors``, ``pytorch_model.bin`` or their sharded indices), which then overwrite
the drawn ones wherever blocks are materialized (the executor's ranks, the reference).

``transformers`` is optional (``pip install -e '.[hf]'``): it is imported here, inside functions,
only when an ``hf:`` model is resolved.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipetrain.errors import ModelError
from pipetrain.graph import LayerShape
from pipetrain.planner.zoo.common import ModelSpec, PipelineModel

__all__ = ["HF_PRESETS", "SUPPORTED_FAMILIES", "HFEmbedding", "HFDecoderLayer", "HFHead", "HFPipelineModel", "hf_spec",
           "hf_presets", "weight_files"]

#: ``config.model_type`` of the supported decoder families.
SUPPORTED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
_PRESET_DIR = Path(__file__).resolve().parent / "hf_configs"
#: Shipped configs (public ones of these models), by the name ``hf:NAME`` resolves first.
HF_PRESETS = ("gpt2", "llama-3-8b", "mistral-7b")
_ATTN = "pipetrain"  # the attention implementation registered with transformers
#: The dropout fields of the supported configs, zeroed (see the module docstring).
_DROPOUTS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "summary_first_dropout")
_WEIGHT_INDICES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_presets() -> tuple[str, ...]:
    return tuple(f"hf:{n}" for n in HF_PRESETS)


def _transformers(name: str) -> Any:
    """Import transformers (typed Any: its lazy module confuses type checkers) and register the attention."""
    try:
        tf = importlib.import_module("transformers")
    except ImportError:
        raise ModelError(f"model {name!r} needs the optional `transformers` package: pip install -e '.[hf]'") from None
    registry = getattr(tf, "AttentionInterface", None)
    if registry is not None:
        if _ATTN not in registry._global_mapping:
            registry.register(_ATTN, _attention)
        return tf
    # transformers < 4.51 keeps the attention functions in a plain dict
    functions = getattr(importlib.import_module("transformers.modeling_utils"), "ALL_ATTENTION_FUNCTIONS", None)
    if not isinstance(functions, dict):
        raise ModelError(f"model {name!r}: transformers {tf.__version__} is too old (no attention-function registry); "
                         "pip install -e '.[hf]' (transformers>=4.50)")
    functions.setdefault(_ATTN, _attention)
    return tf


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               sliding_window: int | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention over [B, H, T, hd] (k/v may have fewer heads); returns [B, T, H, hd].

    The blocks pass no mask, so causality is this function's (whatever ``is_causal`` the caller
    passes: these are decoders): a band mask where the layer's sliding window is shorter than the
    sequence (HF's ``sliding_window_overlay``: key > query - window), else ``is_causal``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t = query.size(-2)
    if attention_mask is None and sliding_window is not None and t > sliding_window:
        i = torch.arange(t, device=query.device)
        attention_mask = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window))[None, None]
    elif attention_mask is None and query.device.type == "meta":
        # the kernel F.scaled_dot_product_attention picks on CPU; on meta sdpa falls back to the math path
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scaling)[0]
        return out.transpose(1, 2), None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    is_causal=attention_mask is None, **kwargs)
    return out, None


# ----- resolving the config ---------------------------------------------------------------------------
def _resolve(name: str, ref: str, tf: Any) -> tuple[Any, Path | None]:
    """The config of ``hf:ref`` and the directory it came from (where weights may be)."""
    if not ref:
        raise ModelError(f"model {name!r}: write hf:NAME_OR_PATH (a shipped preset {', '.join(HF_PRESETS)}, "
                         "a directory with config.json, a config.json path, or a hub name)")
    if ref in HF_PRESETS:
        source, where = str(_PRESET_DIR / f"{ref}.json"), None
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"model {name!r}: directory {path} has no config.json; point hf: at a directory "
                                 "saved by save_pretrained or at a config.json file")
            source, where = str(path), path
        elif path.is_file():
            source, where = str(path), None
        else:
            source, where = ref, None
    try:
        config = tf.AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - not found, offline, malformed JSON: all the user's reference
        raise ModelError(f"model {name!r}: transformers cannot load a config from {source!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give a shipped preset "
                         f"({', '.join(HF_PRESETS)}), a directory with config.json, a config.json path, or a hub name "
                         "that is in the local cache or reachable (HF_HUB_OFFLINE unset)") from None
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(f"model {name!r}: architecture {family!r} is not supported; pipetrain builds the decoder "
                         f"families {', '.join(SUPPORTED_FAMILIES)} (model_type in config.json)")
    for field in _DROPOUTS:
        if getattr(config, field, None):
            setattr(config, field, 0.0)
    config.use_cache = False
    return config, where


def weight_files(directory: Path) -> tuple[Path, ...]:
    """The checkpoint files of a save_pretrained directory (sharded or not); () when it has none."""
    for index in _WEIGHT_INDICES:
        if (directory / index).is_file():
            shards = json.loads((directory / index).read_text(encoding="utf-8")).get("weight_map", {})
            return tuple(directory / f for f in dict.fromkeys(shards.values()))
    return tuple(directory / f for f in _WEIGHT_FILES if (directory / f).is_file())[:1]


# ----- the blocks ---------------------------------------------------------------------------------------
class HFEmbedding(nn.Module):
    """Token ids [B, T] -> hidden [B, T, d]: the HF model's token embedding, plus GPT-2's positions."""

    kind = "embedding"

    def __init__(self, modules: dict[str, nn.Module], signature: tuple[Any, ...]) -> None:
        super().__init__()
        for attr, module in modules.items():  # the HF model's own attribute names (wte/wpe, embed_tokens)
            self.add_module(attr, module)
        self.token_attr = next(iter(modules))
        self.trace_signature = signature

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.get_submodule(self.token_attr)(ids)
        if "wpe" in self._modules:  # GPT-2: learned positions 0..T-1, as GPT2Model.forward adds them
            x = x + self.get_submodule("wpe")(torch.arange(ids.size(1), device=ids.device))
        return x


class HFDecoderLayer(nn.Module):
    """One HF decoder layer; hidden [B, T, d] -> [B, T, d] with what the HF model would pass it.

    The rotary embedding is kept out of the module tree (a CPU copy per device, made on first
    use): its ``inv_freq`` buffer is derived from the config, and ``zoo.init`` zeroes floating
    buffers of materialized blocks.
    """

    kind = "transformer"

    def __init__(self, layer: nn.Module, *, rotary: nn.Module | None, signature: tuple[Any, ...], shape: LayerShape) -> None:
        super().__init__()
        self.layer = layer
        self.trace_signature = signature
        self.layer_shape = shape
        self._rotary: dict[str, nn.Module] = {} if rotary is None else {"cpu": rotary}

    def _position_embeddings(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, T, head_dim] as the HF model's rotary_emb gives them, on x's device and dtype."""
        if x.device.type == "meta":  # computed on CPU (transformers < 5 opens an autocast on x's device type)
            cpu_pos = torch.arange(pos.size(-1), device="cpu").unsqueeze(0)
            cos, sin = self._rotary["cpu"](torch.empty(0, dtype=x.dtype, device="cpu"), cpu_pos)
            return cos.to(x.device), sin.to(x.device)
        key = str(x.device)
        if key not in self._rotary:
            self._rotary[key] = copy.deepcopy(self._rotary["cpu"]).to(x.device)
        cos, sin = self._rotary[key](x, pos)
        return cos, sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rotary:
            pos = torch.arange(x.size(1), device=x.device).unsqueeze(0)
            out = self.layer(x, attention_mask=None, position_ids=pos, position_embeddings=self._position_embeddings(x, pos))
        else:  # GPT-2: positions were added by the embedding block
            out = self.layer(x, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple


class HFHead(nn.Module):
    """Hidden [B, T, d] -> logits [B, T, vocab]: final norm, then the LM head (or the tied embedding)."""

    kind = "head"

    def __init__(self, norm_attr: str, norm: nn.Module, *, lm_head: nn.Module | None, tied: tuple[str, nn.Module] | None,
                 signature: tuple[Any, ...]) -> None:
        super().__init__()
        self.add_module(norm_attr, norm)
        self.norm_attr = norm_attr
        if tied is not None:  # the embedding block's module under its name: one Parameter, same name
            self.add_module(tied[0], tied[1])
        else:
            self.add_module("lm_head", lm_head)
        self.tied_attr = None if tied is None else tied[0]
        self.trace_signature = signature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.get_submodule(self.norm_attr)(x)
        if self.tied_attr is not None:
            return F.linear(h, self.get_submodule(self.tied_attr).get_parameter("weight"))
        out: torch.Tensor = self.get_submodule("lm_head")(h)
        return out


class HFPipelineModel(PipelineModel):
    """The blocks of one HF model, with each parameter's name in the HF model (``hf_names``)."""

    def __init__(self, blocks: list[nn.Module], names: list[str], *, init_std: float, hf_names: tuple[dict[str, str], ...],
                 weights_dir: Path | None, base_prefix: str) -> None:
        super().__init__(blocks, names, init_std=init_std)
        self.hf_names = hf_names
        self.weights_dir = weights_dir
        self.base_prefix = base_prefix

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The blocks' parameters under their names in the HF model (a tied one once)."""
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            for name, p in block.named_parameters():
                out.setdefault(self.hf_names[i][name], p.detach())
        return out

    def load_pretrained_(self, blocks: Iterable[int]) -> None:
        """Overwrite the given (materialized) blocks' parameters with the directory's checkpoint."""
        if self.weights_dir is None:
            return
        files = weight_files(self.weights_dir)
        if not files:
            return
        wanted = {i: dict(self.blocks[i].named_parameters()) for i in blocks}
        found: dict[str, torch.Tensor] = {}
        keys = {self.hf_names[i][n] for i, ps in wanted.items() for n in ps}
        for f in files:
            found.update(_read_tensors(f, keys, self.base_prefix))
        with torch.no_grad():
            for i, params in wanted.items():
                for name, p in params.items():
                    key = self.hf_names[i][name]
                    if key not in found:
                        raise ModelError(f"{self.weights_dir}: the checkpoint has no tensor {key!r} (block "
                                         f"{self.block_names[i]}, {name}); save the model with save_pretrained from the "
                                         "same config, or move the weights out of the directory for a random init")
                    t = found[key]
                    if tuple(t.shape) != tuple(p.shape):
                        raise ModelError(f"{self.weights_dir}: tensor {key!r} has shape {list(t.shape)}, the config "
                                         f"gives {list(p.shape)}: the weights and config.json disagree")
                    p.copy_(t.to(p.dtype))


def _aliases(key: str, prefix: str) -> tuple[str, ...]:
    """A parameter's HF name as checkpoints may spell it: base models are saved without the prefix."""
    if key.startswith(prefix + "."):
        return (key, key[len(prefix) + 1:])
    return (key, f"{prefix}.{key}")


def _read_tensors(path: Path, keys: set[str], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``keys`` (under any alias) found in one checkpoint file, by their model name."""
    if path.suffix == ".safetensors":
        safetensors = importlib.import_module("safetensors")
        out: dict[str, torch.Tensor] = {}
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            present = set(f.keys())
            for key in keys:
                alias = next((a for a in _aliases(key, prefix) if a in present), None)
                if alias is not None:
                    out[key] = f.get_tensor(alias)
        return out
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    found = {key: next((a for a in _aliases(key, prefix) if a in state), None) for key in keys}
    return {key: state[a] for key, a in found.items() if a is not None}


# ----- building -----------------------------------------------------------------------------------------
def _layer_shape(config: Any, family: str) -> LayerShape:
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    if family == "gpt2":
        ffn = int(config.n_inner or 4 * hidden)
        return LayerShape(hidden=hidden, heads=heads, kv_heads=heads, ffn_hidden=ffn, attention="flash", causal=True)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return LayerShape(hidden=hidden, heads=heads, kv_heads=kv, ffn_hidden=int(config.intermediate_size), gated_mlp=True,
                      attention="flash", causal=True)


def _build(name: str, config: Any, weights_dir: Path | None) -> HFPipelineModel:
    tf = _transformers(name)
    config = copy.deepcopy(config)  # from_config records the attention choice on it
    try:
        hf = tf.AutoModelForCausalLM.from_config(config, attn_implementation=_ATTN)
    except Exception as exc:  # noqa: BLE001 - an inconsistent config (heads not dividing hidden, ...)
        raise ModelError(f"model {name!r}: transformers cannot build {type(config).__name__}: {type(exc).__name__}: {exc}; "
                         "fix the config") from None
    # fp32 parameters whatever dtype the config records (Llama-3's says bfloat16): they are the
    # master weights; tracing and the executor apply the plan's dtype themselves
    hf = hf.float()
    family = config.model_type
    key = config.to_json_string(use_diff=False)  # equal configs and layer types trace once
    layer_types = list(getattr(config, "layer_types", None) or [None] * config.num_hidden_layers)
    if family == "gpt2":
        base, prefix = hf.transformer, "transformer"
        embed_modules: dict[str, nn.Module] = {"wte": base.wte, "wpe": base.wpe}
        layers, norm_attr, rotary = list(base.h), "ln_f", None
    else:
        base, prefix = hf.model, "model"
        embed_modules = {"embed_tokens": base.embed_tokens}
        layers, norm_attr = list(base.layers), "norm"
        with torch.device("cpu"):  # the real inv_freq, whatever device the model is built on
            rotary = type(base.rotary_emb)(config=hf.config)
    token_attr, token = next(iter(embed_modules.items()))
    tied = (token_attr, token) if hf.lm_head.weight is token.weight else None
    shape = _layer_shape(config, family)
    blocks: list[nn.Module] = [HFEmbedding(embed_modules, ("hf-embed", key))]
    blocks += [HFDecoderLayer(layer, rotary=rotary, signature=("hf-layer", key, layer_types[i]), shape=shape)
               for i, layer in enumerate(layers)]
    blocks.append(HFHead(norm_attr, getattr(base, norm_attr), lm_head=None if tied else hf.lm_head, tied=tied,
                         signature=("hf-head", key)))
    names = ["embed", *(f"layer.{i}" for i in range(len(layers))), "head"]
    hf_name = {id(p): n for n, p in hf.named_parameters()}  # a tied parameter: its first (embedding) name
    hf_names = tuple({n: hf_name[id(p)] for n, p in b.named_parameters()} for b in blocks)
    return HFPipelineModel(blocks, names, init_std=float(getattr(config, "initializer_range", 0.02)), hf_names=hf_names,
                           weights_dir=weights_dir if weights_dir is not None and weight_files(weights_dir) else None,
                           base_prefix=prefix)


def hf_spec(name: str) -> ModelSpec:
    """The ModelSpec of ``name`` = ``hf:NAME_OR_PATH`` (see the module docstring for the resolution)."""
    tf = _transformers(name)
    config, where = _resolve(name, name.removeprefix("hf:"), tf)
    max_len = int(config.max_position_embeddings)
    weights = where is not None and bool(weight_files(where))
    return ModelSpec(name=name, task="lm", default_seq_len=min(max_len, 4096), max_seq_len=max_len,
                     vocab_size=int(config.vocab_size), factory=lambda: _build(name, config, where), tensor_parallel=False,
                     description=f"Hugging Face {config.model_type}, {config.num_hidden_layers} layers, "
                                 f"d={config.hidden_size}, {config.num_attention_heads} heads, dropout off, "
                                 + ("weights from the directory" if weights else "random init"))
