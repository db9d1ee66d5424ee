"""Topology: YAML loading, presets with datasheet constants, links, and errors naming the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipetrain.errors import ConfigError
from pipetrain.hardware import local_cpu_device_type
from pipetrain.topology import GiB, Topology, load_topology, resolve_topology, topology_preset

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
name: t
device_types:
  fast: {peak_flops: {fp32: 1.0e+12, bf16: 4.0e+12}, memory_bytes: 1.0e+9, memory_bandwidth_bytes_per_s: "1e11"}
nodes:
  - devices: {fast: 2}
    link: {kind: nvlink, bandwidth_bytes_per_s: 1.0e+10, latency_s: 1.0e-6}
  - devices: [fast, h100-sxm]
    link: {kind: pcie, bandwidth_bytes_per_s: 2.0e+9, latency_s: 1.0e-5}
inter_node: {kind: roce, nic_bandwidth_bytes_per_s: 1.0e+9, nics_per_node: 2, latency_s: 2.0e-5}
"""


def test_yaml_loads_mixed_types_ids_and_links() -> None:
    t = load_topology(GOOD)
    assert [d.id for d in t.devices] == ["node0/gpu0", "node0/gpu1", "node1/gpu0", "node1/gpu1"]
    assert t.device_type_of("node1/gpu1").name == "h100-sxm"
    fast = t.device_type_of(0)
    assert fast.peak_flops("bf16") == 4e12 and fast.peak_flops("fp16") == 1e12  # fp16 defaults to fp32
    assert fast.memory_bandwidth_bytes_per_s == 1e11 and fast.efficiency == 0.5
    same = t.link_between("node0/gpu0", "node0/gpu1")
    assert (same.kind, same.bandwidth_bytes_per_s, same.latency_s) == ("nvlink", 1e10, 1e-6)
    cross = t.link_between("node0/gpu1", "node1/gpu0")
    assert (cross.kind, cross.bandwidth_bytes_per_s, cross.latency_s, cross.resource) == ("roce", 1e9, 2e-5, "node0/nic1")
    # pcie is a shared bus: both directions use one resource
    assert t.link_between(2, 3).resource == t.link_between(3, 2).resource == "node1/pcie"
    assert t.link_between(0, 0).kind == "local"


def test_presets_carry_datasheet_numbers() -> None:
    h = topology_preset("dgx-h100:2")
    assert h.num_devices == 16 and len(h.nodes) == 2
    dt = h.device_type_of("node1/gpu7")
    assert dt.peak_flops("bf16") == pytest.approx(989.4e12) and dt.memory_bandwidth_bytes_per_s == 3.35e12
    assert dt.memory_bytes == 80 * GiB
    assert h.link_between("node0/gpu0", "node0/gpu5").bandwidth_bytes_per_s == 450e9
    assert h.link_between("node0/gpu0", "node1/gpu0").bandwidth_bytes_per_s == 50e9
    assert h.inter_node is not None and h.inter_node.node_bandwidth_bytes_per_s == 400e9
    a = topology_preset("dgx-a100-80g:1").device_type_of(0)
    assert (a.peak_flops("fp32"), a.peak_flops("bf16"), a.memory_bandwidth_bytes_per_s) == (19.5e12, 312e12, 2.039e12)
    assert topology_preset("h200:1").device_type_of(0).memory_bandwidth_bytes_per_s == 4.8e12
    assert topology_preset("h200:1").device_type_of(0).memory_bytes == 141 * GiB
    m = topology_preset("mixed-a100-h100")
    assert sorted(d.type.name for d in m.devices) == ["a100-80g", "a100-80g", "h100-sxm", "h100-sxm"]


def test_local_cpu_preset_is_detected_and_records_shared_cores() -> None:
    cores = os.cpu_count() or 1
    t = topology_preset(f"local-cpu:{2 * cores}")
    assert t.num_devices == 2 * cores and t.node_cores(0) == cores
    dt = t.device_type_of(0)
    assert dt.kind == "cpu" and dt.cores == 1
    with open("/proc/meminfo") as fh:
        total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    assert dt.memory_bytes == pytest.approx(total_kb * 1024 / (2 * cores))
    one = local_cpu_device_type(1)
    assert one.cores == cores and one.peak_flops("fp32") == pytest.approx(dt.peak_flops("fp32") * cores)


