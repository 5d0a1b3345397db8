"""The doctor, and what the plugin does on a machine that cannot sandbox.

A machine without user namespaces is made for real, locally: a user
namespace whose ``user.max_user_namespaces`` is 0 allows no nested ones,
which is what the sysctl does to a whole host.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import pytest
from conftest import PlainUser, run_as

from pytest_nsbox import kernel


def without_user_namespaces() -> None:
    """preexec_fn: become root of a user namespace that may not nest another."""
    uid, gid = os.getuid(), os.getgid()
    kernel.unshare(kernel.CLONE_NEWUSER)
    kernel.write_file("/proc/self/setgroups", "deny")
    kernel.write_file("/proc/self/uid_map", f"0 {uid} 1")
    kernel.write_file("/proc/self/gid_map", f"0 {gid} 1")
    kernel.write_file("/proc/sys/user/max_user_namespaces", "0")


def doctor(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,  # type: ignore[call-overload]
    )


def test_doctor_as_root(tmp_path: object) -> None:
    result = doctor(str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in (
        "user namespaces",
        "mnt namespace",
        "pid namespace",
        "net namespace",
        "uts namespace",
        "ipc namespace",
        "cgroup namespace",
        "overlay as root (mount rights)",
        "overlay in a user namespace",
        "pyroute2 netlink",
        "cgroups",
        "cgroup limits",
    ):
        assert any(line.startswith(f"  ok    {name}") for line in lines), (name, result.stdout)
    assert lines[-1] == "ready: sandboxed tests will run here"


def test_doctor_as_plain_user(plain_user: PlainUser, user_project: object) -> None:
    result = run_as(
        plain_user, [sys.executable, "-m", "pytest_nsbox", "doctor"], cwd=str(user_project)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"uid {plain_user.uid}" in result.stdout
    assert "  ok    overlay in a user namespace" in result.stdout
    assert "overlay as root" not in result.stdout
    if os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # v1: root only
        assert "  warn  cgroups" in result.stdout
        assert "Delegate=yes" in result.stdout


def test_doctor_without_user_namespaces(tmp_path: object) -> None:
    result = doctor(str(tmp_path), preexec_fn=without_user_namespaces)
    assert result.returncode == 1, result.stdout
    assert "  FAIL  user namespaces" in result.stdout
    assert "fix: user namespaces are disabled: sysctl -w user.max_user_namespaces=15000" in (
        result.stdout
    )
    assert result.stdout.splitlines()[-1].startswith("not ready")


def test_doctor_option_of_pytest(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--nsbox-doctor")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["pytest-nsbox doctor: uid 0*", "*ok    pid namespace*", "ready:*"])


@pytest.mark.parametrize(
    ("mode", "outcome", "line"),
    [
        (
            "fail",
            {"error": 1},
            "ERROR*cannot sandbox this test: this machine cannot sandbox:*"
            "fix: user namespaces are disabled: sysctl -w user.max_user_namespaces=15000*",
        ),
        ("skip", {"skipped": 1}, "SKIPPED*nsbox: this machine cannot sandbox:*"),
        ("run", {"passed": 1}, "*ran without the sandbox: this machine cannot sandbox*"),
    ],
)
def test_machine_that_cannot_sandbox(
    pytester: pytest.Pytester, mode: str, outcome: dict[str, int], line: str
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox
        def test_marked():
            pass
        """
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-rA",
            "-p",
            "no:cacheprovider",
            f"--nsbox-unavailable={mode}",
        ],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=without_user_namespaces,
    )
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1]
    for key, count in outcome.items():
        assert f"{count} {key}" in summary, output
    assert any(fnmatch.fnmatch(text, line) for text in output.splitlines()), output
    assert "nsbox: unavailable: " in output
