"""The outer search: memory safety, heterogeneous devices, pins, schedules, and the matrices it plans with."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipetrain.errors import InfeasibleError, PlanError
from pipetrain.graph import Edge, LayerGraph, Node, TiedParam
from pipetrain.hardware import default_memory_reserve_bytes
from pipetrain.memory import stage_memory
from pipetrain.planner.build import StageTables
from pipetrain.planner.explain import plan_job, plan_sim_input
from pipetrain.planner.job import Job
from pipetrain.planner.partition import partition
from pipetrain.planner.search import Candidate, _Searcher, search
from pipetrain.program.catalog import interleaved_in_flight
from pipetrain.program.lower import placement, sim_input
from pipetrain.schedules import make_schedule, peak_in_flight
from pipetrain.simulator import simulate
from pipetrain.topology import load_topology, topology_preset

GiB = 2**30


def synthetic_graph(n: int, b: int, *, seed: int = 0, hidden: int = 1024, seq: int = 512, model: str = "synthetic",
                    uniform: bool = False) -> LayerGraph:
    """A transformer-shaped chain: embedding, n-2 blocks, head (tied to the embedding). Costs scale with b."""
    rng = np.random.default_rng(seed)
    act = b * seq * hidden * 2
    nodes = [Node(name="embed", kind="embedding", fwd_flops=0.0, bwd_flops=0.0, param_count=32000 * hidden,
                  param_bytes=32000 * hidden * 2, output_bytes=act, output_shape=(b, seq, hidden), output_dtype="bfloat16",
                  saved_bytes=b * seq * 8)]
    for i in range(n - 2):
        scale = 1.0 if uniform else float(rng.uniform(0.5, 2.0))
        p = int(12 * hidden * hidden * scale)
        f = 2.0 * p * b * seq
        nodes.append(Node(name=f"layer.{i}", kind="block", fwd_flops=f, bwd_flops=2 * f, wgrad_flops=f, param_count=p,
                          param_bytes=2 * p, output_bytes=act, output_shape=(b, seq, hidden), output_dtype="bfloat16",
                          saved_bytes=int(act * 17 * scale)))
    f = 2.0 * 32000 * hidden * b * seq
    nodes.append(Node(name="head", kind="head", fwd_flops=f, bwd_flops=2 * f, wgrad_flops=f, param_count=0, param_bytes=0,
                      output_bytes=b * seq * 32000 * 2, output_shape=(b, seq, 32000), output_dtype="bfloat16",
                      saved_bytes=act))
    edges = tuple(Edge(src=i, dst=i + 1) for i in range(n - 1))
    tied = (TiedParam(name="wte", owner=0, users=(0, n - 1), param_count=32000 * hidden, param_bytes=32000 * hidden * 2),)
    return LayerGraph(model=model, granularity="block", micro_batch_size=b, seq_len=seq, dtype="bf16", nodes=tuple(nodes),
                      edges=edges, input_shape=(b, seq), input_dtype="int64", tied=tied)


def graphs(n: int, **kw):
    cache: dict[int, LayerGraph] = {}

    def graph_for(b: int) -> LayerGraph:
        if b not in cache:
            cache[b] = synthetic_graph(n, b, **kw)
        return cache[b]

    return graph_for


def test_memory_matrix_equals_memory_model_on_every_range() -> None:
    g = synthetic_graph(9, 2, seed=3)
    tab = StageTables(g, optimizer="adamw")
    for in_flight, buffers, rec in itertools.product((1, 3), (1, 2), (False, True)):
        mat = tab.memory_matrix(in_flight=in_flight, buffers=buffers, recompute=rec)
        for i in range(g.num_nodes):
            for j in range(i + 1, g.num_nodes + 1):
                want = stage_memory(g, i, j, in_flight=in_flight, buffers=buffers, recompute=rec, optimizer="adamw").total_bytes
                assert mat[i, j] == pytest.approx(want, rel=1e-12), (i, j, in_flight, buffers, rec)


def test_in_flight_closed_forms_match_the_schedules() -> None:
    s = _Searcher(Job(model="x", topology="local-cpu:1", global_batch=1, seq_len=1), topology_preset("local-cpu:1"),
                  graphs(6), None, 1)
    rng = np.random.default_rng(0)
    for p, m in itertools.product((1, 2, 3, 5, 8), (1, 2, 4, 7, 16)):
        caps = [int(x) for x in rng.integers(1, p + 2, p)]
        for buf in (None, caps):
            c = Candidate(pp=p, dp=1, micro_batch_size=1, num_microbatches=m, schedule="1f1b")
            assert s.in_flight(c, buf) == (peak_in_flight(make_schedule("1f1b", p, m, buffers=buf)), (0,) * p), (p, m, buf)
    from pipetrain.program.catalog import held_in_flight, zb_h1_held_bound, zb_h1_held_bounds
    from pipetrain.schedules import peak_pending_wgrad

    for p, m in itertools.product((1, 2, 3, 5, 8), (1, 2, 5, 16)):
        for buf in (None, [int(x) for x in rng.integers(1, p + 2, p)]):
            sched = make_schedule("zb-h1", p, m, buffers=buf)
            held = held_in_flight(sched)
            assert all(h <= b for h, b in zip(held, zb_h1_held_bound(p, m, buf))), (p, m, buf)
            fb, w = zb_h1_held_bounds(p, m, buf)  # each part bounds its own count
            assert all(h <= b for h, b in zip(peak_in_flight(sched), fb)), (p, m, buf)
            assert all(h <= b for h, b in zip(peak_pending_wgrad(sched), w)), (p, m, buf)
    for p, v, k in itertools.product((2, 3, 4), (2, 3), (1, 2, 3)):
        assert interleaved_in_flight(p, p * k, v) == peak_in_flight(make_schedule("interleaved", p, p * k, v))


_MIXED = """
device_types:
  fast: {peak_flops: {fp32: 100e12, bf16: 400e12}, memory_bytes: 40e9, memory_bandwidth_bytes_per_s: 2e12, efficiency: 0.5}
  slow: {peak_flops: {fp32: 50e12, bf16: 200e12}, memory_bytes: 40e9, memory_bandwidth_bytes_per_s: 2e12, efficiency: 0.5}
