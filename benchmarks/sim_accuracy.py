"""Simulator accuracy: simulated vs measured step time, stage busy time, bubble and activation memory.

For each configuration of a grid (tiny-gpt and the uneven MLP; p in {2, 4}; m in {2, 4, 8, 16};
GPipe and 1F1B; one data-parallel d=2 configuration; tiny-gpt with tensor parallelism t=2 at p=1
and p=2, 1F1B) it fixes the plan (blocks split evenly,
so the MLP's stages are unbalanced), simulates it with the calibration of this machine
(``pipetrain calibrate``: profiled blocks, gloo p2p and collectives, optimizer step, co-run speed, and
with t=2 configurations the executor's tensor-parallel compute, ``--tp 2``; the local-cpu topology's
cores give the compute groups), runs it for real (gloo, one thread per rank) and
compares the medians over the measured steps. Prints one row per configuration (errors are
(simulated - measured) / measured; bubble in percentage points), the step-time MAPE, the worst
configuration, the Spearman rank correlation of the configurations by step time, and the share
of stages whose busy time and activation memory are within 10%; writes ``OUT/sim_accuracy.json``
and a scatter plot ``OUT/sim_accuracy.png``.

A shared machine's speed drifts: a fixed workload's medians wander between windows of a few
seconds, and the speed of two processes computing at once (the co-run probe's k = 2) against
their speed alone wanders over minutes. So the grid runs in ``--rounds`` rounds (default 3), each in
its own shuffled order, and every configuration's steps are pooled over its rounds: a drift hits
every configuration alike instead of the few that ran during it. Likewise the calibration: each
round starts with one, and the simulation uses their medians
(:func:`pipetrain.calibration.measured.combine_calibrations`): one calibration's numbers moved
more between calibrations half an hour apart than the pooled measurements of the same
configurations did. Nothing measured inside a run feeds its own prediction. (Tried and dropped:
re-probing the co-run speed before every run and simulating with the probes' mean over the
benchmark; on the same runs it predicted worse than the calibration's own probe.)

With two rounds or more it also compares one round at a time: the simulation against each round's
median step, and beside it the configuration's other rounds pooled against the same round (the
measurement predicting itself). The second is the floor under any prediction's error on the
machine. Figures from past runs: benchmarks/RESULTS.md.

The machine load (the share of the cores other processes used during each run's measured steps,
from /proc/stat less the workers' own CPU) is printed; ``--wait-idle S`` waits for a quiet moment
before each run. Because such load only ever adds time, the errors are also given against the
lower quartile of the measured steps (``q1``).

    .venv/bin/python benchmarks/sim_accuracy.py [--subset] [--rounds 3] [--steps 24] [--out runs/sim_accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipetrain.validation.fidelity import Fidelity, compare, mape, simulate_plan, spearman  # noqa: E402
from pipetrain.validation.measure import measure_run  # noqa: E402

#: model -> (micro-batch size, seq len)
SHAPES = {"tiny-gpt": (2, 128), "mlp-uneven": (64, None)}


def grid(subset: bool) -> list[tuple[str, int, int, int, str, int]]:
    """(model, pp, dp, m, schedule, tp) of every configuration."""
    ms = (2, 8) if subset else (2, 4, 8, 16)
    out = [(model, p, 1, m, sched, 1) for model in SHAPES for p in (2, 4) for m in ms for sched in ("gpipe", "1f1b")]
    if subset:
        out = [c for c in out if not (c[1] == 4 and c[3] == 2)]
    out.append(("tiny-gpt", 2, 2, 8, "1f1b", 1))
    out += [("tiny-gpt", p, 1, 8, "1f1b", 2) for p in (1, 2)]  # tensor parallelism: 2 and 4 ranks
    return out


def config_name(cfg: tuple[str, int, int, int, str, int]) -> str:
    model, p, d, m, sched, t = cfg
    return f"{model}-" + (f"t{t}" if t > 1 else "") + f"p{p}d{d}m{m}-{sched}"


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def cpu_busy_s() -> float:
    """Seconds all cores of this machine spent not idle (/proc/stat: user+nice+system+irq+softirq+steal)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the run's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """Samples, in a thread, the CPU other processes use while the measured steps of a run execute.

    The window opens once every rank has logged step ``warmup - 1`` (start-up and warm-up left out)
    and closes when the first worker exits; foreign CPU = machine busy time (/proc/stat) minus the
    workers' own (/proc/PID/stat) minus this process's.
    """

    def __init__(self, run_dir: Path, world: int, warmup: int) -> None:
        import threading

        self.run_dir, self.world, self.warmup = run_dir, world, warmup
        self.first: tuple[float, float, float] | None = None
        self.last: tuple[float, float, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _workers_cpu(self) -> float | None:
        total = 0.0
        for r in range(self.world):
            try:
                pid = int((self.run_dir / "pids" / f"rank{r}").read_text())
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                return None
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def _started(self) -> bool:
        need = f'"step": {self.warmup - 1},' if self.warmup > 0 else '"type": "meta"'
        try:
            return all(need in (self.run_dir / "telemetry" / f"rank{r}.jsonl").read_text() for r in range(self.world))
        except OSError:
            return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.first is not None or self._started():
                w = self._workers_cpu()
                if w is None:
                    if self.first is not None:
                        return
                else:
                    t = os.times()
                    sample = (time.monotonic(), cpu_busy_s() - w - (t.user + t.system), w)
                    if self.first is None:
                        self.first = sample
                    self.last = sample
            time.sleep(0.2)

    def __enter__(self) -> ForeignLoad:
        for f in (self.run_dir / "pids").glob("rank*"):
            f.unlink()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def share(self) -> float:
        """Mean share of the machine's cores other processes used in the window (nan: window too short)."""
        if self.first is None or self.last is None or self.last[0] - self.first[0] < 0.5:
            return float("nan")
        return max(0.0, self.last[1] - self.first[1]) / ((self.last[0] - self.first[0]) * (os.cpu_count() or 1))


