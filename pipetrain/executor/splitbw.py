"""Backward split into an input-gradient pass (B) and a later weight-gradient pass (W), for ZB-H1.

Zero-bubble pipelining (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024) runs the part
of the backward that the previous stage waits for (dL/dx) first and defers the weight gradients.

B: walk the stage's autograd graph from its output. The nodes from which the stage input's
gradient node is reachable form the *input path*. A node on the input path with a child off it
(a branch that leads only to weights: e.g. ``addmm``'s weight and bias, a LayerNorm's affine
parameters) is a *split node*: a pre-hook captures the gradient arriving there. Then
``torch.autograd.grad(out, x, retain_graph=True)`` computes dL/dx only (the engine skips the
weight branches).

W: ``torch.autograd.grad`` from the split nodes (as ``GradientEdge``s, with the captured
gradients) to the stage's parameters runs only the weight branches; the results are added to
``.grad``. A stage whose input needs no gradient (the first stage: token ids) does its whole
backward in B (nothing upstream waits for it) and nothing in W. Numerically each weight gradient is the same op on the same tensors as in a
full backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["SplitState", "backward_input", "backward_weight"]


class SplitState:
    """What B leaves for W: split nodes and the gradients captured at them (or ``full``)."""

    __slots__ = ("full", "nodes", "grads")

    def __init__(self, full: bool) -> None:
        self.full = full
        self.nodes: list[tuple[Any, list[torch.Tensor]]] = []  # split node, parameters of its weight branches
        self.grads: dict[int, tuple[torch.Tensor | None, ...]] = {}


def _input_path(root: Any, target: Any) -> set[Any]:
    """Nodes (reachable from ``root``) from which ``target`` is reachable, ``target`` included."""
    reach: dict[Any, bool] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if node is None or (node in reach and not done):
            continue
        if done:
            reach[node] = node is target or any(reach.get(c, False) for c, _ in node.next_functions if c is not None)
            continue
        stack.append((node, True))
        for c, _ in node.next_functions:
            if c is not None and c not in reach:
                stack.append((c, False))
    return {n for n, ok in reach.items() if ok}


def backward_input(out: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor, *,
                   no_alias: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor | None, SplitState]:
    """Pass B: return dL/dx (None if ``x`` needs no gradient) and the state for :func:`backward_weight`.

    Captured gradients that alias a tensor in ``no_alias`` (a receive buffer about to be reused)
    are cloned.
    """
    if not x.requires_grad or out.grad_fn is None:
        # nothing upstream waits for this stage (first stage): run the whole backward now, W is a no-op
        if out.grad_fn is not None:
            torch.autograd.backward(out, grad)
        return None, SplitState(full=True)
    target = get_gradient_edge(x).node
    path = _input_path(out.grad_fn, target)
    st = SplitState(full=False)
    owner: dict[int, int] = {}  # id(param) -> number of split nodes whose weight branches reach it
    for node in path:
        if node is target:
            continue
        branch = [c for c, _ in node.next_functions if c is not None and c not in path]
        if not branch:
            continue
        params = _branch_params(branch)
        if not params:
            continue
        for q in params:
            owner[id(q)] = owner.get(id(q), 0) + 1
        st.nodes.append((node, params))
    if any(n > 1 for n in owner.values()):
        # a parameter reached from two split nodes (e.g. tied weights on one stage): W could
        # double-count it, so this micro-batch runs its whole backward now
        torch.autograd.backward(out, grad)
        return x.grad, SplitState(full=True)
    handles = []
    alias_ptrs = {t.data_ptr() for t in no_alias}
    for node, _ in st.nodes:
        key = id(node)

        def hook(grad_outputs: tuple[torch.Tensor | None, ...], key: int = key) -> None:
            st.grads[key] = tuple(g.clone() if (g is not None and g.data_ptr() in alias_ptrs) else g for g in grad_outputs)

        handles.append(node.register_prehook(hook))
    try:
        (dx,) = torch.autograd.grad(out, [x], grad_outputs=grad, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return dx, st


def _branch_params(children: list[Any]) -> list[torch.Tensor]:
    """Leaf tensors (parameters) whose AccumulateGrad nodes are reachable from ``children``."""
    seen: set[Any] = set()
    out: list[torch.Tensor] = []
    stack = list(children)
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        var = getattr(n, "variable", None)
        if var is not None:
            out.append(var)
            continue
        stack.extend(c for c, _ in n.next_functions if c is not None)
    return out


def backward_weight(st: SplitState) -> None:
    """Pass W: accumulate the parameters' gradients (the caller then drops the graph)."""
    if st.full:
        return
    # one pass per split node, asking only for the parameters of its weight branches, so the
    # engine never walks back into the input path (which would re-add other nodes' gradients)
    for node, wparams in st.nodes:
        grads = st.grads.get(id(node), ())
        edges = [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
        gouts = [g for g in grads if g is not None]
        if not edges:
            continue
        dws = torch.autograd.grad(edges, wparams, grad_outputs=gouts, allow_unused=True, retain_graph=True)
        for q, dw in zip(wparams, dws):
            if dw is None:
                continue
            if q.grad is None:
                q.grad = dw
            else:
                q.grad.add_(dw)
    st.nodes.clear()
    st.grads.clear()