def test_wakeup_latency_reaches_the_compute_group() -> None:
    """A node's wakeup_s (YAML, or a calibration) becomes its time-sliced compute group's, when ranks outnumber cores."""
    from pipetrain.program.lower import compute_groups as _compute_groups
    from pipetrain.program.lower import placement

    path = ROOT / "examples/topologies/cpu-box.yaml"
    t = resolve_topology(str(path))
    assert t.nodes[0].wakeup_s == pytest.approx(2e-3) and t.nodes[0].cores == 2
    (g,) = _compute_groups(t, placement(t, 4, 1))
    assert g.ranks == (0, 1, 2, 3) and g.capacity == 2 and g.wakeup_s == pytest.approx(2e-3)
    assert _compute_groups(t, placement(t, 2, 1)) == ()  # two ranks, two cores: no sharing, no wait
    with pytest.raises(ConfigError, match=r"nodes\[0\]\.wakeup_s"):
        load_topology(path.read_text().replace("wakeup_s: 2.0e-3", "wakeup_s: -1"))


def test_corun_speed_reaches_the_compute_group() -> None:
    """A node's measured corun_speed (YAML, or a calibration) makes a time-sliced group even when
    every rank has a core, and a data-parallel run reads it at the node's count of computing ranks."""
    from dataclasses import replace

    from pipetrain.program.lower import compute_groups as _compute_groups
    from pipetrain.program.lower import placement

    path = ROOT / "examples/topologies/cpu-box.yaml"
    text = path.read_text().replace("wakeup_s: 2.0e-3", "wakeup_s: 2.0e-3\n    corun_speed: [1.0, 0.9, 0.7, 0.45]")
    t = load_topology(text)
    assert t.nodes[0].corun_speed == (1.0, 0.9, 0.7, 0.45)
    (g,) = _compute_groups(t, placement(t, 2, 1))  # two ranks on two cores: slowed, not queued
    assert g.capacity == 2 and g.speed == (1.0, 0.9)
    (g4,) = _compute_groups(t, placement(t, 4, 1))
    assert g4.capacity == 2 and g4.speed == (1.0, 0.9, 0.7, 0.45)
    (gd,) = _compute_groups(t, placement(t, 2, 2))  # the other replica computes alongside: 2k of the node
    assert gd.capacity == 1 and gd.speed == (0.9, 0.45)
    flat = replace(t, nodes=(replace(t.nodes[0], corun_speed=(1.0, 1.0)),))
    assert _compute_groups(flat, placement(flat, 2, 1)) == ()  # nothing slows: no group
    cold = load_topology(text.replace("[1.0, 0.9, 0.7, 0.45]", "[1.0, 1.0]\n    resume_s: 3.0e-4\n    switch_s: 5.0e-4"))
    (gc,) = _compute_groups(cold, placement(cold, 2, 1))  # slower after waits: a group again
    assert (gc.resume_s, gc.switch_s, gc.speed) == (pytest.approx(3e-4), pytest.approx(5e-4), (1.0, 1.0))
    with pytest.raises(ConfigError, match="resume_s and switch_s must be in"):
        load_topology(text.replace("[1.0, 0.9, 0.7, 0.45]", "[1.0, 1.0]\n    switch_s: 2"))
    for bad, msg in (("[1.0, 0]", r"nodes\[0\]\.corun_speed\[1\]"), ("0.9", "must be a list"), ("[1.0, 2.0]", r"\(0, 1.5\]")):
        with pytest.raises(ConfigError, match=msg):
            load_topology(text.replace("[1.0, 0.9, 0.7, 0.45]", bad))
    with pytest.raises(ConfigError, match="need cores > 0"):
        load_topology(text.replace("cores: 2", "cores: 0"))