nodes:
  - devices: [fast, fast, slow, slow]
    link: {kind: nvswitch, bandwidth_bytes_per_s: 300e9, latency_s: 3e-6}
"""


def test_heterogeneous_fast_devices_get_more_blocks_and_beat_the_identical_device_split() -> None:
    topo = load_topology(_MIXED)
    gf = graphs(34, uniform=True, hidden=2048)  # embed + 32 equal blocks + head
    job = Job(model="synthetic", topology="mixed", global_batch=32, seq_len=512, pp=4, dp=1, microbatch_size=1,
              schedule="1f1b", recompute=(False,))
    res = search(job, graph_for=gf, topology=topo, top_k=1)
    blocks = res.best.split.blocks_per_stage
    # fast ranks 0, 1 run 2x the FLOP/s of slow ranks 2, 3: about 2x the blocks
    assert blocks[0] + blocks[1] >= 1.8 * (blocks[2] + blocks[3]), blocks
    planned = res.best.sim.step_time_s

    # The split a planner assuming identical devices makes: the same exact DP with equal speeds.
    tab = res.stage_tables(1)
    dt_fast = topo.device_type_of(0)
    t = tab.time_matrix(dt_fast, recompute=False)
    same = partition(tab.n, 4, stage_time=lambda s: t, stage_memory=lambda s: np.zeros_like(t), caps=[1.0] * 4)
    assert same.blocks_per_stage in ((9, 8, 8, 9), (8, 8, 9, 9), (9, 9, 8, 8), (8, 9, 9, 8), (9, 8, 9, 8), (8, 9, 8, 9))
    sched = make_schedule("1f1b", 4, 32)
    inp = sim_input(tables=tab, topology=topo, place=placement(topo, 4, 1), schedule=sched, ranges=same.ranges,
                    buffers=[4, 3, 2, 1], recompute=[False] * 4, in_flight=peak_in_flight(sched))
    identical = simulate(inp).step_time_s
    # Numbers seen: blocks (12, 11, 6, 5) in 0.332 s vs (9, 8, 9, 8) in 0.478 s for the identical-device split.
    assert planned < 0.75 * identical, (planned, identical, blocks)


def _random_topology(rng: np.random.Generator) -> str:
    mem = [float(rng.uniform(2, 24)) for _ in range(2)]
    return f"""
