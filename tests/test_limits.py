"""End-to-end: cgroup limits and what the kernel did, as test outcomes.

Real cgroups: v1 on the development machines, v2 in the QEMU guest of
``scripts/cgroup2-vm`` (the same module runs there). Each inner session runs
in a subprocess, as users run pytest, and the cgroup trees are compared
before and after: nothing of the run may remain.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import cgroup_session_dirs, pid_alive

from pytest_nsbox import cgroups

try:
    _manager = cgroups.open_manager()
    CGROUP_VERSION = _manager.version
    _manager.close()
    CGROUPS_PROBLEM = ""
except cgroups.CgroupUnavailable as exc:
    CGROUP_VERSION = 0
    CGROUPS_PROBLEM = str(exc)

# The longest an inner session whose test sleeps 1000 s may take: it ends
# when its timeout or limit does, in about 2 s here and up to 70 s in the
# QEMU guest, where pytest itself starts slowly.
SESSION_BOUND = 300

pytestmark = pytest.mark.skipif(
    bool(CGROUPS_PROBLEM), reason=f"no usable cgroups here: {CGROUPS_PROBLEM}"
)


@pytest.fixture(autouse=True)
def no_cgroup_left_behind() -> object:
    before = set(cgroup_session_dirs())
    yield
    leaked = {
        d for d, owner in cgroup_session_dirs().items() if d not in before and not pid_alive(owner)
    }
    assert leaked == set()


def test_oom_kill_is_reported_and_the_session_goes_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(memory="64m")
        def test_hog():
            hog = bytearray(200 * 1024 * 1024)
            hog[::4096] = b"x" * len(hog[::4096])

        @pytest.mark.nsbox(memory="64m")
        def test_next():
            assert len(bytearray(8 * 1024 * 1024)) == 8 * 1024 * 1024
        """
    )
    xml = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("-rA", f"--junitxml={xml}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines(
        [
            r"test_oom_kill_is_reported_and_the_session_goes_on.py M\.",
            # v1 kills the test process; v2's memory.oom.group the whole sandbox.
            r"OOM-KILLED .*::test_hog - OOM-killed: memory limit 64.0 MiB exceeded "
            r"\(peak \d+\.\d MiB, (1 process killed: the test process \(\S+\)|"
            r"\d+ processes killed, the test process \(\S+\) among them)\)",
        ]
    )
    text = xml.read_text()
    assert 'message="OOM-killed: memory limit 64.0 MiB exceeded' in text
    assert '<property name="nsbox_event" value="oom" />' in text


def test_the_test_process_is_the_oom_killers_first_choice(pytester: pytest.Pytester) -> None:
    """Its oom_score_adj is the highest; the sandbox's init keeps a lower one (-1000 where allowed)."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(memory="64m")
        def test_scores():
            with open("/proc/self/oom_score_adj") as own, open("/proc/1/oom_score_adj") as init:
                assert (own.read(), init.read()) in (("1000\\n", "0\\n"), ("1000\\n", "-1000\\n"))
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_subprocess_oom_kill_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess, sys
        import pytest

        @pytest.mark.nsbox(memory="64m")
        def test_child_hog():
            code = "b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
            proc = subprocess.run([sys.executable, "-c", code])
            assert proc.returncode == 0, proc.returncode
        """
    )
    result = pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(failed=1)
    if CGROUP_VERSION == 2:
        # memory.oom.group=1: the kernel kills the whole sandbox, the test too.
        expected = "*processes killed, the test process (*) among them)*"
    else:
        expected = "*a process the test started; the test itself survived); AssertionError: -9"
    result.stdout.fnmatch_lines(
        ["*OOM-KILLED*test_child_hog - OOM-killed: memory limit 64.0 MiB exceeded*" + expected]
    )


def test_cpu_throttling_is_reported_and_can_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess, time
        import pytest

        def spin(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass

        @pytest.mark.nsbox(cpu=0.1)
        def test_throttled():
            spin(1.0)

        @pytest.mark.nsbox(cpu=0.1, max_throttle=0.2)
        def test_too_throttled():
            subprocess.Popen(["sleep", "1000"], start_new_session=True)
            spin(1.0)
        """
    )
    result = pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines(
        [
            # The failure made of the throttled report keeps every section.
            r"_+ test_too_throttled _+",
            r"CPU-throttled: .*",
            r".* nsbox: processes left running, killed at the end of the test .*",
            r"pid 3: sleep \(sleep 1000\)",
            r"cpu: \d+\.\d\d s used, throttled \d+ of \d+ periods \(\d+\.\d s\)",
            r"THROTTLED .*::test_too_throttled - CPU-throttled: throttled \d+\.\d\d s of "
            r"\d+\.\d\d s wall time \(\d+%\) under cpu=0.1, above max_throttle=0.2",
        ]
    )


def test_pids_limit_is_reported_and_nothing_is_left(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, time
        import pytest

        @pytest.mark.nsbox(pids=16)
        def test_fork_loop():
            children = []
            for _ in range(64):
                pid = os.fork()
                if pid == 0:
                    time.sleep(1000)
                    os._exit(0)
                children.append(pid)
        """
    )
    # Under the children's 1000 s: nothing waited for them. The session takes
    # about 2 s here, and 30 to 55 s in the cgroup v2 guest's emulated CPU
    # (TCG): a session that waited for a child would take its 1000 s, and
    # pytester raises TimeoutExpired at SESSION_BOUND.
    result = pytester.runpytest_subprocess("-rA", timeout=SESSION_BOUND)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*PIDS-LIMIT*test_fork_loop - pids limit 16 reached * (fork failed with EAGAIN); *"]
    )


