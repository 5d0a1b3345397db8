"""End-to-end with the rest of the pytest ecosystem: coverage, xdist, junitxml,
the JSON report, the write report, and the extension hooks."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

MODULE = """
def sign(x):
    if x > 0:
        return 1
    if x < 0:
        return -1
    return 0

def first_even(values):
    for v in values:
        if v % 2 == 0:
            return v
    return None

def never_called():
    return "never"
"""

TESTS = """
import mod

def test_sign():
    assert mod.sign(3) == 1
    assert mod.sign(0) == 0

def test_first_even():
    assert mod.first_even([1, 3, 4]) == 4
"""


def coverage_line(result: pytest.RunResult) -> str:
    """The term-missing line for mod.py: statements, misses, branches, %, missing lines."""
    match = re.search(r"^mod\.py\s.*$", result.stdout.str(), re.MULTILINE)
    assert match, result.stdout.str()
    return match.group(0)


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
@pytest.mark.parametrize("branch", [[], ["--cov-branch"]], ids=["lines", "branch"])
def test_coverage_is_the_same_with_and_without_the_sandbox(
    pytester: pytest.Pytester, xdist: list[str], branch: list[str]
) -> None:
    pytester.makepyfile(mod=MODULE, test_mod=TESTS)
    args = ["-p", "no:cacheprovider", "--cov=mod", "--cov-report=term-missing", *branch, *xdist]
    inline = pytester.runpytest_subprocess(*args)
    sandboxed = pytester.runpytest_subprocess("--nsbox", *args)
    inline.assert_outcomes(passed=2)
    sandboxed.assert_outcomes(passed=2)
    assert coverage_line(sandboxed) == coverage_line(inline)
    assert "100%" not in coverage_line(inline)
    leftovers = sorted(p.name for p in pytester.path.glob(".coverage*"))
    assert leftovers == [".coverage"], leftovers


def test_coverage_run_m_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(mod=MODULE, test_mod=TESTS)
    import subprocess
    import sys

    def percent(*extra: str) -> str:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "coverage",
                "run",
                "--branch",
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *extra,
            ],
            cwd=pytester.path,
            check=True,
            capture_output=True,
        )
        report = subprocess.run(
            [sys.executable, "-m", "coverage", "report", "--include=mod.py"],
            cwd=pytester.path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return report.split()[-1]

    assert percent("--nsbox") == percent() != "100%"


def test_xdist_outcomes_match_serial(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, signal
        import pytest

        def test_pass():
            assert os.getpid() == 2

        def test_crash():
            os.kill(os.getpid(), signal.SIGSEGV)

        @pytest.mark.nsbox(memory="64m")
        def test_oom():
            hog = bytearray(200 * 1024 * 1024)
            hog[::4096] = b"x" * len(hog[::4096])

        @pytest.mark.nsbox(timeout=1)
        def test_timeout():
            import time
            time.sleep(60)
        """
    )
    lines = [
        "*CRASHED *::test_crash - Crashed: the test process was killed by SIGSEGV (signal 11) during call",
        "*OOM-KILLED *::test_oom - OOM-killed: memory limit 64.0 MiB exceeded*",
        "*TIMEOUT *::test_timeout - Timeout: sandbox killed after 1.0 s (1 process)",
    ]
    for args in ([], ["-n", "2"]):
        result = pytester.runpytest_subprocess("--nsbox", "-rA", "-p", "no:cacheprovider", *args)
        result.assert_outcomes(passed=1, failed=3)
        for line in lines:
            result.stdout.fnmatch_lines([line])


