"""The benchmark harness runs end to end and reads its own output back.

``benchmarks/run.py`` is a script, not a timed test: this runs it with the
smallest sizes (a handful of tests, no pytest-forked venv) so a broken
harness is caught by the suite, and checks that its JSON holds every
section's figures and that its printed report shows them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
TINY = [
    "--n=6",
    "--reps=1",
    "--rows=fork,full",
    "--sections=1,2,3,4,6",
    "--sustained=9",
    "--window=3",
    "--tree-sizes=10,50",
    "--floor-iterations=2",
    "--set-up-reps=1",
    "--copy-reps=1",
    "--sleep=0.6",
    "--no-pytest-forked",
]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the harness builds sandboxes and cgroups: Linux, as root",
)


def test_tiny_run_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(RUN), *TINY, f"--json={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())

    overhead = figures["overhead"]
    for key in ("inline", "fork", "full"):
        assert overhead[key].get("problem") is None, overhead[key]
        assert overhead[key]["wall_s"]["median"] > 0
    # With 6 tests the sign of an overhead is noise; that it was computed is the point.
    assert isinstance(overhead["full"]["overhead_ms"]["median"], float)
    assert set(figures["floor"]["levels_ms"]) >= {"fork", "ns", "overlay", "lo"}
    assert set(figures["overlay"]) == {"10", "50"}
    assert figures["sustained"]["tests"] == 9
    assert figures["sustained"]["first_per_s"] > 0
    assert figures["memory"]["full"]["processes"] == 3

    report = done.stdout
    assert report.startswith("pytest-nsbox benchmark\nmachine: ")
    for target in figures["targets"]:
        assert f"{target['status']:4}  {target['target']}" in report
    full = overhead["full"]["overhead_ms"]["median"]
    assert f"{full:.2f}" in report
