"""Nothing of a run remains: processes, cgroups, mounts, scratch directories.

pytest is stopped the hard ways here (SIGKILL in the middle of a sandboxed
test, SIGINT to it or to its whole process group); the sandbox must die with
it, and what a killed run could not remove (its cgroups) is removed by the
next run, which must never touch the state of a run still alive.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cgroup_session_dirs

from pytest_nsbox import cgroups

MARK = "777.25"  # the sleep duration that names the sandbox's processes

SLOW_TEST = f"""
import subprocess, time
import pytest

@pytest.mark.nsbox(memory="128m", pids=64)
def test_slow():
    for _ in range(3):
        subprocess.Popen(["sleep", "{MARK}"])
    time.sleep(600)
"""

try:
    cgroups.open_manager().close()
    HAVE_CGROUPS = True
except cgroups.CgroupUnavailable:
    HAVE_CGROUPS = False


def marked_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if MARK.encode() in cmdline and b"sleep" in cmdline:
                found.append(int(entry))
    return found


def session_dirs(pid: int) -> list[str]:
    """Every cgroup directory of the pytest process ``pid``, in any hierarchy."""
    return [d for d, owner in cgroup_session_dirs().items() if owner == pid]


def wait_for(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def start_slow_session(project: Path, **popen: object) -> subprocess.Popen[str]:
    (project / "test_slow.py").write_text(SLOW_TEST)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,  # type: ignore[call-overload]
    )
    assert wait_for(lambda: len(marked_processes()) == 3, 60), "the slow test did not start"
    return proc


@pytest.fixture(autouse=True)
def no_marked_processes_before() -> None:
    assert marked_processes() == []


@pytest.mark.skipif(not HAVE_CGROUPS, reason="needs cgroups")
def test_sigkill_of_pytest_takes_the_sandbox_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    proc = start_slow_session(tmp_path)
    assert session_dirs(proc.pid), "the run's cgroups exist while it runs"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: marked_processes() == [], 5), marked_processes()
    stale = session_dirs(proc.pid)
    assert stale, "a killed run cannot remove its own cgroups"

    # A second run, alive while the third starts, must keep its cgroups.
    (tmp_path / "live").mkdir()
    live = start_slow_session(tmp_path / "live")
    try:
        (tmp_path / "quick").mkdir()
        (tmp_path / "quick" / "test_quick.py").write_text(
            "import pytest\n@pytest.mark.nsbox(memory='64m')\ndef test_q():\n    pass\n"
        )
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
            cwd=tmp_path / "quick",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout
        assert all(not os.path.exists(d) for d in stale), "stale cgroups of the dead run removed"
        assert session_dirs(live.pid), "the live run's cgroups were left alone"
    finally:
        live.send_signal(signal.SIGINT)
        live.communicate(timeout=60)
    assert wait_for(lambda: marked_processes() == [], 5)
    assert session_dirs(live.pid) == []


@pytest.mark.parametrize("target", ["pytest", "process group"])
def test_ctrl_c_stops_the_session_and_cleans_up(tmp_path: Path, target: str) -> None:
    mounts_before = Path("/proc/self/mountinfo").read_text()
    probes_before = set(glob.glob("/tmp/pytest-nsbox-probe-*"))
    proc = start_slow_session(tmp_path, start_new_session=True)
    if target == "pytest":
        os.kill(proc.pid, signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output, output
    assert wait_for(lambda: marked_processes() == [], 5), marked_processes()
    assert session_dirs(proc.pid) == []
    assert Path("/proc/self/mountinfo").read_text() == mounts_before
    assert set(glob.glob("/tmp/pytest-nsbox-probe-*")) == probes_before


AFTER_THE_INTERRUPT = """
import os, subprocess

def pytest_sessionfinish(session):
    # After Ctrl-C: pytest's own children are born in its own pid namespace again.
    child = subprocess.run(["readlink", "/proc/self/ns/pid"], capture_output=True, text=True)
    with open(os.path.join(str(session.config.rootpath), "after.txt"), "w") as out:
        out.write(f"{child.stdout.strip()} {os.readlink('/proc/self/ns/pid')}")
"""


def test_after_ctrl_c_during_a_sandboxed_test_pytest_forks_at_home(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(AFTER_THE_INTERRUPT)
    proc = start_slow_session(tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    childs, own = (tmp_path / "after.txt").read_text().split()
    assert childs == own
    assert wait_for(lambda: marked_processes() == [], 5), marked_processes()
