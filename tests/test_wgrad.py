"""Deferred linear weight gradients (pipetrain.executor.wgrad): B then W equals one full backward."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.stage import build_meta, load_spec, materialize_blocks, stage_modules  # noqa: E402
from pipetrain.executor.wgrad import SplitLinears, WeightGradQueue  # noqa: E402


def _stage(model_name: str, cuts: list[int], index: int, mbs: int, seq_len: int) -> tuple[nn.Module, tuple[int, ...]]:
    spec = load_spec(model_name)
    model = build_meta(spec)
    plan = simple_plan(model_name, pp=len(cuts) + 1, m=2, mbs=mbs, seq_len=seq_len, boundaries=cuts)
    st = plan.stages[index]
    materialize_blocks(model, range(st.block_start, st.block_end), "cpu", 0)
    shape = tuple(st.inputs[0].shape) if st.inputs else tuple(spec.example_input(mbs, seq_len, device="meta").shape)
    return stage_modules(model, [st])[index], shape


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _deferred(module: nn.Module, x: torch.Tensor, g: torch.Tensor, amp: bool = False) -> tuple[dict[str, torch.Tensor], object]:
    """Fresh gradients from F, B, then W of one micro-batch; (gradients, B's input gradient)."""
    for p in module.parameters():
        p.grad = None
    split = SplitLinears(module)
    q = WeightGradQueue()
    with split.capture(q), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = module(x)
    dx = split.backward_input(out, g, x, q)
    q.run()
    return _grads(module), dx


@pytest.mark.parametrize("model_name,cuts,index,mbs,seq", [("resmlp", [4], 1, 8, 1), ("tiny-gpt", [3], 1, 2, 16)])
def test_b_then_w_equals_full_backward_over_microbatches(model_name: str, cuts: list[int], index: int, mbs: int,
                                                        seq: int) -> None:
    torch.manual_seed(0)
    module, shape = _stage(model_name, cuts, index, mbs, seq)
    xs = [torch.randn(shape) for _ in range(3)]
    out_shape = module(xs[0]).shape
    gs = [torch.randn(out_shape) for _ in range(3)]

    for p in module.parameters():
        p.grad = None
    want_dx = []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_(True)
        torch.autograd.backward(module(x), g)
        want_dx.append(x.grad)
    want = _grads(module)

    for p in module.parameters():
        p.grad = None
    split = SplitLinears(module)
    assert split.linears and split.others  # both kinds of parameter are present
    queues, got_dx = [], []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_(True)
        q = WeightGradQueue()
        with split.capture(q):
            out = module(x)
        buf = g.clone()  # stands for a receive buffer
        got_dx.append(split.backward_input(out, buf, x, q))
        buf.fill_(1e6)  # the next receive overwrites it before W runs
        queues.append(q)
    # after B alone: no linear weight has a gradient, the other parameters have theirs
    assert all(lin.weight.grad is None for lin in split.linears)
    assert all(p.grad is not None for p in split.others)
    for q in queues:
        q.run()
    got = _grads(module)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(got_dx, want_dx):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_stage_without_input_gradient() -> None:
    module, shape = _stage("resmlp", [4], 0, 8, 1)
    x = torch.randn(shape)
    out = module(x)
    g = torch.randn(out.shape)
    torch.autograd.backward(out, g)
    want = _grads(module)
    got, dx = _deferred(module, x, g)
    assert dx is None
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_close_to_full_backward() -> None:
    module, shape = _stage("tiny-gpt", [3], 1, 2, 16)
    x0 = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x0.clone().requires_grad_(True))
    g = torch.randn(out.shape, dtype=out.dtype)
    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    torch.autograd.backward(out, g)
    want = _grads(module)
    got, _ = _deferred(module, x0.clone().requires_grad_(True), g, amp=True)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=2e-3, msg=name)


def test_queue_bytes_are_the_distinct_inputs_and_gradients_it_keeps() -> None:
    module, shape = _stage("resmlp", [4], 1, 8, 1)
    split = SplitLinears(module)
    q = WeightGradQueue()
    x = torch.randn(shape, requires_grad=True)
    with split.capture(q):
        out = module(x)
    split.backward_input(out, torch.randn(out.shape), x, q)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for item in q.items for t in item[2:]}
    assert len(q.items) == len(split.linears) == 9  # 4 blocks x 2 linear layers + the head
    assert q.nbytes() == sum(storages.values()) > 0
    q.run()
    assert q.nbytes() == 0