def test_the_pids_limit_is_the_tests_and_init_stays_outside_it(pytester: pytest.Pytester) -> None:
    """Init is not in the test's cgroup: pids=8 is the test process and 7 more tasks.

    As a plain user, one of the 8 is the process that forks the test
    process. The test sees its own cgroup as the root of its cgroup
    namespace and init's above it (``/..``), in the hierarchy that holds
    its pids limit (v1's pids, or cgroup2).
    """
    pytester.makepyfile(
        """
        import json, os
        import pytest

        def membership(pid):
            with open(f"/proc/{pid}/cgroup") as lines:
                return [line.strip() for line in lines]

        @pytest.mark.nsbox(pids=8)
        def test_forks_until_refused():
            release_r, release_w = os.pipe()
            children = []
            while len(children) < 20:
                try:
                    pid = os.fork()
                except BlockingIOError:
                    break
                if pid == 0:
                    os.close(release_w)
                    os.read(release_r, 1)
                    os._exit(0)
                children.append(pid)
            os.close(release_w)
            for pid in children:
                os.waitpid(pid, 0)
            seen = {"children": len(children), "test": membership(os.getpid()), "init": membership(1)}
            print("SEEN", json.dumps(seen))
        """
    )
    result = pytester.runpytest_subprocess("-s", "-rA")
    result.assert_outcomes(passed=1)  # it handled the refused fork: the limit is a note
    result.stdout.fnmatch_lines(["*::test_forks_until_refused: pids limit 8 reached 1 time*"])
    (line,) = [line for line in result.outlines if "SEEN " in line]  # after the file's name
    seen = json.loads(line.partition("SEEN ")[2])
    sandbox_own = 1 if os.geteuid() == 0 else 2  # the test process (and its forker)
    assert seen["children"] == 8 - sandbox_own, seen

    def limited(lines: list[str]) -> dict[str, str]:
        """Path by hierarchy, of the hierarchies the test's limits are in."""
        paths = {}
        for entry in lines:
            number, controllers, path = entry.split(":", 2)
            if (CGROUP_VERSION == 2 and number == "0") or "pids" in controllers.split(","):
                paths[number] = path
        return paths

    test, init = limited(seen["test"]), limited(seen["init"])
    assert test and set(test.values()) == {"/"}, seen
    assert init.keys() == test.keys(), seen
    assert all(path.startswith("/..") for path in init.values()), seen


def test_timeout_kills_the_whole_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import signal, subprocess, time
        import pytest

        @pytest.mark.nsbox(timeout=1)
        def test_hangs():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for _ in range(3):
                subprocess.Popen(["sleep", "1000"])
            time.sleep(1000)
        """
    )
    result = pytester.runpytest_subprocess("-rA", timeout=SESSION_BOUND)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*TIMEOUT*test_hangs - Timeout: sandbox killed after 1.0 s (4 processes)"]
    )


def test_usage_goes_to_junit_and_json(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(memory="128m", cpu=1, pids=32)
        def test_small():
            assert sum(range(1000)) == 499500
        """
    )
    report = pytester.path / "nsbox.json"
    xml = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(f"--nsbox-report={report}", f"--junitxml={xml}")
    result.assert_outcomes(passed=1)
    data = json.loads(report.read_text())
    (record,) = data["tests"]
    assert record["outcome"] == "passed"
    assert record["limits"] == {
        "memory": 128 * 1024 * 1024,
        "cpu": 1.0,
        "pids": 32,
        "timeout": None,
    }
    assert record["usage"]["memory_peak"] > 0
    assert record["usage"]["cpu_seconds"] > 0
    assert record["events"] == []
    text = xml.read_text()
    assert 'name="nsbox_memory_peak"' in text
    assert 'name="nsbox_cpu_seconds"' in text
    result.stdout.fnmatch_lines(["*= nsbox =*", "top 1 by peak memory:*"])


def test_default_memory_limit_from_the_command_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_hog_without_a_marker():
            hog = bytearray(300 * 1024 * 1024)
            hog[::4096] = b"x" * len(hog[::4096])
        """
    )
    result = pytester.runpytest_subprocess("--nsbox", "--nsbox-memory=64m", "-rA")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*OOM-killed: memory limit 64.0 MiB exceeded*"])


def test_bad_limit_values_are_collection_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(memory="64x")
        def test_a(): pass

        @pytest.mark.nsbox(cpu=0)
        def test_b(): pass

        @pytest.mark.nsbox(pids=0)
        def test_c(): pass

        @pytest.mark.nsbox(memory="8m")
        def test_d(): pass
        """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*memory='64x'*::test_a: expected bytes as an int or a size like*\"64m\"*",
            "*cpu=0*::test_b: expected a number of CPUs > 0*",
            "*pids=0*::test_c: expected at least 3*",
            "*memory='8m'*::test_d: 8.0 MiB is below the 16.0 MiB minimum*",
        ]
    )


def test_pytest_timeout_kills_the_whole_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess, time
        import pytest

        @pytest.mark.nsbox
        def test_hangs():
            subprocess.Popen(["sleep", "1000"])
            time.sleep(1000)

        def test_inline_still_uses_pytest_timeout():
            time.sleep(1000)
        """
    )
    # 5 s, not 1: in the QEMU guest (scripts/cgroup2-vm) Python is ~20x slower.
    result = pytester.runpytest_subprocess(
        "--timeout=5", "-rA", "-p", "no:cacheprovider", timeout=SESSION_BOUND
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*TIMEOUT *::test_hangs - Timeout: sandbox killed after 5.0 s (2 processes)",
            "FAILED *::test_inline_still_uses_pytest_timeout - Failed: Timeout*",
        ]
    )
