"""Planner speed: llama2-70b on 64 H100s (budget 10 s) and a GPT-3-175B-shaped model on 1024 (budget 30 s).

Each case times the whole search (grid, exact partitions, fast-evaluator screening, simpy
confirmation of the top 3) and the Plan built from it, and reports the time as a ratio to its
budget, in wall-clock and in CPU seconds of this process (the machine is shared; CPU time is
the steadier figure). Tracing the model is timed apart (llama2-70b: meta-device tracing,
which needs torch; the 175B model: a LayerGraph built from formulas, below).

The GPT-3 175B graph (Brown et al. 2020, table 2.1: 96 layers, d_model 12288, 96 heads,
context 2048, vocabulary 50257, learned positions, tied head), per micro-batch of b sequences:

* forward FLOPs of a layer: ``24 b s h^2 + 4 b s^2 h`` (Narayanan et al. 2021, "Efficient
  large-scale language model training on GPU clusters using Megatron-LM", sec. 5.1: the
  ``72 B s l h^2 (1 + s/6h)`` per-iteration total is 3x the forward); backward 2x forward,
  half of it weight gradients; head ``2 b s h V`` forward;
* parameters of a layer ``12 h^2 + 13 h``; embedding ``V h + s h`` (Narayanan et al. 2021, eq. 2);
* activations saved per layer in 16-bit: ``s b h (34 + 5 a s / h)`` bytes (Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1, no tensor
  parallelism).

Run: ``.venv/bin/python benchmarks/planner_speed.py``
"""

from __future__ import annotations

import sys
import time

from pipetrain.graph import Edge, LayerGraph, LayerShape, Node, TiedParam
from pipetrain.planner.explain import make_plan
from pipetrain.planner.job import Job
from pipetrain.planner.search import search
from pipetrain.topology import topology_preset

__all__ = ["gpt3_175b_graph"]


def gpt3_175b_graph(b: int, *, s: int = 2048, h: int = 12288, layers: int = 96, heads: int = 96, vocab: int = 50257) -> LayerGraph:
    """GPT-3 175B as a block-level LayerGraph from the formulas in the module docstring (bf16)."""
    act = b * s * h * 2
    layer_params = 12 * h * h + 13 * h
    f_layer = 24.0 * b * s * h * h + 4.0 * b * s * s * h
    emb_params = vocab * h + s * h
    nodes = [Node(name="embed", kind="embedding", fwd_flops=0.0, bwd_flops=0.0, param_count=emb_params, param_bytes=2 * emb_params,
                  output_bytes=act, output_shape=(b, s, h), output_dtype="bfloat16", saved_bytes=b * s * 8)]
    for i in range(layers):
        nodes.append(Node(name=f"layer.{i}", kind="transformer", fwd_flops=f_layer, bwd_flops=2 * f_layer, wgrad_flops=f_layer,
                          param_count=layer_params, param_bytes=2 * layer_params, output_bytes=act, output_shape=(b, s, h),
                          output_dtype="bfloat16", saved_bytes=int(s * b * h * (34 + 5 * heads * s / h)),
                          # the shape tensor parallelism and the GEMM model need: the paper's math attention with dropout
                          layer=LayerShape(hidden=h, heads=heads, kv_heads=heads, ffn_hidden=4 * h, attention="math", dropout=True)))
    f_head = 2.0 * b * s * h * vocab
    nodes.append(Node(name="head", kind="head", fwd_flops=f_head, bwd_flops=2 * f_head, wgrad_flops=f_head, param_count=2 * h,
                      param_bytes=4 * h, output_bytes=b * s * vocab * 2, output_shape=(b, s, vocab), output_dtype="bfloat16",
                      saved_bytes=act))
    n = len(nodes)
    return LayerGraph(model="gpt3-175b", granularity="block", micro_batch_size=b, seq_len=s, dtype="bf16", nodes=tuple(nodes),
                      edges=tuple(Edge(src=i, dst=i + 1) for i in range(n - 1)), input_shape=(b, s), input_dtype="int64",
                      tied=(TiedParam(name="wte", owner=0, users=(n - 1,), param_count=vocab * h, param_bytes=2 * vocab * h),))