def test_junitxml_properties_and_json_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(memory="64m", cpu=0.5, pids=32)
        def test_oom():
            hog = bytearray(200 * 1024 * 1024)
            hog[::4096] = b"x" * len(hog[::4096])

        @pytest.mark.nsbox(memory="128m")
        def test_fine():
            pass
        """
    )
    xml = pytester.path / "junit.xml"
    report = pytester.path / "out" / "nsbox.json"
    report.parent.mkdir()
    result = pytester.runpytest_subprocess(
        "-n", "2", f"--junitxml={xml}", f"--nsbox-report={report}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, failed=1)
    cases = {c.get("name"): c for c in ET.parse(xml).getroot().iter("testcase")}
    failure = cases["test_oom"].find("failure")
    assert failure is not None
    assert failure.get("message", "").startswith("OOM-killed: memory limit 64.0 MiB exceeded")
    props = {p.get("name"): p.get("value") for p in cases["test_oom"].iter("property")}
    assert props["nsbox_event"] == "oom"
    assert float(props["nsbox_memory_peak"]) > 60 * 1024 * 1024
    assert "nsbox_cpu_seconds" in props
    fine_props = {p.get("name") for p in cases["test_fine"].iter("property")}
    assert {"nsbox_memory_peak", "nsbox_cpu_seconds", "nsbox_wall_seconds"} <= fine_props

    data = json.loads(report.read_text())
    records = {r["nodeid"].split("::")[-1]: r for r in data["tests"]}
    assert data["version"] == 1
    assert records["test_oom"]["outcome"] == "failed"
    assert records["test_oom"]["events"] == ["oom"]
    assert records["test_oom"]["limits"] == {
        "memory": 64 * 1024 * 1024,
        "cpu": 0.5,
        "pids": 32,
        "timeout": None,
    }
    assert records["test_fine"]["outcome"] == "passed"
    for record in records.values():
        assert set(record) >= {
            "usage",
            "events",
            "messages",
            "left_running",
            "writes",
            "sandbox_seconds",
            "test_seconds",
        }
        assert record["sandbox_seconds"] >= 0 and record["test_seconds"] >= 0


def test_write_report_and_write_failure(pytester: pytest.Pytester) -> None:
    (pytester.path / "data.txt").write_text("original")
    (pytester.path / "gone.txt").write_text("to delete")
    (pytester.path / "pkg").mkdir()
    (pytester.path / "pkg" / "keep.txt").write_text("k")
    pytester.makepyfile(
        test_w="""
        import os
        from pathlib import Path
        import pytest

        ROOT = Path(__file__).parent

        def test_pollutes():
            (ROOT / "data.txt").write_text("changed")
            (ROOT / "gone.txt").unlink()
            (ROOT / "pkg" / "new.txt").write_text("n")
            (ROOT / "__pycache__").mkdir(exist_ok=True)
            (ROOT / "__pycache__" / "x.pyc").write_bytes(b"")

        def test_clean():
            assert (ROOT / "data.txt").read_text() == "original"

        @pytest.mark.nsbox(writes="fail")
        def test_marked_fail():
            (ROOT / "data.txt").write_text("again")
        """
    )
    report = pytester.path / "nsbox.json"
    result = pytester.runpytest_subprocess(
        "--nsbox",
        "--nsbox-writes=report",
        f"--nsbox-report={report}",
        "-rA",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*nsbox: files written to the repo (thrown away)*",
            "created pkg/new.txt",
            "modified data.txt",
            "deleted gone.txt",
            "*WROTE-REPO *::test_marked_fail - Wrote to the repo (writes='fail'): modified data.txt",
        ]
    )
    records = {r["nodeid"].split("::")[-1]: r for r in json.loads(report.read_text())["tests"]}
    assert records["test_pollutes"]["writes"] == {
        "created": ["pkg/new.txt"],
        "modified": ["data.txt"],
        "deleted": ["gone.txt"],
    }
    assert records["test_clean"]["writes"] == {"created": [], "modified": [], "deleted": []}
    assert (pytester.path / "data.txt").read_text() == "original"
    assert (pytester.path / "gone.txt").exists()
    result = pytester.runpytest_subprocess(
        "--nsbox", "--nsbox-writes=fail", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, failed=2)


def test_extension_hooks(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import dataclasses, json, os
        from pathlib import Path
        import pytest

        RECORDS = Path(__file__).parent / "records.jsonl"

        def pytest_nsbox_settings(item, settings):
            if "hungry" in item.name:
                return dataclasses.replace(settings, memory=64 * 1024 * 1024)
            return None

        def pytest_nsbox_sandbox_ready(item, settings):
            os.environ["NSBOX_HOOK"] = f"ready:{item.name}"
            Path("/tmp/from-hook.txt").write_text("made by the hook")

        def pytest_nsbox_test_finished(item, record):
            with RECORDS.open("a") as out:
                out.write(json.dumps({"name": item.name, "events": record["events"]}) + "\\n")
        """
    )
    pytester.makepyfile(
        """
        import os
        from pathlib import Path

        def test_sees_hook_work():
            assert os.environ["NSBOX_HOOK"] == "ready:test_sees_hook_work"
            assert Path("/tmp/from-hook.txt").read_text() == "made by the hook"

        def test_hungry():
            hog = bytearray(200 * 1024 * 1024)
            hog[::4096] = b"x" * len(hog[::4096])
        """
    )
    result = pytester.runpytest_subprocess("--nsbox", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    records = [
        json.loads(line) for line in (pytester.path / "records.jsonl").read_text().splitlines()
    ]
    assert records == [
        {"name": "test_sees_hook_work", "events": []},
        {"name": "test_hungry", "events": ["oom"]},
    ]
    assert not os_path_exists("/tmp/from-hook.txt")


def os_path_exists(path: str) -> bool:
    import os

    return os.path.exists(path)
