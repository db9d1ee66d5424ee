"""Planner quality: the planned split against the splits of three well-known heuristics.

For gpt2-xl (8 stages) and llama2-7b (4 and 8 stages) on one DGX H100 node, the planner runs
with ``pp`` (and the 1F1B schedule) pinned; every other knob is its own choice. The same
configuration (micro-batch size and count, buffers) is then simulated (simpy) with the split
of each heuristic instead of the planned one:

* **uniform**: transformer layers spread evenly, embedding on the first stage, head on the
  last (Megatron-LM's default layer assignment);
* **parameters**: contiguous blocks balanced by parameter count, min-max (DeepSpeed
  ``PipelineModule(partition_method="parameters")``, ``ds_utils.partition_balanced``);
* **time**: contiguous blocks balanced by per-block F+B time, ignoring memory (torchgpipe
  ``balance_by_time``, which solves the min-max block partition of profiled times).

Each heuristic split gets the planner's per-stage recompute rule (recompute a stage only when
it does not fit otherwise), and the table says whether it fits the 90% memory cap at all. The
planned split must be no slower than any of them: ratio = heuristic / planned >= 1.

Run: ``.venv/bin/python benchmarks/planner_quality.py``
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pipetrain.planner.build import StageTables, rank_caps
from pipetrain.planner.job import Job
from pipetrain.planner.partition import additive_matrix, format_bytes, partition
from pipetrain.planner.search import search
from pipetrain.planner.trace import trace_graph
from pipetrain.program.lower import placement, rank_device_type, sim_input
from pipetrain.schedules import make_schedule, peak_in_flight
from pipetrain.simulator import simulate
from pipetrain.topology import topology_preset

#: (model, pp, global batch, seq len, pinned micro-batch size or None). The last case pins a
#: micro-batch size at which 1F1B's early stages run out of memory, so memory shapes the split.
CASES = (("gpt2-xl", 8, 128, 1024, None), ("llama2-7b", 4, 64, 4096, None), ("llama2-7b", 8, 64, 4096, None),
         ("llama2-7b", 4, 256, 4096, 4))
TOPOLOGY = "dgx-h100:1"


def uniform_split(kinds: list[str], stages: int) -> tuple[int, ...]:
    """Layers (kind 'transformer') evenly; the embedding joins stage 0 and the head the last stage."""
    layers = [i for i, k in enumerate(kinds) if k == "transformer"]
    per, extra = divmod(len(layers), stages)
    bounds, at = [], 0
    for s in range(stages - 1):
        at += per + (1 if s < extra else 0)
        bounds.append(layers[at])
    return tuple(bounds)


def minmax_split(weights: np.ndarray, stages: int) -> tuple[int, ...]:
    """The min-max contiguous partition of ``weights`` (the balancing both DeepSpeed and torchgpipe do)."""
    mat = additive_matrix(weights)
    res = partition(len(weights), stages, stage_time=lambda s: mat, stage_memory=lambda s: np.zeros_like(mat),
                    caps=[1.0] * stages)
    return res.boundaries


def simulate_split(tab: StageTables, topo, ev, bounds: tuple[int, ...]) -> tuple[float, bool, float]:
    """Simpy step time of ``bounds`` under the planned configuration; (step, fits, worst peak/cap)."""
    c = ev.candidate
    place = placement(topo, c.pp, c.dp)
    caps = rank_caps(topo, place, max_memory_fraction=0.9)
    sched = make_schedule(c.schedule, c.pp, c.num_microbatches, c.chunks, buffers=list(ev.buffers))
    inflight = peak_in_flight(sched)
    edges = (0, *bounds, tab.n)
    ranges = list(zip(edges[:-1], edges[1:]))
    rec = []
    for s, (a, b) in enumerate(ranges):
        m0 = tab.memory_matrix(in_flight=inflight[s], buffers=ev.buffers[s], recompute=False)[a, b]
        rec.append(bool(m0 > caps[s % c.pp] / c.chunks))
    inp = sim_input(tables=tab, topology=topo, place=place, schedule=sched, ranges=ranges, buffers=ev.buffers,
                    recompute=rec, in_flight=inflight)
    res = simulate(inp)
    worst = max(peak / (caps[s % c.pp] / c.chunks) for s, peak in enumerate(res.peak_memory_bytes_per_stage))
    return res.step_time_s, worst <= 1.0 + 1e-12, worst


def main() -> int:
    topo = topology_preset(TOPOLOGY)
    print("command: .venv/bin/python benchmarks/planner_quality.py")
    print(f"topology {TOPOLOGY} ({topo.describe()}); schedule 1f1b and pp pinned, memory cap 90% of each GPU\n")
    header = f"{'model':<10} {'pp':>2} {'config':<26} {'split':<11} {'step s':>9} {'ratio':>7} {'fits':>5} {'peak/cap':>8}  blocks per stage"
    print(header)
    print("-" * len(header))
    ok = True
    for model, pp, gbatch, seq, mb in CASES:
        graphs: dict[int, object] = {}

        def graph_for(b: int, model: str = model, seq: int = seq, graphs: dict[int, object] = graphs):  # noqa: ANN202
            if b not in graphs:
                graphs[b] = trace_graph(model, micro_batch_size=b, seq_len=seq, dtype="bf16")
            return graphs[b]

        job = Job(model=model, topology=TOPOLOGY, global_batch=gbatch, seq_len=seq, dtype="bf16", pp=pp, schedule="1f1b",
                  microbatch_size=mb, max_memory_fraction=0.9)
        t0 = time.perf_counter()
        res = search(job, graph_for=graph_for, topology=topo)
        t_plan = time.perf_counter() - t0
        ev = res.best
        tab = res.stage_tables()
        g = tab.graph
        kinds = [n.kind for n in g.nodes]
        dt = rank_device_type(topo, placement(topo, pp, ev.candidate.dp), 0)
        f, b, _ = tab.node_times(dt)
        splits = {
            "planned": ev.split.boundaries,
            "uniform": uniform_split(kinds, pp),
            "parameters": minmax_split(np.array([n.param_count for n in g.nodes], dtype=float), pp),
            "time": minmax_split(f + b, pp),
        }
        cfg = f"dp={ev.candidate.dp} mb={ev.candidate.micro_batch_size} m={ev.candidate.num_microbatches}"
        planned_t = None
        for name, bounds in splits.items():
            step, fits, worst = simulate_split(tab, topo, ev, bounds)
            if name == "planned":
                planned_t = step
                assert abs(step - ev.sim.step_time_s) <= 1e-9 * step, (step, ev.sim.step_time_s)
            ratio = step / planned_t
            if ratio < 1.0 - 1e-12:
                ok = False
            edges = (0, *bounds, tab.n)
            per = [bb - aa for aa, bb in zip(edges, edges[1:])]
            print(f"{model:<10} {pp:>2} {cfg:<26} {name:<11} {step:>9.4f} {ratio:>7.3f} {'yes' if fits else 'NO':>5} "
                  f"{worst:>8.2f}  {per}")
        print(f"{'':<13} planned in {t_plan:.2f} s; peak {format_bytes(max(ev.sim.peak_memory_bytes_per_stage))}\n")
    print("ratio = heuristic step time / planned step time (>= 1: the planner is at least as fast)")
    print("PASS" if ok else "FAIL: a heuristic split simulated faster than the planned one")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
