"""The model zoo: presets written in this repo, built on the meta device, plus user models.

``get_model_spec("gpt2")`` returns a :class:`ModelSpec`; ``spec.build()`` gives a
:class:`PipelineModel` on meta (no memory). A user model is named ``package.module:factory``
where ``factory()`` returns a ``PipelineModel`` or a ``ModelSpec``. A Hugging Face decoder is named
``hf:NAME_OR_PATH`` (:mod:`pipetrain.planner.zoo.hf`; transformers is imported only then).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from torch import nn

from pipetrain.errors import ModelError
from pipetrain.planner.zoo.bert import BERT_PRESETS, bert_spec
from pipetrain.planner.zoo.common import ModelSpec, PipelineModel
from pipetrain.planner.zoo.gpt import GPT_PRESETS, gpt_spec
from pipetrain.planner.zoo.hf import hf_presets  # transformers itself is imported only by hf_spec
from pipetrain.planner.zoo.init import init_block_, materialize, param_seed, tied_parameters
from pipetrain.planner.zoo.llama import LLAMA_PRESETS, llama_spec
from pipetrain.planner.zoo.mlp import mlp_spec
from pipetrain.planner.zoo.resnet import resnet_spec

__all__ = ["ModelSpec", "PipelineModel", "get_model_spec", "list_presets", "init_block_", "materialize",
           "tied_parameters", "param_seed"]

_PRESETS: dict[str, Callable[[str], ModelSpec]] = {
    **{n: gpt_spec for n in GPT_PRESETS},
    **{n: llama_spec for n in LLAMA_PRESETS},
    **{n: bert_spec for n in BERT_PRESETS},
    "resnet": resnet_spec,
    "resmlp": mlp_spec,
    "mlp-uneven": mlp_spec,
}


def list_presets() -> tuple[str, ...]:
    return tuple(_PRESETS)


def _known() -> str:
    return (f"known presets: {', '.join(_PRESETS)}; or name your own as package.module:factory; or a Hugging Face "
            f"config as hf:NAME_OR_PATH (shipped: {', '.join(hf_presets())})")


def _spec_from_model(name: str, model: PipelineModel, factory: Callable[[], PipelineModel]) -> ModelSpec:
    """Wrap a user factory that returns a bare PipelineModel: token-id input, LM task.

    Optional model attributes override the defaults: ``task``, ``vocab_size``,
    ``default_seq_len``, ``max_seq_len``, ``input_kind``, ``input_size``.
    """
    vocab = getattr(model, "vocab_size", None)
    if vocab is None:
        embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not embeds:
            raise ModelError(f"model {name!r}: cannot tell its input; set vocab_size/input_kind attributes on the "
                             "PipelineModel, or make the factory return a ModelSpec")
        vocab = embeds[0].num_embeddings
    seq = int(getattr(model, "default_seq_len", 128))
    return ModelSpec(name=name, task=getattr(model, "task", "lm"), default_seq_len=seq, vocab_size=int(vocab),
                     max_seq_len=int(getattr(model, "max_seq_len", seq)), factory=factory,
                     input_kind=getattr(model, "input_kind", "tokens"), input_size=tuple(getattr(model, "input_size", ())),
                     description=f"user model {name}")


def _user_spec(name: str) -> ModelSpec:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model {name!r} is not of the form package.module:factory; {_known()}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `pipetrain graph mymodels:build` from the project directory
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise ModelError(f"cannot import module {module_name!r} for model {name!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"module {module_name!r} has no callable {attr!r} (model {name!r})")
    import torch

    try:
        with torch.device("meta"):
            made = factory()
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise ModelError(f"model factory {name!r} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(made, ModelSpec):
        return made
    if isinstance(made, PipelineModel):
        return _spec_from_model(name, made, factory)
    raise ModelError(f"model factory {name!r} returned a {type(made).__name__}; it must return a "
                     "pipetrain PipelineModel or ModelSpec")


def get_model_spec(name: str) -> ModelSpec:
    """A preset by name, a Hugging Face model ``hf:NAME_OR_PATH``, or a user model ``package.module:factory``."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string; {_known()}")
    if name in _PRESETS:
        return _PRESETS[name](name)
    if name.startswith("hf:"):  # before module:factory, which it would otherwise look like
        from pipetrain.planner.zoo.hf import hf_spec

        return hf_spec(name)
    if ":" in name:
        return _user_spec(name)
    raise ModelError(f"unknown model {name!r}; {_known()}")