device_types:
  a: {{peak_flops: {{fp32: 50e12, bf16: 200e12}}, memory_bytes: {mem[0]}e9, memory_bandwidth_bytes_per_s: 1e12}}
  b: {{peak_flops: {{fp32: 80e12, bf16: 300e12}}, memory_bytes: {mem[1]}e9, memory_bandwidth_bytes_per_s: 2e12}}
nodes:
  - devices: {[str(x) for x in rng.choice(['a', 'b'], int(rng.choice([1, 2, 4])))]}
    link: {{kind: pcie, bandwidth_bytes_per_s: 25e9, latency_s: 1e-5}}
  - devices: {[str(x) for x in rng.choice(['a', 'b'], int(rng.choice([1, 2, 4])))]}
    link: {{kind: nvlink, bandwidth_bytes_per_s: 100e9, latency_s: 3e-6}}
inter_node: {{kind: infiniband, nic_bandwidth_bytes_per_s: 25e9, latency_s: 5e-6}}
"""


def test_no_returned_plan_exceeds_any_cap_in_simulation() -> None:
    rng = np.random.default_rng(7)
    planned = refused = 0
    for trial in range(30):
        topo = load_topology(_random_topology(rng))
        n = int(rng.integers(4, 13))
        gf = graphs(n, seed=trial, hidden=int(rng.choice([512, 1024, 2048])))
        job = Job(model="synthetic", topology="random", global_batch=int(rng.choice([8, 16, 32])), seq_len=512,
                  max_memory_fraction=float(rng.choice([1.0, 0.9, 0.5])),
                  schedule=str(rng.choice(["gpipe", "1f1b", "interleaved", "zb-h1"])) if trial % 3 else None,
                  simulation_only=True)
        try:
            res = search(job, graph_for=gf, topology=topo, top_k=2, explain=False)
        except InfeasibleError as exc:
            refused += 1
            assert "no plan fits" in str(exc)
            continue
        planned += 1
        for ev in res.confirmed:
            sim = ev.sim
            c = ev.candidate
            place = placement(topo, c.pp, c.dp, c.tp)
            s2r = make_schedule(c.schedule, c.pp, c.num_microbatches, c.chunks).stage_to_rank  # V schedules: not s % pp
            per_rank = [0.0] * c.pp
            for s, peak in enumerate(sim.peak_memory_bytes_per_stage):
                per_rank[s2r[s]] += peak
            for r, used in enumerate(per_rank):
                for d in place.rank_devices(topo, r):  # every device of every replica, less the reserve
                    cap = min(d.type.memory_bytes * job.max_memory_fraction, d.type.memory_bytes - default_memory_reserve_bytes(d.type))
                    assert used <= cap * (1 + 1e-9), (trial, r, used)
    assert planned >= 15 and refused >= 1, (planned, refused)


def test_pinned_knobs_are_respected_and_priced() -> None:
    topo = topology_preset("dgx-h100:1")
    gf = graphs(18, seed=1, hidden=2048)
    job = Job(model="synthetic", topology="dgx-h100:1", global_batch=64, seq_len=512, pp=4, schedule="gpipe", buffers=(8,))
    few = plan_job(Job(model="synthetic", topology="dgx-h100:1", global_batch=64, seq_len=512, pp=4, dp=2,
                       schedule="gpipe", buffers=(2,)), graph_for=gf, topology=topo, price_pins=False).plan
    assert few.num_microbatches <= 2 and few.dp == 2  # gpipe keeps all m in flight: 2 buffers force m <= 2
    with pytest.raises(InfeasibleError, match=r"no plan fits: .*gpipe keeps all 8.*unpin (schedule|buffers|microbatches)"):
        search(Job(model="synthetic", topology="dgx-h100:1", global_batch=64, seq_len=512, pp=4, dp=2, microbatches=8,
                   schedule="gpipe", buffers=(2,)), graph_for=gf, topology=topo)
    out = plan_job(job, graph_for=gf, topology=topo)
    p = out.plan
    assert (p.pp, p.schedule, p.num_microbatches) == (4, "gpipe", 8) and all(st.buffers == 8 for st in p.stages)
    assert out.pin_cost_fraction is not None and out.pin_cost_fraction >= 0.0
    assert "unpinned optimum" in p.alternatives[-1].description
    bounds = Job(model="synthetic", topology="dgx-h100:1", global_batch=64, seq_len=512, pp=2, dp=4, boundaries=(5,),
                 recompute=(True, False))
    b = plan_job(bounds, graph_for=gf, topology=topo, price_pins=False).plan
    assert b.boundaries == (5,) and [st.recompute for st in b.stages] == [True, False]


def test_simulation_only_schedules_need_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipetrain.planner.search as search_mod
    import pipetrain.program.catalog as catalog_mod

    # an executor that cannot run zb-h1 (as before it split B and W)
    for mod in (search_mod, catalog_mod):
        monkeypatch.setattr(mod, "RUNNABLE_SCHEDULES", ("gpipe", "1f1b", "interleaved"))
    topo = topology_preset("dgx-h100:1")
    gf = graphs(10, seed=2)
    res = search(Job(model="synthetic", topology="dgx-h100:1", global_batch=32, seq_len=512, pp=4), graph_for=gf, topology=topo)
    assert all(e.candidate.schedule != "zb-h1" for e in res.screened)
    with pytest.raises(InfeasibleError, match="simulation-only"):
        search(Job(model="synthetic", topology="dgx-h100:1", global_batch=32, seq_len=512, pp=4, schedule="zb-h1"),
               graph_for=gf, topology=topo)
    what_if = plan_job(Job(model="synthetic", topology="dgx-h100:1", global_batch=32, seq_len=512, pp=4, schedule="zb-h1",
                           simulation_only=True), graph_for=gf, topology=topo, price_pins=False).plan
    assert what_if.schedule == "zb-h1" and what_if.simulation_only


def test_plan_round_trips_and_resimulates_and_refuses_another_model() -> None:
    topo = topology_preset("dgx-h100:1")
    gf = graphs(12, seed=4)
    out = plan_job(Job(model="synthetic", topology="dgx-h100:1", global_batch=32, seq_len=512, pp=4), graph_for=gf,
                   topology=topo, price_pins=False)
    plan = type(out.plan).from_json(out.plan.to_json())
    assert plan == out.plan
    g = gf(plan.micro_batch_size)
    again = simulate(plan_sim_input(plan, graph=g, topology=topo))
    assert again.step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-12)
    assert plan.stages[1].inputs[0].shape == (plan.micro_batch_size, 512, 1024)
    other = synthetic_graph(12, plan.micro_batch_size, seed=4, model="other-model")
    with pytest.raises(PlanError, match="made for model 'synthetic'"):
        plan_sim_input(plan, graph=other, topology=topo)


def test_nothing_fits_names_the_smallest_change() -> None:
    topo = topology_preset("dgx-h100:1")
    gf = graphs(12, seed=5, hidden=4096)
    job = Job(model="synthetic", topology="dgx-h100:1", global_batch=32, seq_len=512, pp=1, max_memory_bytes=8 * GiB)
    with pytest.raises(InfeasibleError) as ei:
        search(job, graph_for=gf, topology=topo)
    msg = str(ei.value)
    assert msg.startswith("no plan fits:") and "unpin pp (=1)" in msg and "GiB" in msg


def test_additive_lower_bound_never_exceeds_the_fast_evaluator() -> None:
    topo = topology_preset("dgx-h100:1")
    gf = graphs(14, seed=6)
    job = Job(model="synthetic", topology="dgx-h100:1", global_batch=64, seq_len=512)
    s = _Searcher(job, topo, gf, None, 3)
    checked = 0
    for c in [Candidate(pp=p, dp=8 // p, micro_batch_size=b, num_microbatches=64 // (8 // p) // b, schedule=sch, chunks=v)
              for p in (2, 4, 8) for b in (1, 2) for sch, v in (("1f1b", 1), ("gpipe", 1), ("interleaved", 2))]:
        sp = s.split(c)
        if sp is None:
            continue
        ev = s.screen(sp)
        assert sp.lower_bound_s <= ev.fast.step_time_s * (1 + 1e-9), c
        checked += 1
    assert checked >= 10


def test_cut_bytes_match_the_graph_cuts_on_a_dag() -> None:
    from pipetrain.planner.build import cut_bytes

    g = synthetic_graph(8, 2, seed=9)
    skip = LayerGraph(model="dag", granularity="block", micro_batch_size=2, seq_len=512, dtype="bf16", nodes=g.nodes,
                      edges=g.edges + (Edge(src=1, dst=4), Edge(src=2, dst=6), Edge(src=1, dst=3)), input_shape=(2, 512))
    for graph in (g, skip):
        out, legal = cut_bytes(graph)
        assert legal == tuple(c.position for c in graph.cuts)
        for k in range(1, graph.num_nodes):
            assert out[k] == graph.cut(k).bytes, k


def test_branch_and_bound_is_never_worse_than_differential_evolution() -> None:
    topo = topology_preset("dgx-h100:4")
    gf = graphs(26, seed=3, hidden=4096)
    job = Job(model="synthetic", topology="dgx-h100:4", global_batch=256, seq_len=512, max_memory_fraction=0.5)
    bnb = search(job, graph_for=gf, topology=topo, method="bnb")
    de = search(job, graph_for=gf, topology=topo, method="de")
    assert min(e.fast.step_time_s for e in bnb.screened) <= min(e.fast.step_time_s for e in de.screened)
    assert bnb.best.step_time_s <= de.best.step_time_s * (1 + 1e-9)


def test_zb_h1_chosen_when_it_simulates_fastest() -> None:
    """zb-h1 is in grid.AUTO_SCHEDULES (its B+W costs one backward since the linear layers' weight
    gradients are deferred): on GPUs, with m pinned where 1F1B has a bubble, the planner picks it
    unasked, and its step beats the best 1F1B point by the deferred-W bubble."""
    from pipetrain.planner.job import job_from_mapping

    base = {"model": "gpt2", "topology": "dgx-h100:1", "global_batch": 64, "seq_len": 1024, "pp": 4, "dp": 1, "microbatches": 8, "tp": 1}
    # unpinned, a zero-bubble schedule wins (ZB-V's two chunks per rank beat ZB-H1 here:
    # test_zbv_chosen_where_it_simulates_fastest)
    assert search(job_from_mapping(base, source="test"), top_k=3).best.candidate.schedule in ("zb-h1", "zbv")
    free = search(job_from_mapping({**base, "schedule": "zb-h1"}, source="test"), top_k=3).best
    one = search(job_from_mapping({**base, "schedule": "1f1b"}, source="test"), top_k=3).best
    assert free.step_time_s < 0.9 * one.step_time_s
    # on CPU ranks only when pinned (grid.AUTO_SCHEDULES_CPU: per-action overhead the analytic grade misses)
    cpu = {"model": "tiny-gpt", "topology": "local-cpu:2", "global_batch": 8, "seq_len": 32, "dtype": "fp32", "pp": 2, "dp": 1}
    assert search(job_from_mapping(cpu, source="test"), top_k=3).best.candidate.schedule != "zb-h1"
    assert search(job_from_mapping({**cpu, "schedule": "zb-h1"}, source="test"), top_k=3).best.candidate.schedule == "zb-h1"


def test_zbv_chosen_where_it_simulates_fastest() -> None:
    """gpt2-medium on one DGX-H100, pp=4, m=8 (analytic cost model): ZB-V's two half-size chunks
    per rank halve ZB-H1's bubble, and the planner picks it unasked (82.6 ms against ZB-H1's
    88.8 ms and 1F1B's slower step when this was written). Its plan carries the V placement and lowers."""
    from pipetrain.planner.job import job_from_mapping
    from pipetrain.program import lower

    base = {"model": "gpt2-medium", "topology": "dgx-h100:1", "global_batch": 64, "seq_len": 1024, "pp": 4, "dp": 1,
            "microbatches": 8, "tp": 1}
    free = search(job_from_mapping(base, source="test"), top_k=3).best
    assert free.candidate.schedule == "zbv" and free.candidate.chunks == 2
    zbh1 = search(job_from_mapping({**base, "schedule": "zb-h1"}, source="test"), top_k=3).best
    one = search(job_from_mapping({**base, "schedule": "1f1b"}, source="test"), top_k=3).best
    assert free.step_time_s < 0.95 * zbh1.step_time_s < 0.95 * one.step_time_s
    assert free.fits()
    out = plan_job(job_from_mapping(base, source="test"))
    assert out.plan.schedule == "zbv" and [st.rank for st in out.plan.stages] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert lower(out.plan).schedule.stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)