def wait_idle(max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until no other process has been runnable for 1 s; return the seconds waited."""
    t0 = time.monotonic()
    quiet_since = None
    while time.monotonic() - t0 < max_wait_s:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        if running <= 1:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 1.0:
                break
        else:
            quiet_since = None
        time.sleep(0.1)
    return time.monotonic() - t0


def config_plan(cfg: tuple[str, int, int, int, str, int], out: Path) -> tuple[str, object]:
    """(name, plan) of a configuration; the plan is saved as OUT/NAME/plan.json."""
    from pipetrain.executor.plans import simple_plan
    from pipetrain.planner.zoo import get_model_spec

    model, p, d, m, sched, t = cfg
    mbs, seq = SHAPES[model]
    seq_len = get_model_spec(model).check_shape(mbs, seq)
    plan = simple_plan(model, pp=p, dp=d, m=m, mbs=mbs, seq_len=seq_len, schedule=sched, tp=t)
    name = config_name(cfg)
    plan.save(out / name / "plan.json")
    return name, plan


def run_chunk(name: str, plan: object, out: Path, steps: int, warmup: int, rnd: int) -> tuple[Path, float]:
    """Run the configuration once (round ``rnd``) into OUT/NAME/run{rnd}; (run directory, other processes' CPU share)."""
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch

    world = plan.world_size  # type: ignore[attr-defined]
    busy0, own0, t0 = cpu_busy_s(), own_cpu_s(), time.monotonic()
    run_dir = out / name / f"run{rnd}"
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    with ForeignLoad(run_dir, world, warmup) as fl:
        launch(RunConfig(plan_path=str(out / name / "plan.json"), run_dir=str(run_dir), steps=steps, threads=1, timeout_s=120))
    wall = time.monotonic() - t0
    # share of the machine's cores other processes used during the measured steps (whole launch if too short)
    load = fl.share
    if load != load:
        load = max(0.0, (cpu_busy_s() - busy0) - (own_cpu_s() - own0)) / (wall * (os.cpu_count() or 1))
    return run_dir, load


def evaluate(name: str, plan: object, dirs: list[Path], warmup: int, cal: object) -> tuple[Fidelity, float]:
    """(fidelity of the pooled runs against ``cal``'s simulation, simulated step without the host cost per message)."""
    from dataclasses import replace

    meas = measure_run(dirs, plan, warmup_steps=warmup)  # type: ignore[arg-type]
    inp, sim, source = simulate_plan(plan, calibration=cal)  # type: ignore[arg-type]
    without = simulate_plan(plan, calibration=replace(cal, messages=()))[1].step_time_s  # type: ignore[arg-type]  # ablation
    return compare(plan, inp, sim, meas, label=name, cost_source=source), without  # type: ignore[arg-type]


def against_rounds(plan: object, dirs: list[Path], warmup: int, sim_step_s: float) -> tuple[list[float], list[float]]:
    """Against each round's own median step: (the simulation's errors, the other rounds' pooled
    median's errors). The second is the measurement predicting itself, with the same target and
    steps: how far this machine puts a configuration's step time between rounds minutes apart,
    the floor under the first. (Empty with one round.)"""
    sim, self_ = [], []
    for i, d in enumerate(dirs if len(dirs) > 1 else ()):
        this = measure_run([d], plan, warmup_steps=warmup).step_time_s  # type: ignore[arg-type]
        rest = measure_run([x for j, x in enumerate(dirs) if j != i], plan, warmup_steps=warmup).step_time_s  # type: ignore[arg-type]
        sim.append((sim_step_s - this) / this)
        self_.append((rest - this) / this)
    return sim, self_


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", action="store_true", help="a representative subset (m in {2, 8}; no p=4 m=2)")
    ap.add_argument("--steps", type=int, default=24, help="steps per run (default 24; each configuration runs once per round)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the grid, each in its own order (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians (default 2)")
    ap.add_argument("--out", default="runs/sim_accuracy", help="output directory")
    ap.add_argument("--calibration", default=None, help="calibration JSON (default: calibrate at the start of every round, into OUT/calibrationR.json, "
                         "and use their median, OUT/calibration.json)")
    ap.add_argument("--seed", type=int, default=0, help="shuffles the order of the runs")
    ap.add_argument("--reuse", action="store_true",
                    help="run nothing: simulate again and compare with the runs and calibrations already in OUT "
                         "(after a change to the simulator; OUT/calibration*.json, OUT/NAME/run*)")
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="run only configurations whose name contains TEXT (repeatable), e.g. tiny-gpt-p2d1m2")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds for no other runnable process (shared machines)")
    a = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    from pipetrain.calibration.measured import combine_calibrations, load_calibration
    from pipetrain.calibration.run import run_calibration

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sim_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"reproduce: {cmd}")
    print(f"machine: {os.cpu_count()} cores; load average at start {loadavg():.2f}")
    t0 = time.perf_counter()

    def calibrate(rnd: int) -> object:
        n = max(p * d * t for _m, p, d, _mm, _s, t in configs)
        tps = sorted({t for *_, t in configs if t > 1})
        c = run_calibration(f"local-cpu:{n}", shapes=[(m, s[0]) for m, s in SHAPES.items() if any(c[0] == m for c in configs)],
                            tensor_parallel=tps,
                            progress=lambda msg: print(f"  calibrate: {msg}", flush=True))
        c.save(out / f"calibration{rnd}.json")
        return c

    configs = grid(a.subset)
    if a.only:
        configs = [c for c in configs if any(t in config_name(c) for t in a.only)]
        if len(configs) < 2:
            ap.error("--only must leave at least two configurations (a rank correlation needs two)")
    if a.reuse:
        cals = [load_calibration(f) for f in sorted(out.glob("calibration[0-9]*.json"))] or [load_calibration(out / "calibration.json")]
    else:
        cals = [load_calibration(a.calibration) if a.calibration else calibrate(0)]
    cal = cals[0]
    print(f"calibration: p2p {cal.p2p.latency_s * 1e6:.0f} us + {cal.p2p.bandwidth_bytes_per_s / 1e9:.2f} GB/s; "
          f"analytic fit error {cal.fit.error_before * 100:.0f}% -> {cal.fit.error_after * 100:.0f}%")
    if a.rounds < 1 or a.steps <= a.warmup:
        ap.error("--rounds must be >= 1 and --steps larger than --warmup")
    plans = {cfg: config_plan(cfg, out) for cfg in configs}
    dirs: dict[tuple, list[Path]] = {cfg: [] for cfg in configs}
    loads: dict[tuple, list[float]] = {cfg: [] for cfg in configs}
    for cfg in configs if a.reuse else ():
        dirs[cfg] = sorted(p.parent for p in (out / plans[cfg][0]).glob("run*/telemetry"))
        loads[cfg] = [float("nan")]
        if not dirs[cfg]:
            ap.error(f"--reuse: {out / plans[cfg][0]} has no runs; run the benchmark into {out} first")
    for rnd in range(0 if a.reuse else a.rounds):
        if rnd > 0 and not a.calibration:
            cals.append(calibrate(rnd))
        order = list(configs)
        random.Random(a.seed * 1000 + rnd).shuffle(order)
        for cfg in order:
            if a.wait_idle > 0:
                wait_idle(a.wait_idle)
            run_dir, load = run_chunk(*plans[cfg], out, a.steps, a.warmup, rnd)
            dirs[cfg].append(run_dir)
            loads[cfg].append(load)
        print(f"  round {rnd + 1}/{a.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    cal = combine_calibrations(cals)
    cal.save(out / "calibration.json")

    def per_mb_ms(c: object, o: object) -> str:  # the in-run cost of a micro-batch, one rank
        r = c.runtime_for(o.model, o.micro_batch_size, o.seq_len)  # type: ignore[attr-defined]
        return f"{r.factor * r.profiled_microbatch_s * 1e3:.1f}" if r is not None else "-"

    print(f"calibration: the median of {len(cals)}; in-run cost of a micro-batch in each: "
          + "; ".join(f"{o.model} {', '.join(per_mb_ms(c, o) for c in cals)} ms" for o in cal.runtime))
    if cal.corun:
        print(f"co-run speed (calibrated): {', '.join(f'{v:.3f}' for v in cal.corun_speed())} with 1..{len(cal.corun_speed())} ranks computing")
    results: list[tuple[Fidelity, float]] = []
    no_host: list[float] = []  # step error of the same runs simulated without the host cost per message
    round_sim: list[float] = []  # per round: the simulation against that round's median step
    round_self: list[float] = []  # per round: the other rounds' pooled median against it
    hdr = f"{'config':34s} {'sim ms':>8s} {'meas ms':>8s} {'step err':>8s} {'IQR %':>6s} {'busy err':>8s} " \
          f"{'bubble sim/meas %':>17s} {'act err':>7s} {'other %':>7s} {'q1 err':>7s}"
    print(hdr)
    for cfg in sorted(configs):
        name, plan = plans[cfg]
        f, without = evaluate(name, plan, dirs[cfg], a.warmup, cal)
        load = sum(loads[cfg]) / len(loads[cfg])
        results.append((f, load))
        no_host.append((without - f.meas_step_s) / f.meas_step_s)
        rs, rm = against_rounds(plan, dirs[cfg], a.warmup, f.sim_step_s)
        round_sim += rs
        round_self += rm
        iqr = (f.meas_step_iqr_s[1] - f.meas_step_iqr_s[0]) / f.meas_step_s * 100
        worst_busy = max((s.busy_error for s in f.stages), key=abs)
        worst_act = max((s.activation_error for s in f.stages), key=abs)
        print(f"{f.label:34s} {f.sim_step_s * 1e3:8.1f} {f.meas_step_s * 1e3:8.1f} {f.step_error * 100:+7.1f}% {iqr:6.1f} "
              f"{worst_busy * 100:+7.1f}% {f.sim_bubble * 100:8.1f}/{f.meas_bubble * 100:<8.1f} {worst_act * 100:+6.1f}% {load * 100:6.0f}% "
              f"{f.quiet_step_error * 100:+6.1f}%", flush=True)
        if f.has_tp:  # the tensor-parallel collectives inside F and B, per step, simulated (calibrated) vs measured
            print("    tp comm per step, sim/meas ms: " + ", ".join(
                f"stage {s.stage} {s.sim_tp_comm_s * 1e3:.1f}/{s.meas_tp_comm_s * 1e3:.1f}" for s in f.stages), flush=True)
    fids = [f for f, _ in results]
    errs = [f.step_error for f in fids]
    busy = [s.busy_error for f in fids for s in f.stages]
    act = [s.activation_error for f in fids for s in f.stages]
    bub = [s.bubble_error_pp for f in fids for s in f.stages]
    rho = spearman([f.sim_step_s for f in fids], [f.meas_step_s for f in fids])
    q_errs = [f.quiet_step_error for f in fids]
    q_busy = [s.quiet_busy_error for f in fids for s in f.stages]
    own = [s.quiet_busy_error for f in fids for s in f.stages if not s.shared]
    shared = [s.quiet_busy_error for f in fids for s in f.stages if s.shared]
    q_rho = spearman([f.sim_step_s for f in fids], [f.meas_step_iqr_s[0] for f in fids])
    worst = max(fids, key=lambda f: abs(f.step_error))
    summary = {
        "configs": len(fids), "step_mape": mape(errs), "step_max_abs_error": abs(worst.step_error), "worst_config": worst.label,
        "spearman_step_time": rho, "busy_mape": mape(busy), "busy_within_10pct": sum(abs(e) <= 0.10 for e in busy) / len(busy),
        "busy_max_abs_error": max(abs(e) for e in busy), "bubble_mean_abs_diff_pp": mape(bub),
        "activation_mape": mape(act), "activation_within_10pct": sum(abs(e) <= 0.10 for e in act) / len(act),
        "activation_max_abs_error": max(abs(e) for e in act), "other_cpu_share_min": min(ld for _, ld in results),
        "other_cpu_share_max": max(ld for _, ld in results), "elapsed_s": time.perf_counter() - t0, "steps": a.steps, "warmup": a.warmup,
        "subset": a.subset, "command": cmd, "step_mape_without_message_host_cost": mape(no_host),
        "quiet_step_mape": mape(q_errs), "quiet_step_max_abs_error": max(abs(e) for e in q_errs), "quiet_spearman": q_rho,
        "quiet_busy_mape": mape(q_busy), "quiet_busy_mape_own_core": mape(own), "quiet_busy_mape_shared_cores": mape(shared),
        "quiet_busy_within_10pct_own_core": sum(abs(e) <= 0.10 for e in own) / max(1, len(own)),
        "quiet_busy_within_10pct": sum(abs(e) <= 0.10 for e in q_busy) / len(q_busy),
        "rounds": a.rounds, "corun_speed": list(cal.corun_speed()),
    }
    if round_self:
        summary.update(round_sim_step_mape=mape(round_sim), round_sim_step_max_abs_error=max(map(abs, round_sim)),
                       round_self_step_mape=mape(round_self), round_self_step_max_abs_error=max(map(abs, round_self)))
    print()
    print(f"step time: MAPE {summary['step_mape'] * 100:.1f}% (target <= 5%), worst {worst.label} {worst.step_error * 100:+.1f}% "
          f"(target <= 10%), Spearman {rho:.3f} (target >= 0.9); the same runs simulated without the calibrated host "
          f"CPU per message: MAPE {mape(no_host) * 100:.1f}%")
    if round_self:
        print(f"one round at a time ({a.steps} steps each): the simulation's step MAPE {mape(round_sim) * 100:.1f}%, worst "
              f"{summary['round_sim_step_max_abs_error'] * 100:.1f}%; the configuration's other rounds pooled, predicting it: "
              f"MAPE {mape(round_self) * 100:.1f}%, worst {summary['round_self_step_max_abs_error'] * 100:.1f}% "
              "(how well this machine reproduces its own measurement)")
    print(f"stage busy: MAPE {summary['busy_mape'] * 100:.1f}%, within 10%: {summary['busy_within_10pct'] * 100:.0f}% of "
          f"{len(busy)} stages, worst {summary['busy_max_abs_error'] * 100:.1f}%")
    print(f"against the lower quartile of the measured steps and stage busy times (least disturbed by other processes): "
          f"step MAPE {summary['quiet_step_mape'] * 100:.1f}%, worst {summary['quiet_step_max_abs_error'] * 100:.1f}%, "
          f"Spearman {q_rho:.3f}; stage busy MAPE {summary['quiet_busy_mape'] * 100:.1f}%, within 10%: "
          f"{summary['quiet_busy_within_10pct'] * 100:.0f}%")
    print(f"  stages on their own core: busy MAPE {mape(own) * 100:.1f}% ({len(own)} stages, within 10%: "
          f"{summary['quiet_busy_within_10pct_own_core'] * 100:.0f}%); stages sharing cores: {mape(shared) * 100:.1f}% ({len(shared)}; "
          "busy there, simulated and measured, includes waits for a core)")
    shares = [ld for _, ld in results]
    if max(shares) - min(shares) >= 0.1:  # a fit needs a spread of outside load
        import numpy as np

        b1, b0 = np.polyfit(shares, errs, 1)
        q1, q0 = np.polyfit(shares, q_errs, 1)
        r = float(np.corrcoef(shares, errs)[0, 1])
        summary.update(error_vs_other_share_slope=float(b1), error_at_no_other_load=float(b0), quiet_error_at_no_other_load=float(q0),
                       error_other_share_correlation=r)
        print(f"diagnostic (an extrapolation, not a measurement): step error vs the other processes' CPU share, linear fit over "
              f"{len(fids)} configs (r = {r:+.2f}): {b1 * 100:+.0f}% per unit share; at no other load {b0 * 100:+.1f}% "
              f"(median steps), {q0 * 100:+.1f}% (lower quartile)")
    print(f"bubble: mean |sim - measured| {summary['bubble_mean_abs_diff_pp']:.1f} percentage points")
    print(f"activation memory in flight: MAPE {summary['activation_mape'] * 100:.1f}%, within 10%: "
          f"{summary['activation_within_10pct'] * 100:.0f}% of stages, worst {summary['activation_max_abs_error'] * 100:.1f}%")
    print(f"other processes used {summary['other_cpu_share_min'] * 100:.0f}% .. {summary['other_cpu_share_max'] * 100:.0f}% of the {os.cpu_count()} cores "
          f"during the runs (/proc/stat minus this benchmark's CPU); load average now {loadavg():.2f}; {summary['elapsed_s']:.0f} s")
    (out / "sim_accuracy.json").write_text(json.dumps({"summary": summary, "configs": [
        dict(f.to_dict(), other_cpu_share=ld, runs=[str(d) for d in dirs[cfg]]) for (f, ld), cfg in zip(results, sorted(configs))]}, indent=1))
    from pipetrain.reports.charts import scatter_figure

    fig = scatter_figure([f.sim_step_s for f in fids], [f.meas_step_s for f in fids], [f.label for f in fids],
                         title=f"step time: MAPE {summary['step_mape'] * 100:.1f}%, Spearman {rho:.2f}")
    fig.savefig(out / "sim_accuracy.png", dpi=120)
    from matplotlib.figure import Figure

    fig2 = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig2.add_subplot()
    ax.scatter([ld * 100 for _, ld in results], [e * 100 for e in errs], label="median step")
    ax.scatter([ld * 100 for _, ld in results], [e * 100 for e in q_errs], marker="x", label="lower-quartile step")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("CPU share used by other processes during the run (%)")
    ax.set_ylabel("step-time error, simulated vs measured (%)")
    ax.legend()
    fig2.savefig(out / "sim_accuracy_load.png", dpi=120)
    print(f"wrote {out / 'sim_accuracy.json'}, {out / 'sim_accuracy.png'} and {out / 'sim_accuracy_load.png'}")
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