def test_resolve_takes_presets_and_example_files() -> None:
    assert resolve_topology("local-cpu:2").num_devices == 2
    files = sorted((ROOT / "examples" / "topologies").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        t = resolve_topology(str(f))
        assert isinstance(t, Topology) and t.num_devices >= 1
    assert resolve_topology(str(ROOT / "examples/topologies/dgx-h100x2.yaml")).num_devices == 16


@pytest.mark.parametrize("text, field", [
    (GOOD.replace("bandwidth_bytes_per_s: 1.0e+10", "bandwidth_bytes_per_s: -5"), "nodes[0].link.bandwidth_bytes_per_s"),
    (GOOD.replace("[fast, h100-sxm]", "[fast, tpu-v9]"), "unknown device type 'tpu-v9'"),
    (GOOD.replace("memory_bytes: 1.0e+9, ", ""), "missing key 'memory_bytes'"),
    (GOOD.replace("inter_node: {kind: roce, nic_bandwidth_bytes_per_s: 1.0e+9, nics_per_node: 2, latency_s: 2.0e-5}", ""), "inter_node is missing"),
    (GOOD.replace("latency_s: 2.0e-5", "latency_s: soon"), "inter_node.latency_s"),
    (GOOD.replace("kind: pcie", "kind: carrier-pigeon"), "nodes[1].link.kind"),
    (GOOD.replace("  - devices: [fast", "  - devcies: [fast"), "unknown key 'devcies'"),
    ("nodes: [", "not valid YAML at line"),
    ("- just\n- a list\n", "top level must be a mapping"),
])
def test_errors_name_the_field_on_one_line(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_topology(text)
    msg = str(exc.value)
    assert field in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["dgx-h100:0", "dgx-h100:x", "tpu-pod:4", "mixed-a100-h100:3"])
def test_bad_preset_names(name: str) -> None:
    with pytest.raises(ConfigError):
        topology_preset(name)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_topology(str(tmp_path / "nope.yaml"))


# ----- property: random YAML either loads or raises ConfigError -----------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**13), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=8), st.sampled_from(["nvlink", "pcie", "infiniband", "h100-sxm", "1e9", "-1", "fp32"]))
_keys = st.sampled_from(["name", "nodes", "devices", "link", "kind", "bandwidth_bytes_per_s", "latency_s", "count", "cores",
                         "inter_node", "nic_bandwidth_bytes_per_s", "nics_per_node", "device_types", "peak_flops",
                         "memory_bytes", "memory_bandwidth_bytes_per_s", "efficiency", "h100-sxm", "fp32", "bf16", "x"])
_trees = st.recursive(_scalars, lambda ch: st.one_of(st.lists(ch, max_size=4), st.dictionaries(_keys, ch, max_size=6)), max_leaves=25)


def _mutations(draw: st.DrawFn) -> object:
    base = yaml.safe_load(GOOD)
    path: list[object] = []
    node: object = base
    for _ in range(draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            k = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
        else:
            break
        path.append(k)
        node = node[k]  # type: ignore[index]
    if not path:
        return draw(_trees)
    parent: object = base
    for k in path[:-1]:
        parent = parent[k]  # type: ignore[index]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(_trees)  # type: ignore[index]
    return base


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.composite(_mutations)(), _trees.map(lambda t: {"nodes": t})), st.booleans())
def test_random_yaml_loads_or_raises_config_error(tree: object, as_text: bool) -> None:
    text = yaml.safe_dump(tree) if as_text else str(tree)
    try:
        t = load_topology(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert t.num_devices >= 1
    for d in t.devices:
        t.link_between(t.devices[0], d)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_random_text_loads_or_raises_config_error(text: str) -> None:
    try:
        load_topology(text)
    except ConfigError:
        pass


def test_absurd_counts_are_refused_not_built() -> None:
    with pytest.raises(ConfigError, match=r"nodes\[0\].count"):
        load_topology(GOOD.replace("  - devices: {fast: 2}", "  - count: 10000000000000\n    devices: {fast: 2}"))


def test_example_yaml_matches_its_preset() -> None:
    y = resolve_topology(str(ROOT / "examples/topologies/dgx-h100x2.yaml"))
    p = topology_preset("dgx-h100:2")
    assert [d.id for d in y.devices] == [d.id for d in p.devices]
    for a, b in zip(y.devices, p.devices):
        assert a.type.peak_flops("bf16") == pytest.approx(b.type.peak_flops("bf16"))
        assert (a.type.memory_bytes, a.type.memory_bandwidth_bytes_per_s) == (b.type.memory_bytes, b.type.memory_bandwidth_bytes_per_s)
    for a, b in [(0, 1), (0, 8), (9, 3)]:
        ly, lp = y.link_between(a, b), p.link_between(a, b)
        assert (ly.kind, ly.bandwidth_bytes_per_s, ly.latency_s, ly.resource) == (lp.kind, lp.bandwidth_bytes_per_s, lp.latency_s, lp.resource)