def _time_plan(job: Job, topo, graph_for) -> tuple[float, float, object]:  # noqa: ANN001
    w0, c0 = time.perf_counter(), time.process_time()
    res = search(job, graph_for=graph_for, topology=topo)
    plan = make_plan(res)
    return time.perf_counter() - w0, time.process_time() - c0, (res, plan)


def main() -> int:
    print("command: .venv/bin/python benchmarks/planner_speed.py")
    ok = True

    # ---- llama2-70b on 8 DGX H100 nodes ------------------------------------------------------
    from pipetrain.planner.trace import trace_graph

    topo = topology_preset("dgx-h100:8")
    job = Job(model="llama2-70b", topology="dgx-h100:8", global_batch=1024, seq_len=4096, dtype="bf16", max_memory_fraction=0.9)
    graphs: dict[int, LayerGraph] = {}
    trace_s = 0.0

    def llama(b: int) -> LayerGraph:
        nonlocal trace_s
        if b not in graphs:
            t = time.perf_counter()
            graphs[b] = trace_graph("llama2-70b", micro_batch_size=b, seq_len=4096, dtype="bf16")
            trace_s += time.perf_counter() - t
        return graphs[b]

    trace_graph("tiny-gpt", micro_batch_size=1, seq_len=8)  # import torch and warm up outside the timings
    wall, cpu, (res, plan) = _time_plan(job, topo, llama)
    wall_plan = wall - trace_s
    print("\nllama2-70b on dgx-h100:8 (64 GPUs), global batch 1024 x 4096 tokens")
    print(f"  plan: {res.best.candidate.describe()}, simulated step {plan.predicted.step_time_s:.3f} s, "
          f"MFU {plan.predicted.mfu * 100:.1f}%, {len(res.screened)} screened, {res.pruned} pruned, {len(res.infeasible)} infeasible")
    print(f"  wall {wall:.2f} s (of which tracing {len(graphs)} micro-batch sizes {trace_s:.2f} s), CPU {cpu:.2f} s")
    print(f"  ratio to the 10 s budget: wall incl. tracing {wall / 10:.2f}, planning alone {wall_plan / 10:.2f}, CPU {cpu / 10:.2f}")
    ok &= wall_plan <= 10.0 or cpu <= 10.0
    c0 = time.process_time()
    de = search(job, graph_for=llama, topology=topo, method="de")
    cpu_de = time.process_time() - c0
    print(f"  same job with scipy differential_evolution (integrality) screening instead of branch and bound: "
          f"{len(de.screened)} points simulated vs {len(res.screened)}, CPU {cpu_de:.2f} s vs {cpu:.2f} s "
          f"(ratio {cpu_de / cpu:.2f}), best {de.best.step_time_s:.3f} s vs {res.best.step_time_s:.3f} s "
          f"({de.best.candidate.describe()})")

    # ---- GPT-3 175B shape on 128 DGX H100 nodes ------------------------------------------------
    topo = topology_preset("dgx-h100:128")
    job = Job(model="gpt3-175b", topology="dgx-h100:128", global_batch=1536, seq_len=2048, dtype="bf16", max_memory_fraction=0.9)
    cache: dict[int, LayerGraph] = {}

    def gpt3(b: int) -> LayerGraph:
        if b not in cache:
            cache[b] = gpt3_175b_graph(b)
        return cache[b]

    wall, cpu, (res, plan) = _time_plan(job, topo, gpt3)
    g = gpt3(1)
    print(f"\nGPT-3-175B shape ({g.param_count / 1e9:.1f} B parameters, {g.num_nodes} blocks) on dgx-h100:128 (1024 GPUs), "
          f"global batch 1536 x 2048 tokens")
    print(f"  plan: {res.best.candidate.describe()}, simulated step {plan.predicted.step_time_s:.3f} s, "
          f"MFU {plan.predicted.mfu * 100:.1f}%, {len(res.screened)} screened, {res.pruned} pruned, {len(res.infeasible)} infeasible")
    print(f"  wall {wall:.2f} s, CPU {cpu:.2f} s; ratio to the 30 s budget: wall {wall / 30:.2f}, CPU {cpu / 30:.2f}")
    ok &= wall <= 30.0 or cpu <= 30.0
    print("\nPASS" if ok else "\nFAIL: over budget")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
