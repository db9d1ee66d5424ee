"""Shared pytest set-up: GPU tests skip without CUDA; the ``two_nodes`` fixture (tests/netns.py); the
``launches`` of the executor that several test modules share."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


class Launches:
    """Runs of the executor's bare launcher, each (plan, arguments) launched once per session:
    tests/test_collectives.py reads the telemetry of the tp=2 x dp=2 ZeRO-1 run that
    tests/test_executor_parallel.py compares with the reference. :data:`CONCURRENT` run at once: a
    launch's wall time is mostly its interpreters starting (torch imports, the elastic agent, the
    rendezvous), which leaves a 2-core machine partly idle."""

    CONCURRENT = 2

    def __init__(self, base: Path) -> None:
        self.base = base
        self.pool = ThreadPoolExecutor(max_workers=self.CONCURRENT)
        self.runs: dict[tuple[str, tuple[str, ...]], tuple[Path, Future[subprocess.CompletedProcess[str]]]] = {}

    def start(self, plan: Any, *args: str) -> Path:
        """Queue the launch (if not yet); its run directory."""
        key = (plan.to_json(), args)
        if key not in self.runs:
            d = self.base / f"run{len(self.runs)}"
            plan.save(d / "plan.json")
            cmd = [sys.executable, "-m", "pipetrain.executor.launch", str(d / "plan.json"), "--run-dir", str(d / "run"), *args]
            self.runs[key] = (d / "run", self.pool.submit(subprocess.run, cmd, capture_output=True, text=True, timeout=240))
        return self.runs[key][0]

    def wait(self, plan: Any, *args: str) -> Path:
        """The run directory of the finished launch (started now if not yet), which succeeded."""
        run_dir = self.start(plan, *args)
        r = self.runs[(plan.to_json(), args)][1].result()
        assert r.returncode == 0, r.stderr[-3000:]
        return run_dir


@pytest.fixture(scope="session")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launches]:
    pytest.importorskip("torch")
    la = Launches(tmp_path_factory.mktemp("launches"))
    try:
        yield la
    finally:
        la.pool.shutdown(wait=True, cancel_futures=True)
