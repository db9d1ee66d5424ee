"""Deferred weight gradients of ``nn.Linear`` layers: the cheap B/W split for zero-bubble schedules.

Zero-bubble pipelining (Qi et al., ICLR 2024) splits a stage's backward into B, the input
gradient the previous stage waits for, and W, the weight gradients, run later to fill bubbles.
As in Megatron-LM's ``WeightGradStore``, W is the linear layers' ``dL/dW = gᵀ·x`` and
``dL/db = Σ g``: B runs the rest of the backward (the input gradient and every other parameter:
LayerNorm affine, embeddings) and keeps each linear layer's input ``x`` and output gradient
``g`` for W.

B is one ``torch.autograd.grad`` call that asks for the stage input, the non-linear parameters
and the linear layers' outputs: the engine skips the weight and bias branches it was not asked
for. W is one GEMM per linear layer, so B+W does the work of one full backward and costs about
what it does; the generic :mod:`pipetrain.executor.splitbw`, which walks the autograd graph in
Python and runs one ``autograd.grad`` per split node, costs clearly more (figures:
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["WeightGradQueue", "SplitLinears"]

class WeightGradQueue:
    """The linear layers' ``(weight, bias, x, g)`` of one micro-batch, captured in F and B, run in W."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[list[Any]] = []  # [weight, bias, x, output]; B replaces the output by its gradient

    def nbytes(self) -> int:
        """Bytes of the distinct storages the queue keeps alive (layer inputs and output gradients)."""
        seen: dict[int, int] = {}
        for _w, _b, x, g in self.items:
            for t in (x, g):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def run(self) -> None:
        """W: accumulate the queued weight (and bias) gradients, in the order B produced them.

        ``dW = gᵀ·x`` in the gradient's dtype (under autocast the layer ran in bf16), then cast
        to the parameter's, as autograd's cast-backward does."""
        for weight, bias, x, g in reversed(self.items):
            if g is None:  # this layer's output did not reach the loss
                continue
            g2 = g.reshape(-1, g.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            _accumulate(weight, g2.t().mm(x2 if x2.dtype == g2.dtype else x2.to(g2.dtype)).to(weight.dtype))
            if bias is not None:
                _accumulate(bias, g2.sum(0).to(bias.dtype))
        self.items.clear()


def _accumulate(p: nn.Parameter, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


class SplitLinears:
    """A stage module whose ``nn.Linear`` weight gradients can be deferred.

    F (inside :meth:`capture`): a forward hook on every linear layer queues its input and its
    output. B (:meth:`backward_input`): one ``torch.autograd.grad`` asks for the stage input, the
    *other* parameters and the linear layers' outputs, so the engine skips the linear weight and
    bias branches and hands back the gradient at each linear output; the other parameters'
    gradients are accumulated at once. W: :meth:`WeightGradQueue.run`.
    """

    def __init__(self, module: nn.Module) -> None:
        self.linears = [m for m in module.modules() if type(m) is nn.Linear]
        skip = {id(p) for lin in self.linears for p in lin.parameters()}
        self.others: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in module.parameters():
            if p.requires_grad and id(p) not in skip and id(p) not in seen:
                seen.add(id(p))
                self.others.append(p)
        self._queue: WeightGradQueue | None = None
        for lin in self.linears:
            lin.register_forward_hook(self._hook)

    def _hook(self, lin: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        q = self._queue
        if q is not None and out.requires_grad:
            q.items.append([lin.weight, lin.bias, args[0].detach(), out])

    @contextlib.contextmanager
    def capture(self, queue: WeightGradQueue) -> Iterator[WeightGradQueue]:
        """Run the stage's forward inside this block to make its linear layers deferrable."""
        self._queue = queue
        try:
            yield queue
        finally:
            self._queue = None

    def backward_input(self, out: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor,
                       queue: WeightGradQueue) -> torch.Tensor | None:
        """B: return dL/dx (None when ``x`` needs none) after accumulating the non-linear parameters'
        gradients; the linear layers' gradients at their outputs wait in ``queue`` for W."""
        want_x = x.requires_grad
        head = ([x] if want_x else []) + self.others
        outs = [item[3] for item in queue.items]
        grads = torch.autograd.grad(out, head + outs, grad_outputs=grad, allow_unused=True)
        alias = grad.data_ptr() if grad is not None else None
        for item, g in zip(queue.items, grads[len(head):]):
            # a gradient that is the received buffer itself is overwritten by the next receive
            item[3] = g.clone() if g is not None and g.data_ptr() == alias else g
        for p, g in zip(self.others, grads[1:len(head)] if want_x else grads[:len(head)]):
            if g is not None:
                _accumulate(p, g)
        return grads[0] if want_x else None