def test_split_backward_schedules_never_get_recompute() -> None:
    """The executor refuses recompute with a split backward (zb-h1, zbv, dualpipev): the planner never
    plans it, and a pinned combination is refused with the fix."""
    from pipetrain.schedules import SCHEDULE_NAMES, SPLIT_BACKWARD_SCHEDULES

    assert [n for n in SCHEDULE_NAMES if make_schedule(n, 2, 4).split_backward] == list(SPLIT_BACKWARD_SCHEDULES)
    topo = topology_preset("dgx-h100:1")
    gf = graphs(18, seed=1, hidden=2048)
    kw = dict(model="synthetic", topology="dgx-h100:1", global_batch=64, seq_len=512, pp=2, dp=4, microbatches=8)
    free = search(Job(**kw, schedule="1f1b"), graph_for=gf, topology=topo).best  # type: ignore[arg-type]
    low = search(Job(**kw, schedule="1f1b", recompute=(True,)), graph_for=gf, topology=topo).best  # type: ignore[arg-type]
    assert not any(free.recompute) and max(low.rank_peaks_bytes()) < max(free.rank_peaks_bytes())
    cap = (max(low.rank_peaks_bytes()) + max(free.rank_peaks_bytes())) / 2
    # the split and the buffers held: under this cap only recompute makes 1F1B fit
    kw.update(boundaries=(free.split.ranges[0][1],), buffers=free.buffers)
    tight = search(Job(**kw, schedule="1f1b", max_memory_bytes=cap), graph_for=gf, topology=topo).best  # type: ignore[arg-type]
    assert any(tight.recompute)
    try:  # zb-h1 on the same split, buffers and cap: a plan without recompute, or none
        got = search(Job(**kw, schedule="zb-h1", max_memory_bytes=cap), graph_for=gf, topology=topo).best  # type: ignore[arg-type]
    except InfeasibleError as exc:
        assert "no plan fits" in str(exc)
    else:
        assert not any(got.recompute) and got.candidate.schedule == "zb-h1"
    free_kw = {k: v for k, v in kw.items() if k not in ("boundaries", "buffers")}
    for name in SPLIT_BACKWARD_SCHEDULES:
        with pytest.raises(InfeasibleError, match="does not combine with recompute: unpin recompute"):
            search(Job(**free_kw, schedule=name, recompute=(True,)), graph_for=gf, topology=topo)  # type: ignore[arg-type]
    unpinned = search(Job(**{k: v for k, v in kw.items() if k not in ("microbatches", "boundaries", "buffers")},  # type: ignore[arg-type]
                          max_memory_bytes=cap), graph_for=gf,
                      topology=topo, top_k=8)
    assert all(not any(e.recompute) for e in unpinned.screened if e.candidate.schedule in SPLIT_BACKWARD_SCHEDULES)


@pytest.mark.parametrize("name", ["zbv", "dualpipev", "interleaved"])
def test_in_flight_counts_saturate_at_two_micro_batches_per_rank(name: str) -> None:
    """The planner prices ZB-V and DualPipeV memory from a 2p-micro-batch schedule (search.SATURATION)."""
    from pipetrain.planner.search import SATURATION
    from pipetrain.program.catalog import held_in_flight

    for p in (2, 4, 8):
        base = held_in_flight(make_schedule(name, p, SATURATION * p, 2))
        for m in range(SATURATION * p, 6 * p + 1, p):
            assert held_in_flight(make_schedule(name, p, m, 2)) == base, (name, p, m)
