"""Layer-by-layer recompute of the executor's stages (full, selective, the first k layers), in process.

One stage holds a whole model; its forward and backward run as the executor's runtime runs a
recomputing stage (``StageModule.forward(recompute=True)``, the loss on the fp32 output, the
saved-tensor hooks of :class:`~pipetrain.executor.runtime.SavedBytes`, which also count the
stage input a checkpoint keeps). The multi-process runs (ZeRO-2/3 with recompute, measured
bytes against the plan's figure) are in tests/test_executor_parallel.py.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipetrain.executor.runtime import SavedBytes  # noqa: E402
from pipetrain.executor.stage import StageModule  # noqa: E402
from pipetrain.memory import stage_memory  # noqa: E402
from pipetrain.planner.trace import trace_graph  # noqa: E402
from pipetrain.planner.zoo import get_model_spec  # noqa: E402

MBS, SEQ = 2, 16
#: (mode, recompute_layers): how the stage recomputes
WAYS = [("none", 0), ("selective", 0), ("full", 0), ("selective", 2), ("full", 2)]


def _step(model_name: str, mode: str, layers: int) -> tuple[float, dict[str, Any], int]:
    """(loss, gradients, saved bytes) of one forward and backward of the whole model as one stage."""
    spec = get_model_spec(model_name)
    model = spec.build("cpu", seed=0)
    stage = StageModule(dict(enumerate(model.blocks)))
    stage.set_recompute(mode, layers)
    stage.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, spec.vocab_size, (MBS, SEQ), generator=g)
    y = torch.randint(0, spec.vocab_size, (MBS, SEQ), generator=g)
    saved = SavedBytes()
    saved.exclude = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    saved.begin()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = spec.loss(stage(x, recompute=mode != "none").float(), y)
    if mode != "none":
        saved.add_input(x)  # as the runtime: a checkpoint keeps the stage input
    saved.end(0)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in stage.named_parameters()}, saved.per_mb[0]


@pytest.mark.parametrize("model_name", ["tiny-gpt", "tiny-llama"])
def test_recompute_same_losses_fewer_saved_bytes_as_the_memory_model(model_name: str) -> None:
    runs = {w: _step(model_name, *w) for w in WAYS}
    loss0, grads0, _ = runs[("none", 0)]
    for w, (loss, grads, _) in runs.items():
        assert loss == loss0, w  # recomputation replays the same forward: bit-identical losses
        for k, gr in grads.items():
            torch.testing.assert_close(gr, grads0[k], rtol=1e-5, atol=1e-6, msg=lambda m, w=w, k=k: f"{w} {k}: {m}")
    b = {w: r[2] for w, r in runs.items()}
    # selective drops the attention cores' saved tensors (with flash attention its log-sum-exp),
    # full keeps only each block's input: none > selective > full, and partial in between
    assert b[("none", 0)] > b[("selective", 2)] > b[("selective", 0)] > b[("full", 2)] > b[("full", 0)], b
    graph = trace_graph(model_name, micro_batch_size=MBS, seq_len=SEQ)
    n = graph.num_nodes
    for (mode, layers), got in b.items():
        mem = stage_memory(graph, 0, n, in_flight=1, recompute=mode != "none", recompute_mode=mode if mode != "none" else "full",
                           recompute_layers=layers)
        # the loss runs outside the checkpointed blocks: its saved tensors are kept per micro-batch
        # (the memory model's activation bytes include them in every mode)
        want = mem.activation_bytes
        assert abs(got - want) <= 0.05 * want, (mode, layers, got, want)


def test_recompute_layers_out_of_range_is_refused() -> None:
    from pipetrain.errors import PlanError

    spec = get_model_spec("tiny-gpt")
    stage = StageModule(dict(enumerate(spec.build("meta").blocks)))
    with pytest.raises(PlanError, match="recompute_layers 7 is not in"):
        stage.set_recompute("full", 7)
