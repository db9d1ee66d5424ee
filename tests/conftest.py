"""Shared pytest set-up: GPU tests skip without CUDA; the ``two_nodes`` fixture (tests/netns.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from netns import TwoNodes, unavailable_reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(name="two_nodes")
def two_nodes_fixture() -> Iterator[TwoNodes]:
    """Two network-namespace nodes (tests/netns.py), closed when the test ends, failed or not;
    skips with the reason where namespaces cannot be made."""
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    nodes = TwoNodes()
    try:
        nodes.open()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        nodes.close()
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture()
def one_rank_group(tmp_path):  # type: ignore[no-untyped-def]
    """A real one-rank gloo process group (a file store under ``tmp_path``), destroyed after the test."""
    import datetime

    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()
