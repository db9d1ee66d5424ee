"""Trace a model on the meta device into a :class:`~pipetrain.graph.LayerGraph`.

Per block (or, at op granularity, per torch.fx node) on meta tensors:

- forward FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the forward;
- backward FLOPs: the same around ``autograd.grad`` w.r.t. the input and the parameters;
  ``wgrad_flops`` is that minus a second backward with the parameters frozen (input
  gradient only), so ``bwd_flops - wgrad_flops`` is the activation-gradient part;
- saved-for-backward bytes: every tensor autograd packs during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage (views share
  one), parameters excluded (they are ``param_bytes``); the block's own input counts when
  the block saves it;
- output bytes, shape and dtype; own parameter count and bytes (a tied parameter counts at
  its owner; its users list it in ``LayerGraph.tied``).

``dtype`` "bf16"/"fp16" casts parameters and float activations to that dtype (token ids
stay int64); FLOPs do not depend on it. FlopCounterMode counts matmuls, convolutions and
attention only (elementwise ops, norms and softmax count 0). Attention on meta runs the
fused CPU flash kernel (see ``zoo.common.causal_attention``), which FlopCounterMode has no
formula for: :func:`flop_formulas` adds one, counting only the unmasked score entries of a
causal mask (what FlashAttention computes; Dao et al. 2022), with backward = 2x forward as
in PyTorch's own sdpa formula. Blocks with equal ``trace_signature`` and input are traced
once and reused, which keeps llama2-70b (80 equal layers) fast.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from pipetrain.errors import ConfigError, ModelError, PipetrainError
from pipetrain.graph import Edge, LayerGraph, Node, TiedParam, structure_fingerprint
from pipetrain.planner.zoo import ModelSpec, PipelineModel, get_model_spec, tied_parameters

__all__ = ["trace_graph", "model_fingerprint", "flop_formulas", "DTYPES", "resolve_spec"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----- FLOP formulas -------------------------------------------------------------------------
def _attended_pairs(tq: int, tk: int, causal: bool) -> int:
    """Score entries a (top-left aligned) causal mask keeps: row i sees keys 0..i."""
    if not causal:
        return tq * tk
    if tq <= tk:
        return tq * (tq + 1) // 2
    return tk * (tk + 1) // 2 + (tq - tk) * tk


def _attn_fwd_flops(query_shape: Any, key_shape: Any, value_shape: Any, dropout_p: float = 0.0,
                    is_causal: bool = False, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    b, h, tq, d = query_shape
    pairs = _attended_pairs(tq, key_shape[-2], bool(is_causal))
    return 2 * b * h * pairs * d + 2 * b * h * pairs * value_shape[-1]  # Q K^T and P V


def _attn_bwd_flops(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, out_shape_: Any,
                    lse_shape: Any, dropout_p: float = 0.0, is_causal: bool = False, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * _attn_fwd_flops(query_shape, key_shape, value_shape, dropout_p, is_causal)  # dV, dP, dQ, dK


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for FlopCounterMode: the fused CPU flash-attention ops, causal-aware."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _attn_fwd_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _attn_bwd_flops}


# ----- measuring one callable ----------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _Cost:
    fwd_flops: float
    bwd_flops: float
    wgrad_flops: float
    saved_bytes: int


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _leafify(tree: Any) -> Any:
    """Detach every tensor; float ones become leaves that require grad."""
    def f(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.detach()
            return v.requires_grad_(True) if v.is_floating_point() else v
        return v
    return tree_map(f, tree)


def _measure(fn: Callable[[], Any], inputs: list[torch.Tensor], params: list[nn.Parameter]) -> tuple[_Cost, Any]:
    """Run ``fn`` (closing over ``inputs``) forward and backward on meta; count it."""
    param_keys = {_storage_key(p) for p in params}
    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # keeps packed tensors alive so storage ids are not reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_keys and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            keep.append(t)
        return t

    grad_params = [p for p in params if p.requires_grad]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as fc:
            out = fn()
    fwd = fc.get_total_flops()
    outs = [t for t in _tensors(out) if t.requires_grad]
    bwd = dgrad = 0
    wrt = [t for t in inputs if t.requires_grad]
    if outs and (wrt or grad_params):
        with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as fc:
            torch.autograd.grad(outs, [*wrt, *grad_params], [torch.ones_like(t) for t in outs], allow_unused=True)
        bwd = fc.get_total_flops()
        if wrt and grad_params:
            for p in grad_params:
                p.requires_grad_(False)
            try:
                out2 = fn()
                outs2 = [t for t in _tensors(out2) if t.requires_grad]
                if outs2:
                    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as fc:
                        torch.autograd.grad(outs2, wrt, [torch.ones_like(t) for t in outs2], allow_unused=True)
                    dgrad = fc.get_total_flops()
            finally:
                for p in grad_params:
                    p.requires_grad_(True)
        elif wrt:
            dgrad = bwd
    cost = _Cost(fwd_flops=float(fwd), bwd_flops=float(bwd), wgrad_flops=float(max(bwd - dgrad, 0)),
                 saved_bytes=sum(saved.values()))
    return cost, out


def _detach_tree(tree: Any) -> Any:
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, tree)


# ----- structure shared by tracing and fingerprints ---------------------------------------------
def resolve_spec(spec_or_name: ModelSpec | str) -> ModelSpec:
    return spec_or_name if isinstance(spec_or_name, ModelSpec) else get_model_spec(spec_or_name)


def _own_params(model: PipelineModel) -> list[list[nn.Parameter]]:
    """Each block's parameters, minus tied ones owned by an earlier block."""
    users = {(u, name) for name, _, us in tied_parameters(model) for u in us}
    return [[p for name, p in b.named_parameters() if (i, name) not in users] for i, b in enumerate(model.blocks)]


