"""`pipetrain graph`: the table, --json, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipetrain.cli import main
from pipetrain.commands.graph import human_bytes, human_count, human_flops
from pipetrain.graph import LayerGraph
from pipetrain.planner.trace import model_fingerprint


def test_graph_table_and_json(tmp_path, capsys) -> None:
    path = tmp_path / "tiny.json"
    assert main(["graph", "tiny-gpt", "--micro-batch-size", "2", "--seq-len", "64", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("layer.3", "head", "total", "225 K", "tied: wte.weight", "wrote"):
        assert text in out, text
    g = LayerGraph.load(path)
    assert (g.micro_batch_size, g.seq_len, g.num_nodes) == (2, 64, 6)
    assert g.fingerprint == model_fingerprint("tiny-gpt")
    assert json.loads(path.read_text())["fingerprint"] == g.fingerprint


def test_graph_op_granularity_resnet(capsys) -> None:
    assert main(["graph", "resnet", "--granularity", "op", "--dtype", "bf16", "--micro-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "op granularity" in out and "Conv2d" in out and "2 tensor(s)" in out


@pytest.mark.parametrize("argv,needle", [
    (["graph", "gpt5"], "known presets: gpt2"),
    (["graph", "no_such_pkg.models:build"], "cannot import module 'no_such_pkg.models'"),
    (["graph", "json:no_factory"], "has no callable 'no_factory'"),
    (["graph", "gpt2", "--seq-len", "2048"], "exceeds the context of 'gpt2' (1024)"),
    (["graph", "gpt2", "--seq-len", "0"], "sequence length must be an integer >= 1"),
    (["graph", "gpt2", "--micro-batch-size", "0"], "micro-batch size must be an integer >= 1"),
    (["graph", "resnet", "--seq-len", "16"], "no sequence length"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_subprocess_error_has_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipetrain", "graph", "nonexistent-model"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "llama2-70b" in proc.stderr


def test_human_units() -> None:
    assert human_flops(1.61e12) == "1.61 TFLOP"
    assert human_bytes(50_397_184) == "48.1 MiB"
    assert human_count(124_439_808) == "124 M"
    assert human_bytes(512) == "512 B"
