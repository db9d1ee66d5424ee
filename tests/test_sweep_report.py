"""`pipetrain sweep ... --report DIR`: sweep.json, a self-contained page with the plot, and the table it printed."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from pipetrain.cli import main
from pipetrain.errors import RunError
from pipetrain.reports.sweep import SWEEP_FILE, write_sweep_report

TINY = ["--model", "tiny-gpt", "--topology", "local-cpu:2", "--global-batch", "16", "--seq-len", "64", "--dtype", "fp32"]
_IMG = re.compile(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>")


def _printed_rows(out: str, ncols: int) -> dict[tuple[str, ...], list[str]]:
    """The rich table's body rows by their knob cells (a wrapped plan cell continues on lines with empty knob cells)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == ncols and cells[0] and cells[1] and not cells[0].startswith(("m", "p")):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_two_knobs_heat_map_and_json_rows_equal_printed_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    assert main(["sweep", *TINY, "--vary", "m=2,8", "--vary", "p=1,2", "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    page = (out / "report.html").read_text()
    imgs = _IMG.findall(page)
    assert len(imgs) == 1 and "step time over m x p" in imgs[0][0]
    png = base64.b64decode(imgs[0][1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (out / "sweep.png").read_bytes() and len(png) > 5000  # drawn, not blank
    assert "http" not in page.replace("http-equiv", "")  # self-contained
    data = json.loads((out / SWEEP_FILE).read_text())
    assert data["vary"] == ["m", "p"] and data["values"] == [[2, 8], [1, 2]]
    rows = data["rows"]
    assert [(r["m"], r["p"]) for r in rows] == [(2, 1), (2, 2), (8, 1), (8, 2)]
    table = _printed_rows(printed, 2 + 6)
    assert len(table) == 4, printed
    for r in rows:
        cells = table[(str(r["m"]), str(r["p"]))]
        assert r["error"] is None and float(cells[2]) == pytest.approx(r["step_time_s"], rel=5e-4)
        assert float(cells[3]) == pytest.approx(r["samples_per_s"], rel=5e-4)
        assert float(cells[5].rstrip("%")) == pytest.approx(r["bubble_fraction"] * 100, abs=0.051)
        assert r["plan"].startswith(cells[7]) and f"pp={r['p']}" in r["plan"]
        assert cells[2] in page and r["plan"] in page  # the page's table is the printed one
    p1 = {r["m"]: r for r in rows if r["p"] == 1}
    assert p1[2]["bubble_fraction"] == p1[8]["bubble_fraction"] == 0  # one stage: no bubble, whatever m
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == rows and summary["sections"] == ["sweep", "table"]


def test_one_knob_line_plot_with_an_infeasible_point_and_json_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep1"
    assert main(["sweep", *TINY, "--vary", "p=1,2,4", "--report", str(out), "--json"]) == 0
    cap = capsys.readouterr()
    printed = json.loads(cap.out)  # --json keeps stdout pure JSON; the paths go to stderr
    assert f"wrote {out / 'report.html'}" in cap.err
    data = json.loads((out / SWEEP_FILE).read_text())
    assert printed == data
    by = {r["p"]: r for r in data["rows"]}
    assert by[4]["error"] and by[4]["step_time_s"] is None and by[1]["error"] is None and by[2]["error"] is None
    page = (out / "report.html").read_text()
    imgs = _IMG.findall(page)
    assert len(imgs) == 1 and "over p" in imgs[0][0]
    assert "2 of 3 points fit" in page


def test_corrupt_sweep_file_is_a_run_error(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="does not exist"):
        write_sweep_report(tmp_path)
    (tmp_path / SWEEP_FILE).write_text('{"vary": ["m"], "rows": [{"p": 1}]}')
    with pytest.raises(RunError, match="corrupt"):
        write_sweep_report(tmp_path)