def model_fingerprint(spec_or_name: ModelSpec | str) -> str:
    """The block-granularity ``LayerGraph.fingerprint`` of a model, without tracing FLOPs."""
    spec = resolve_spec(spec_or_name)
    model = spec.build("meta")
    own = _own_params(model)
    nodes = [(model.block_names[i], model.block_kinds[i], sum(p.numel() for p in own[i])) for i in range(len(own))]
    edges = [(i, i + 1) for i in range(len(own) - 1)]
    return structure_fingerprint(spec.name, nodes, edges, tied_parameters(model))


def _dtype_of(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ----- block granularity ----------------------------------------------------------------------
def _trace_blocks(spec: ModelSpec, model: PipelineModel, x: torch.Tensor) -> tuple[list[Node], list[Edge]]:
    own = _own_params(model)
    cache: dict[Any, tuple[_Cost, tuple[int, ...], torch.dtype]] = {}
    nodes: list[Node] = []
    for i, block in enumerate(model.blocks):
        inp = _leafify(x) if i > 0 else x.detach()  # the model's input (data) needs no gradient
        sig = getattr(block, "trace_signature", None)
        key = None if sig is None else (type(block), sig, tuple(inp.shape), inp.dtype, inp.requires_grad)
        if key is not None and key in cache:
            cost, shape, out_dtype = cache[key]
            out = torch.empty(shape, dtype=out_dtype, device="meta")
        else:
            try:
                cost, out = _measure(functools.partial(block, inp), [inp], list(block.parameters()))
            except PipetrainError:
                raise
            except Exception as exc:  # noqa: BLE001 - a block that cannot run on meta tensors
                raise ModelError(f"block {i} ({model.block_names[i]}) of {spec.name!r} failed on the meta device "
                                 f"with input {list(inp.shape)} {_dtype_name(inp)}: {type(exc).__name__}: {exc}") from None
            if not isinstance(out, torch.Tensor):
                raise ConfigError(f"block {i} ({model.block_names[i]}) returned a {type(out).__name__}; every "
                                  "PipelineModel block must return one tensor")
            out = out.detach()
            if key is not None:
                cache[key] = (cost, tuple(out.shape), out.dtype)
        nodes.append(Node(name=model.block_names[i], kind=model.block_kinds[i], fwd_flops=cost.fwd_flops,
                          bwd_flops=cost.bwd_flops, wgrad_flops=cost.wgrad_flops,
                          param_count=sum(p.numel() for p in own[i]), param_bytes=sum(_nbytes(p) for p in own[i]),
                          output_bytes=_nbytes(out), output_shape=tuple(out.shape), output_dtype=_dtype_name(out),
                          saved_bytes=cost.saved_bytes, layer=getattr(block, "layer_shape", None)))
        x = out
    return nodes, [Edge(src=i, dst=i + 1) for i in range(len(nodes) - 1)]


def _block_ties(model: PipelineModel) -> tuple[TiedParam, ...]:
    ties = []
    for name, owner, users in tied_parameters(model):
        p = model.blocks[owner].get_parameter(name)
        ties.append(TiedParam(name=name, owner=owner, users=users, param_count=p.numel(), param_bytes=_nbytes(p)))
    return tuple(ties)


# ----- op granularity (torch.fx) --------------------------------------------------------------
def _op_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _callable(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Callable[[], Any]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return lambda: mod(*args, **kwargs)
    if node.op == "call_method":
        return lambda: getattr(args[0], str(node.target))(*args[1:], **kwargs)
    fn = node.target
    if not callable(fn):
        raise ModelError(f"fx node {node.name}: target {fn!r} is not callable")
    return lambda: fn(*args, **kwargs)


def _trace_ops(name: str, model: PipelineModel, x: torch.Tensor) -> tuple[list[Node], list[Edge], tuple[TiedParam, ...]]:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx cannot trace data-dependent control flow etc.
        raise ModelError(f"torch.fx cannot trace {name!r} at op granularity ({type(exc).__name__}: {exc}); "
                         "use --granularity block") from None
    env: dict[torch.fx.Node, Any] = {}
    index: dict[torch.fx.Node, int] = {}
    nodes: list[Node] = []
    edges: list[Edge] = []
    param_owner: dict[int, tuple[int, str, nn.Parameter]] = {}
    param_users: dict[int, list[int]] = {}
    param_names = {id(p): n for n, p in model.named_parameters()}
    for fx_node in gm.graph.nodes:
        if fx_node.op == "placeholder":
            env[fx_node] = x
            continue
        if fx_node.op == "get_attr":
            env[fx_node] = operator.attrgetter(str(fx_node.target))(gm)
            continue
        if fx_node.op == "output":
            continue
        params: list[nn.Parameter] = []
        if fx_node.op == "call_module":
            params += list(gm.get_submodule(str(fx_node.target)).parameters())

        def value(v: Any) -> Any:
            if not isinstance(v, torch.fx.Node) or v.op == "placeholder":  # data needs no gradient
                return env[v] if isinstance(v, torch.fx.Node) else v
            if v.op == "get_attr":  # parameters stay the model's own Parameter objects
                if isinstance(env[v], nn.Parameter):
                    params.append(env[v])  # noqa: B023 (tree_map calls it in this iteration)
                return env[v]
            return _leafify(env[v])

        call_args, call_kwargs = tree_map(value, (fx_node.args, fx_node.kwargs),
                                          is_leaf=lambda v: isinstance(v, torch.fx.Node))
        param_ids = {id(p) for p in params}
        inputs = [t for t in _tensors((call_args, call_kwargs)) if id(t) not in param_ids]
        cost, out = _measure(_callable(gm, fx_node, call_args, call_kwargs), inputs, params)
        env[fx_node] = _detach_tree(out)
        outs = _tensors(out)
        if not outs or not isinstance(out, (torch.Tensor, tuple, list)):
            continue  # shapes and other metadata: not a node of the layer graph
        i = len(nodes)
        index[fx_node] = i
        own = []
        for p in params:
            if id(p) not in param_owner:
                param_owner[id(p)] = (i, param_names.get(id(p), fx_node.name), p)
                own.append(p)
            elif param_owner[id(p)][0] != i and i not in param_users.setdefault(id(p), []):
                param_users[id(p)].append(i)
        first = outs[0]
        nodes.append(Node(name=fx_node.name, kind=_op_kind(gm, fx_node), fwd_flops=cost.fwd_flops,
                          bwd_flops=cost.bwd_flops, wgrad_flops=cost.wgrad_flops,
                          param_count=sum(p.numel() for p in own), param_bytes=sum(_nbytes(p) for p in own),
                          output_bytes=sum(_nbytes(t) for t in outs),
                          output_shape=tuple(first.shape) if isinstance(out, torch.Tensor) else (),
                          output_dtype=_dtype_name(first), saved_bytes=cost.saved_bytes))
        for src in dict.fromkeys(fx_node.all_input_nodes):
            if src in index:
                edges.append(Edge(src=index[src], dst=i))
    ties = tuple(TiedParam(name=param_owner[k][1], owner=param_owner[k][0], users=tuple(us),
                           param_count=param_owner[k][2].numel(), param_bytes=_nbytes(param_owner[k][2]))
                 for k, us in param_users.items() if us)
    return nodes, edges, ties


# ----- entry point ----------------------------------------------------------------------------
def trace_graph(spec_or_name: ModelSpec | str, *, micro_batch_size: int, seq_len: int | None = None,
                dtype: str = "fp32", granularity: str = "block") -> LayerGraph:
    """Build the model on meta and trace one micro-batch into a LayerGraph.

    ``seq_len`` None means the model's default (its context for LMs; 1 for models with no
    sequence dimension). Raises ModelError for an unknown model or impossible shape.
    """
    spec = resolve_spec(spec_or_name)
    t = spec.check_shape(micro_batch_size, seq_len)
    torch_dtype = _dtype_of(dtype)
    if granularity not in ("block", "op"):
        raise ConfigError(f"granularity must be 'block' or 'op', got {granularity!r}")
    model = spec.build("meta").to(torch_dtype)
    x = spec.example_input(micro_batch_size, t, device="meta")
    if x.is_floating_point():
        x = x.to(torch_dtype)
    if granularity == "block":
        nodes, edges = _trace_blocks(spec, model, x)
        ties = _block_ties(model)
    else:
        nodes, edges, ties = _trace_ops(spec.name, model, x)
    return LayerGraph(model=spec.name, granularity=granularity, micro_batch_size=micro_batch_size, seq_len=t,
                      dtype=dtype, nodes=tuple(nodes), edges=tuple(edges), input_shape=tuple(x.shape),
                      input_dtype=_dtype_name(x), tied=ties)
