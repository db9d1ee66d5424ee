"""Recompute as the planner chooses it: as few whole layers as fit (Megatron's
``--recompute-num-layers``), or every layer's attention core (selective), and what a zero-bubble
schedule holds between I and W. Pure: a GPT-shaped layer graph from formulas, the analytic model.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipetrain.activations import layer_activation_bytes, zb_w_held_bytes
from pipetrain.graph import Edge, LayerGraph, LayerShape, Node
from pipetrain.memory import selective_dropped_bytes, stage_memory, wgrad_held_bytes
from pipetrain.planner.build import StageTables
from pipetrain.planner.job import Job
from pipetrain.planner.search import search
from pipetrain.topology import topology_preset

H, HEADS, S = 1024, 16, 2048
SHAPE = LayerShape(hidden=H, heads=HEADS, kv_heads=HEADS, ffn_hidden=4 * H, attention="math", dropout=True)


def gpt_graph(b: int, layers: int = 8) -> LayerGraph:
    """A GPT of ``layers`` math-attention layers (bf16): embedding, layers, head. FLOPs per layer
    ``24 b s h^2 + 4 b s^2 h`` (Narayanan et al. 2021), saved bytes from the per-layer model."""
    act, vocab = b * S * H * 2, 32000
    f = 24.0 * b * S * H * H + 4.0 * b * S * S * H
    lp = 12 * H * H + 13 * H
    saved = layer_activation_bytes(SHAPE, seq_len=S, micro_batch_size=b, dtype_bytes=2)
    nodes = [Node(name="embed", kind="embedding", fwd_flops=0.0, bwd_flops=0.0, param_count=vocab * H, param_bytes=2 * vocab * H,
                  output_bytes=act, output_shape=(b, S, H), output_dtype="bfloat16", saved_bytes=b * S * 8)]
    nodes += [Node(name=f"layer.{i}", kind="transformer", fwd_flops=f, bwd_flops=2 * f, wgrad_flops=f, param_count=lp,
                   param_bytes=2 * lp, output_bytes=act, output_shape=(b, S, H), output_dtype="bfloat16", saved_bytes=saved,
                   layer=SHAPE) for i in range(layers)]
    fh = 2.0 * b * S * H * vocab
    nodes.append(Node(name="head", kind="head", fwd_flops=fh, bwd_flops=2 * fh, wgrad_flops=fh, param_count=vocab * H,
                      param_bytes=2 * vocab * H, output_bytes=b * S * vocab * 2, output_shape=(b, S, vocab), output_dtype="bfloat16",
                      saved_bytes=act))
    return LayerGraph(model="gpt-math", granularity="block", micro_batch_size=b, seq_len=S, dtype="bf16", nodes=tuple(nodes),
                      edges=tuple(Edge(src=i, dst=i + 1) for i in range(len(nodes) - 1)), input_shape=(b, S), input_dtype="int64")


def test_per_node_recompute_terms_come_from_the_layer_model() -> None:
    g = gpt_graph(2)
    kw = {"seq_len": S, "micro_batch_size": 2, "dtype_bytes": 2}
    core = layer_activation_bytes(SHAPE, **kw) - layer_activation_bytes(SHAPE, recompute="selective", **kw)
    # the attention core: softmax and its dropout output (2 a s^2 b D), the dropout mask (a s^2 b), the causal mask
    # (s^2), and the math path's head-wide K, V copies that selective recompute does not keep
    assert core == 2 * HEADS * S * S * 2 * 2 + HEADS * S * S * 2 + S * S
    assert selective_dropped_bytes(g) == (0, *[core] * 8, 0)
    w = zb_w_held_bytes(SHAPE, **kw)
    assert w == (S * 2 * H * 3 + S * 2 * 4 * H + S * 2 * 3 * H + S * 2 * H + S * 2 * 4 * H + S * 2 * H) * 2
    assert wgrad_held_bytes(g) == (g.nodes[0].saved_bytes, *[w] * 8, g.nodes[-1].saved_bytes)
    assert w < g.nodes[1].saved_bytes / 4


def test_range_matrices_equal_the_memory_model_for_selective_and_the_wgrad_stash() -> None:
    g = gpt_graph(1, layers=5)
    tab = StageTables(g, precision="bf16-mixed")
    held = wgrad_held_bytes(g)
    for inf, buf in itertools.product((1, 3), (1, 2)):
        sel = tab.memory_matrix(in_flight=inf, buffers=buf, recompute="selective")
        zb = tab.memory_matrix(in_flight=inf, buffers=buf, recompute=False, wgrad_held=2)
        for i in range(g.num_nodes):
            for j in range(i + 1, g.num_nodes + 1):
                kw = {"in_flight": inf, "buffers": buf, "precision": "bf16-mixed"}
                want = stage_memory(g, i, j, recompute=True, recompute_mode="selective", **kw).total_bytes
                assert sel[i, j] == pytest.approx(want, rel=1e-12), (i, j, inf, buf)
                assert zb[i, j] == pytest.approx(stage_memory(g, i, j, **kw).total_bytes + 2 * sum(held[i:j]), rel=1e-12)


def test_partial_recompute_takes_the_fewest_leading_layers_that_fit() -> None:
    """For every range and a cap between no recompute and all of it: the k found fits, k - 1 does
    not, and its memory and time are the memory model's and the cost model's for that k."""
    g = gpt_graph(1)
    tab = StageTables(g, precision="bf16-mixed")
    dt = topology_preset("dgx-h100:1").devices[0].type
    inf, buf, n = 4, 1, g.num_nodes
    full = tab.memory_matrix(in_flight=inf, buffers=buf, recompute="full")
    none = tab.memory_matrix(in_flight=inf, buffers=buf, recompute=False)
    cap = float(0.5 * (full[1, 9] + none[1, 9]))
    k, t, m = tab.partial_recompute(dt, in_flight=inf, buffers=buf, cap=cap)
    seen = set()
    for i in range(n):
        for j in range(i + 1, n + 1):
            kk = int(k[i, j])
            assert 1 <= kk <= j - i
            mem = [stage_memory(g, i, j, in_flight=inf, buffers=buf, precision="bf16-mixed", recompute=True,
                                recompute_layers=x % (j - i)).total_bytes for x in range(1, j - i + 1)]
            assert m[i, j] == pytest.approx(mem[kk - 1], rel=1e-12)
            if mem[kk - 1] <= cap:
                assert kk == 1 or mem[kk - 2] > cap, (i, j, kk)  # the fewest that fit
                seen.add(kk)
            else:
                assert kk == j - i and min(mem) > cap  # nothing fits: all of them, reported over the cap
            c = tab.stage_cost(dt, i, j, recompute=True, recompute_layers=kk % (j - i))
            assert t[i, j] == pytest.approx(c.t_fwd_s + c.t_bwd_s + c.t_recompute_s, rel=1e-12)
    assert len(seen - {1}) >= 2  # the cap really splits ranges partway


def _job(**kw: object) -> Job:
    base = {"model": "gpt-math", "topology": "dgx-h100:1", "global_batch": 16, "seq_len": S, "dtype": "bf16", "pp": 2, "dp": 1,
            "tp": 1, "zero": 0, "microbatch_size": 1, "schedule": "1f1b", "simulation_only": True}
    return Job(**{**base, **kw})  # type: ignore[arg-type]


def _plan(job: Job) -> object:
    return search(job, graph_for=gpt_graph, topology=topology_preset("dgx-h100:1"), top_k=1).best


def test_search_recomputes_only_as_many_layers_as_the_cap_needs_and_beats_recomputing_all() -> None:
    g = gpt_graph(1)
    # the first stage (in flight 2 under 1F1B p=2) needs recompute, but not of all its layers
    m_none = stage_memory(g, 0, 5, in_flight=2, precision="bf16-mixed", buffers=2).total_bytes
    m_all = stage_memory(g, 0, 5, in_flight=2, precision="bf16-mixed", buffers=2, recompute=True).total_bytes
    cap = 0.5 * (m_none + m_all)
    job = _job(max_memory_bytes=cap, recompute_mode="full")
    best = _plan(job)
    assert any(best.recompute) and any(0 < k for k in best.recompute_layers), (best.recompute, best.recompute_layers)
    pinned = _plan(_job(max_memory_bytes=cap, recompute=(True,), recompute_mode="full"))
    assert all(pinned.recompute) and not any(pinned.recompute_layers)
    assert best.step_time_s < pinned.step_time_s
    # and the simulated peak of every stage is within its cap
    assert best.fits()


def test_search_picks_selective_recompute_where_the_attention_core_dominates() -> None:
    g = gpt_graph(1)
    m_none = stage_memory(g, 0, 5, in_flight=2, precision="bf16-mixed", buffers=2).total_bytes
    m_sel = stage_memory(g, 0, 5, in_flight=2, precision="bf16-mixed", buffers=2, recompute=True,
                         recompute_mode="selective").total_bytes
    # just above what selective needs: whole layers would have to recompute most of the stage
    cap = m_sel + 0.05 * (m_none - m_sel)
    best = _plan(_job(max_memory_bytes=cap))
    assert best.candidate.recompute_mode == "selective" and any(best.recompute), best.candidate.describe()
    full = _plan(_job(max_memory_bytes=cap, recompute_mode="full"))
    assert full.candidate.recompute_mode == "full" and best.step_time_s < full.step_time_s
    assert best.fits()


def test_zero_bubble_plans_hold_only_what_w_needs() -> None:
    """ZB-H1 fits a cap that holding whole activations between I and W would break."""
    g = gpt_graph(1)
    best = _plan(_job(schedule="zb-h1", microbatch_size=1))
    held = wgrad_held_bytes(g)
    sim = best.sim or best.fast
    for a, b in best.split.ranges:
        full_stash = sum(n.saved_bytes for n in g.nodes[a:b])
        assert sum(held[a:b]) < 0.3 * full_stash
    # the simulated peak of stage 0: its static bytes + activations between F and I + the W stash
    peaks = np.asarray(sim.peak_memory_bytes_per_stage)
    whole = np.asarray([stage_memory(g, a, b, in_flight=max(1, h), buffers=bf, precision="bf16-mixed").total_bytes
                        for (a, b), h, bf in zip(best.split.ranges, best.in_flight, best.buffers)])
    assert np.all(peaks < whole)  # the planner's old accounting: every held micro-batch whole
