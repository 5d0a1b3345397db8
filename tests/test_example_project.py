"""The README's main job: pytest --nsbox on example_project, run as users run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "example_project"


def test_example_project_under_the_sandbox(tmp_path: Path) -> None:
    project = tmp_path / "example_project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nsbox", "-rA", "-p", "no:cacheprovider"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "3 failed, 8 passed" in out.splitlines()[-1], out
    for line in (
        "PASSED tests/test_isolation.py::test_adding_stock_writes_the_shared_data_file",
        "PASSED tests/test_isolation.py::test_the_data_file_is_untouched_by_the_previous_test",
        "PASSED tests/test_isolation.py::test_status_server_on_loopback",
        "PASSED tests/test_isolation.py::test_own_pid_namespace",
        "CRASHED tests/test_sandbox_reports.py::test_crashes_with_a_segfault - Crashed: the test "
        "process was killed by SIGSEGV (signal 11) during call",
        "OOM-KILLED tests/test_sandbox_reports.py::test_allocates_more_than_its_memory_limit - "
        "OOM-killed: memory limit 64.0 MiB exceeded",
        "TIMEOUT tests/test_sandbox_reports.py::test_hangs_with_a_child_process - Timeout: sandbox "
        "killed after 1.0 s (2 processes)",
        "tests/test_sandbox_reports.py::test_leaves_a_daemon_running: left running, killed: sleep",
    ):
        assert any(text.startswith(line) for text in out.splitlines()), (line, out)
    after = {
        p: p.read_bytes() for p in project.rglob("*") if p.is_file() and "__pycache__" not in str(p)
    }
    assert after == before
