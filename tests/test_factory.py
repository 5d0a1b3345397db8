"""The sandbox factory as users meet it: sandboxes built ahead, pytest forked once per test.

Each sandbox is built by the factory (a small interpreter started once per
session) while the previous test runs; pytest forks the test process into it.
What a user must never notice: a descriptor of the factory or of a sandbox in
the test, a sandbox built for another test's settings, a working directory of
the past, a pytest process left in a foreign pid namespace, a process or
cgroup left behind, a hang when the factory dies. Every inner session here is
real (namespaces, overlay, cgroups); the rootless ones run as ``nsbox-tester``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import (
    PlainUser,
    cgroup_session_dirs,
    project_spec,
    run_as,
    run_in_fork_as,
    run_one_test_process,
)

from pytest_nsbox import cgroups, kernel, sandbox

if TYPE_CHECKING:
    from pytest_nsbox.factory import PreparedSandbox

try:
    cgroups.open_manager().close()
    HAVE_CGROUPS = True
except cgroups.CgroupUnavailable:
    HAVE_CGROUPS = False

needs_cgroups = pytest.mark.skipif(not HAVE_CGROUPS, reason="needs cgroups")

FACTORY_MODULE = b"pytest_nsbox.factory"
# For inner conftests and test modules: the sandbox factories serving their pytest process.
FACTORIES_OF_THIS_PYTEST = f"""
import os, re

def factories_of_this_pytest():
    me = str(os.getpid()).encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{{entry}}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            serving = re.search(rb"serve\\(\\d+, " + me + rb"\\)", cmdline)
            if {FACTORY_MODULE!r} in cmdline and serving:
                found.append(entry)
    return found
"""

with open("/proc/self/comm") as _comm:
    PROCESS_NAME = _comm.read().strip()  # what a fork of an in-process session's test is called

# Pasted into inner test modules: what a sandboxed test must not have inherited.
DESCRIPTOR_CHECK = r'''
import os, re

_NAMESPACE = re.compile(r"^(pid|pid_for_children|mnt|net|uts|ipc|cgroup|user|time|time_for_children):\[\d+\]$")
# A cgroup's control file, as the sandbox's cgroup namespace shows its path.
_CGROUP_FILE = re.compile(r"/((cgroup|pids|memory|cpu|cpuacct)\.[a-z_.]+|tasks)$")


def foreign_descriptors():
    """Every open fd that is a socket, a pidfd, a namespace or a cgroup file, with its target."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd of the listing itself, closed meanwhile
        try:
            with open(f"/proc/self/fdinfo/{name}") as info:
                is_pidfd = any(line.startswith("Pid:") for line in info)
        except OSError:
            is_pidfd = False
        if (
            target.startswith("socket:")
            or _CGROUP_FILE.search(target)
            or target in ("anon_inode:[pidfd]", "anon_inode:pidfd")
            or target.startswith("pidfd:")
            or is_pidfd
            or _NAMESPACE.match(target)
        ):
            found[int(name)] = target
    return found
'''


# -- helpers ------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, bytes]]:
    """pid -> (ppid, cmdline) of every process, as this process sees them."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                ppid = int(stat.read().rpartition(b")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read()
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry)] = (ppid, cmdline)
    return table


def descendants(root: int) -> set[int]:
    """Every process whose chain of parents leads to ``root``."""
    table = proc_table()
    found: set[int] = set()
    for pid in table:
        seen = set()
        current = pid
        while current in table and current not in seen and current > 1:
            seen.add(current)
            current = table[current][0]
            if current == root:
                found.add(pid)
                break
    return found


def factory_processes(pytest_pid: int) -> set[int]:
    """The factory of the pytest process ``pytest_pid`` and its forks (init, a plain user's outer), wherever they were re-parented.

    The factory's command line ends in ``serve(<fd>, <pytest pid>)``; init
    and outer are forks of it and keep that command line.
    """
    pattern = re.compile(rb"serve\(\d+, " + str(pytest_pid).encode() + rb"\)")
    return {
        pid
        for pid, (_, cmdline) in proc_table().items()
        if FACTORY_MODULE in cmdline and pattern.search(cmdline)
    }


def wait_for(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():  # type: ignore[operator]
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def write_user_file(project: Path, user: PlainUser, name: str, text: str) -> None:
    path = project / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chown(path, user.uid, user.gid)


def run_user_pytest(
    project: Path, user: PlainUser, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    result = run_as(
        user,
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=str(project),
        env={"CI": "true", **(env or {})},  # CI: whole short-summary lines
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def summary_lines(output: str) -> list[str]:
    """The lines of the short test summary."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if "short test summary info" in line:
            return lines[index + 1 :]
    return []


# -- 1. descriptor hygiene ------------------------------------------------------

HYGIENE_TESTS = (
    DESCRIPTOR_CHECK
    + """
import socket, subprocess
import pytest

pytestmark = pytest.mark.nsbox


def check():
    assert foreign_descriptors() == {}
    # Nor does what the test starts, even keeping every inheritable fd.
    out = subprocess.run(["ls", "-l", "/proc/self/fd/"], capture_output=True, text=True, close_fds=False).stdout
    assert not re.search(r"-> (socket:|anon_inode:\\[pidfd\\]|pidfd:|(pid|mnt|net|uts|ipc|cgroup|user|time)(_for_children)?:\\[)", out), out


@pytest.mark.parametrize("n", range(4))
def test_plain(n):
    check()


def test_with_its_own_socket():
    check()
    s = socket.socket()  # the test's own sockets are its business
    s.close()


@pytest.mark.nsbox(network="host")
def test_host_network():
    check()


@pytest.mark.nsbox(writes="report")
def test_writes_listed():
    check()


@pytest.mark.nsbox(tmp="host", hostname="other-host")
def test_host_tmp():
    check()


def test_last():
    check()
"""
)

HYGIENE_LIMITED = """

@pytest.mark.nsbox(memory="256m", pids=64)
def test_limited():
    check()


@pytest.mark.nsbox(memory="128m", cpu=1)
def test_limited_differently():
    check()
"""


def test_no_factory_or_sandbox_descriptor_reaches_the_test(pytester: pytest.Pytester) -> None:
    """While each test runs the next one's sandbox is built; none of its fds, nor the factory's, reach the test."""
    pytester.makepyfile(test_hygiene=HYGIENE_TESTS + (HYGIENE_LIMITED if HAVE_CGROUPS else ""))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=9 + (2 if HAVE_CGROUPS else 0))


def test_no_factory_or_sandbox_descriptor_reaches_the_test_rootless(
    plain_user: PlainUser, user_project: Path
) -> None:
    write_user_file(user_project, plain_user, "test_hygiene.py", HYGIENE_TESTS)
    code, output = run_user_pytest(user_project, plain_user)
    assert code == 0, output
    assert "9 passed" in output, output
    assert "rootless" in output, output


@pytest.mark.skipif(os.geteuid() != 0, reason="root's init is forked by the factory itself")
def test_init_keeps_nothing_of_the_factory(tmp_path: Path) -> None:
    """Root's init, forked straight from the factory, holds one socket (its channel) and no home.

    The factory's request socket, its own namespaces (this process's: it
    started the factory) and the host's /proc stay in the factory. Init may
    still hold its own namespaces, which it has just sent.
    """
    from pytest_nsbox import runner
    from pytest_nsbox.factory import SandboxFactory

    spec = project_spec(tmp_path, privileged=True, isolate_network=False, list_writes=False)
    factory = SandboxFactory()
    try:
        prepared = factory.prepare(spec, None).wait()
        assert prepared.setup_error is None, prepared.setup_error
        assert prepared.init_pidfd is not None
        init = runner.pidfd_pid(prepared.init_pidfd)
        fd_dir = f"/proc/{init}/fd"
        held = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
        prepared.close()
    finally:
        factory.close()
    assert sum(target.startswith("socket:") for target in held) == 1, held
    homes = {os.readlink(f"/proc/self/ns/{name}") for name in ("mnt", "pid", "net", "uts", "ipc")}
    assert not homes & set(held), held
    assert "/proc" not in held, held


class _Noop:
    """A test process that does nothing (see sandbox.TestProcess)."""

    def prepare(self) -> None:
        pass

    def run(self) -> None:
        pass


class _ReportsAffinity(_Noop):
    """A test process that sleeps, then writes the CPUs it may run on to ``out``."""

    def __init__(self, out: int) -> None:
        self.out = out

    def run(self) -> None:
        time.sleep(0.6)
        os.write(self.out, json.dumps(sorted(os.sched_getaffinity(0))).encode())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to hold to")
def test_pytest_holds_its_cpu_only_while_the_test_process_lives(tmp_path: Path) -> None:
    """The test process is born on pytest's CPU, and gets every CPU pytest had back.

    While the test process lives, pytest's thread may run only on one CPU
    (seen here from another thread, as the test sleeps); after, it has its
    own CPUs again, as the test process had all along.
    """
    import threading

    own = os.sched_getaffinity(0)
    spec = project_spec(
        tmp_path, privileged=os.geteuid() == 0, isolate_network=True, list_writes=False
    )
    main = threading.get_native_id()
    during: list[set[int]] = []
    sampler = threading.Timer(0.3, lambda: during.append(os.sched_getaffinity(main)))

    @contextlib.contextmanager
    def sampling(prepared: PreparedSandbox) -> Iterator[None]:
        sampler.start()
        try:
            yield
        finally:
            sampler.join()

    result, reported = run_one_test_process(
        spec, None, _ReportsAffinity, timeout=30, beside=sampling
    )
    in_test = set(json.loads(reported or "[]"))
    assert result.test_status == 0, result
    assert len(during) == 1 and len(during[0]) == 1 and during[0] < own, during
    assert in_test == own
    assert os.sched_getaffinity(0) == own


@needs_cgroups
def test_init_with_news_stays_until_pytest_read_the_counters(tmp_path: Path) -> None:
    """Init that sent a report (here: the writes) exits only when pytest lets it go.

    The factory removes the cgroup once init has exited, and pytest reads
    the test's counters after init's report: init must not go first.
    """
    from pytest_nsbox import runner
    from pytest_nsbox.factory import SandboxFactory

    spec = project_spec(
        tmp_path, privileged=os.geteuid() == 0, isolate_network=True, list_writes=True
    )
    manager = cgroups.open_manager()
    factory = SandboxFactory()
    try:
        prepared = factory.prepare(spec, manager.plan(cgroups.Limits(64 << 20))).wait()
        assert prepared.setup_error is None, prepared.setup_error
        assert prepared.cgroup is not None
        try:
            result = runner.run(prepared, lambda fd: _Noop(), factory=factory, timeout=30)
            assert result.first("writes") is not None, result
            assert prepared.alive(0.3), "init exited before pytest let it go"
            assert prepared.cgroup.usage().memory_peak is not None
        finally:
            prepared.close()
    finally:
        factory.close()
        manager.close()


class _Sleeps(_Noop):
    """A test process that sleeps for longer than any test here waits."""

    def run(self) -> None:
        time.sleep(30)


_INIT_KILLED_AFTER = 0.3  # seconds into the test
_LINGERER_REAPED_AFTER = 0.1  # seconds after init was killed: inside the grace init gets


def _init_dies_slowly_under_the_test(spec: sandbox.SandboxSpec) -> tuple[int | None, str | None]:
    """Kill the sandbox's init under a sleeping test, with init's exit held up for a while.

    A helper forks a process into the sandbox's pid namespace (the
    lingerer), kills init, and reaps the lingerer ``_LINGERER_REAPED_AFTER``
    seconds later: init's exit waits for every process of its namespace to
    be reaped, also those whose parent is outside, so pytest finds the test
    process killed while init has not yet exited, as it does when the
    scheduler is slow to run a dying init. Returns the test's wait status
    and why its run says the sandbox ended.
    """

    @contextlib.contextmanager
    def killing_init(prepared: PreparedSandbox) -> Iterator[None]:
        assert prepared.init_pidfd is not None
        helper = os.fork()
        if helper == 0:
            try:
                if not spec.privileged:
                    kernel.setns(prepared.namespaces["outer_user"], kernel.CLONE_NEWUSER, "user")
                kernel.setns(prepared.namespaces["pid"], kernel.CLONE_NEWPID, "pid")
                lingerer = os.fork()
                if lingerer == 0:
                    signal.pause()
                    os._exit(0)
                time.sleep(_INIT_KILLED_AFTER)
                signal.pidfd_send_signal(prepared.init_pidfd, signal.SIGKILL)
                time.sleep(_LINGERER_REAPED_AFTER)
                os.waitpid(lingerer, 0)
            finally:
                os._exit(0)
        try:
            yield
        finally:
            os.waitpid(helper, 0)

    result, _ = run_one_test_process(
        spec, None, lambda out: _Sleeps(), timeout=30, beside=killing_init
    )
    return result.test_status, result.init_lost


@pytest.mark.parametrize("as_plain_user", [False, True], ids=["root", "rootless"])
def test_a_test_killed_by_its_sandboxs_end_names_it(
    tmp_path: Path, as_plain_user: bool, request: pytest.FixtureRequest
) -> None:
    """The test process killed as init dies: its run says the sandbox ended, not a bare SIGKILL.

    pytest reaps its child before init's exit is done (see the helper
    above). Root's child is the test process; a plain user's is the process
    that forked it, which ends by the same SIGKILL, so that pytest gives
    init the same moment to finish.
    """
    if as_plain_user:
        user = request.getfixturevalue("plain_user")
        project = request.getfixturevalue("user_project")
        status, init_lost = run_in_fork_as(
            user,
            lambda: _init_dies_slowly_under_the_test(  # the spec of the user's own ids
                project_spec(project, privileged=False, isolate_network=True, list_writes=False)
            ),
        )
    elif os.geteuid() != 0:
        pytest.skip("root's sandbox needs root")
    else:
        spec = project_spec(tmp_path, privileged=True, isolate_network=True, list_writes=False)
        status, init_lost = _init_dies_slowly_under_the_test(spec)
    assert status is not None and os.WIFSIGNALED(status), status
    assert os.WTERMSIG(status) == signal.SIGKILL, status
    assert init_lost is not None and "the sandbox's init has exited" in init_lost, init_lost


@needs_cgroups
def test_a_cgroup_gone_after_a_timeout_leaves_the_kernels_rusage() -> None:
    """A sandbox killed at its timeout may have lost its cgroup to the factory already.

    Its usage then comes from rusage; a cgroup gone for any other reason is
    an error, as before.
    """
    from pytest_nsbox.runner import SandboxRun
    from pytest_nsbox.session import counted_usage

    manager = cgroups.open_manager()
    try:
        gone = manager.plan(cgroups.Limits(64 << 20))  # planned, never made: reads say ENOENT
        assert counted_usage(SandboxRun(timed_out=True), gone) is None
        with pytest.raises(cgroups.CgroupError, match="ENOENT"):
            counted_usage(SandboxRun(), gone)
    finally:
        manager.close()


# -- 2. prepared-ahead sandboxes never carry another test's settings -------------

# Indented as the inner modules' text around it (dedented as a whole).
HOG = textwrap.indent(
    """
def hog():
    block = bytearray(100 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])
""",
    " " * 8,
)


@needs_cgroups
def test_each_test_gets_its_own_memory_limit_in_either_order(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_memory="""
        import pytest
        """
        + HOG
        + """

        @pytest.mark.nsbox(memory="32m")
        def test_1_small_is_oom_killed():
            hog()

        @pytest.mark.nsbox(memory="512m")
        def test_2_large_after_small_passes():
            hog()

        @pytest.mark.nsbox(memory="512m")
        def test_3_large_after_large_passes():
            hog()

        @pytest.mark.nsbox(memory="32m")
        def test_4_small_after_large_is_oom_killed():
            hog()

        @pytest.mark.nsbox(memory="32m")
        def test_5_small_after_small_is_oom_killed():
            hog()

        @pytest.mark.nsbox
        def test_6_unlimited_after_small_passes():
            hog()

        @pytest.mark.nsbox(pids=8)
        def test_7_few_pids_cannot_fork_16():
            import os, time
            children = []
            with pytest.raises(BlockingIOError):
                for _ in range(16):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(5)
                        os._exit(0)
                    children.append(pid)

        @pytest.mark.nsbox(pids=64)
        def test_8_many_pids_can_fork_16():
            import os
            children = []
            for _ in range(16):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                children.append(pid)
            for pid in children:
                os.waitpid(pid, 0)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
    result.assert_outcomes(passed=5, failed=3)
    out = result.stdout.str()
    for name in (
        "test_1_small_is_oom_killed",
        "test_4_small_after_large_is_oom_killed",
        "test_5_small_after_small_is_oom_killed",
    ):
        assert re.search(
            rf"OOM-KILLED \S+::{name} - OOM-killed: memory limit 32.0 MiB exceeded", out
        ), out
    for name in (
        "test_2_large_after_small_passes",
        "test_3_large_after_large_passes",
        "test_6_unlimited_after_small_passes",
        "test_7_few_pids_cannot_fork_16",
        "test_8_many_pids_can_fork_16",
    ):
        assert re.search(rf"PASSED \S+::{name}\b", out), out


def test_hostname_network_and_tmp_follow_each_test(pytester: pytest.Pytester) -> None:
    """Hostname (given or derived from the name), network and /tmp, each test its own, in a sequence."""
    host_marker = Path(f"/tmp/nsbox-factory-host-{os.getpid()}")
    host_marker.write_text("host")
    host_interfaces = [name for _, name in socket.if_nameindex()]
    try:
        pytester.makepyfile(
            test_settings=f"""
            import os, socket
            import pytest

            pytestmark = pytest.mark.nsbox
            HOST_MARKER = {str(host_marker)!r}

            def test_alpha():
                assert socket.gethostname() == "nsbox-test-alpha"

            @pytest.mark.nsbox(hostname="given-name")
            def test_given():
                assert socket.gethostname() == "given-name"

            def test_beta_after_given():
                assert socket.gethostname() == "nsbox-test-beta-after-given"

            @pytest.mark.parametrize("which", ["one", "Two_2"])
            def test_param(which):
                assert socket.gethostname() == {{"one": "nsbox-test-param-one", "Two_2": "nsbox-test-param-two-2"}}[which]

            class TestGroup:
                def test_in_class(self):
                    assert socket.gethostname() == "nsbox-test-in-class"

            @pytest.mark.nsbox(network="host")
            def test_host_network():
                assert [name for _, name in socket.if_nameindex()] == {host_interfaces!r}

            def test_loopback_after_host():
                assert socket.if_nameindex() == [(1, "lo")]

            @pytest.mark.nsbox(network="host")
            def test_host_network_again():
                assert [name for _, name in socket.if_nameindex()] == {host_interfaces!r}

            @pytest.mark.nsbox(tmp="host")
            def test_host_tmp():
                assert open(HOST_MARKER).read() == "host"

            def test_private_tmp_after_host():
                assert not os.path.exists(HOST_MARKER)
                open("/tmp/left-by-private", "w").close()

            @pytest.mark.nsbox(tmp_size="8m")
            def test_small_tmp():
                st = os.statvfs("/tmp")
                assert st.f_blocks * st.f_frsize == 8 * 1024 * 1024
                assert not os.path.exists("/tmp/left-by-private")

            def test_default_tmp_after_small():
                st = os.statvfs("/tmp")
                assert st.f_blocks * st.f_frsize == 256 * 1024 * 1024
                assert not os.path.exists(HOST_MARKER)

            @pytest.mark.nsbox(tmp="host")
            def test_host_tmp_again():
                assert open(HOST_MARKER).read() == "host"
                assert not os.path.exists("/tmp/left-by-private")

            def test_zeta_last():
                assert socket.gethostname() == "nsbox-test-zeta-last"
                assert socket.if_nameindex() == [(1, "lo")]
            """
        )
        result = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
        result.assert_outcomes(passed=15)
    finally:
        host_marker.unlink()
    assert not os.path.exists("/tmp/left-by-private")


SKEWED_LOOP = """
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    # As pytest-xdist does when another worker steals the queued test: the
    # nextitem a test was told of is not the test that runs after it.
    items = session.items
    for index, item in enumerate(items):
        nextitem = items[index + 2] if index + 2 < len(items) else None
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail or session.shouldstop:
            break
    return True
"""


@needs_cgroups
def test_a_sandbox_prepared_for_another_test_is_not_used(pytester: pytest.Pytester) -> None:
    """nextitem is not what runs next (xdist's stealing): same spec, other limits or settings: built anew."""
    pytester.makeconftest(SKEWED_LOOP)
    pytester.makepyfile(
        test_skewed="""
        import os, socket
        import pytest
        """
        + HOG
        + """
        pytestmark = pytest.mark.nsbox(hostname="shared")

        @pytest.mark.nsbox(memory="32m")
        def test_1_small():
            hog()

        @pytest.mark.nsbox(memory="512m")
        def test_2_large():
            hog()

        @pytest.mark.nsbox(memory="32m")
        def test_3_small():
            hog()

        @pytest.mark.nsbox(memory="512m")
        def test_4_large():
            hog()

        @pytest.mark.nsbox(memory="32m")
        def test_5_small():
            hog()

        @pytest.mark.nsbox(network="host")
        def test_6_host_network():
            assert len(socket.if_nameindex()) > 1

        def test_7_loopback():
            assert socket.if_nameindex() == [(1, "lo")]

        @pytest.mark.nsbox(tmp_size="8m")
        def test_8_small_tmp():
            st = os.statvfs("/tmp")
            assert st.f_blocks * st.f_frsize == 8 * 1024 * 1024

        def test_9_default_tmp():
            st = os.statvfs("/tmp")
            assert st.f_blocks * st.f_frsize == 256 * 1024 * 1024

        @pytest.mark.nsbox(hostname="another")
        def test_10_another_name():
            assert socket.gethostname() == "another"

        def test_11_shared_name():
            assert socket.gethostname() == "shared"

        def test_12_last():
            assert socket.gethostname() == "shared"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
    result.assert_outcomes(passed=9, failed=3)
    # Every test met a sandbox built for another: each was discarded, quietly.
    assert "Traceback" not in result.stderr.str(), result.stderr.str()
    out = result.stdout.str()
    for name in ("test_1_small", "test_3_small", "test_5_small"):
        assert re.search(rf"OOM-KILLED \S+::{name} - OOM-killed: memory limit 32.0 MiB", out), out
    for name in ("test_2_large", "test_4_large"):
        assert re.search(rf"PASSED \S+::{name}\b", out), out


def test_a_sandbox_that_cannot_be_built_fails_only_its_test(pytester: pytest.Pytester) -> None:
    """A set-up error in init (before it made the test's cgroup) is that test's SANDBOX-ERROR, not the session's end."""
    (pytester.path / "shared").mkdir()
    limited = 'memory="64m", ' if HAVE_CGROUPS else ""
    pytester.makepyfile(
        test_setup_error=f"""
        import os, shutil
        import pytest

        def test_1_inline_removes_the_writable_dir():
            shutil.rmtree(os.path.join(os.path.dirname(__file__), "shared"))

        @pytest.mark.nsbox({limited}writable="shared")
        def test_2_needs_it():
            pass

        @pytest.mark.nsbox({limited}hostname="after")
        def test_3_after():
            assert os.getpid() == 2
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output, output
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["SANDBOX-ERROR *::test_2_needs_it - nsbox: sandbox set-up failed: *shared*"]
    )


# -- 3. an inline test changes the working directory -----------------------------


def test_inline_chdir_between_sandboxed_tests(pytester: pytest.Pytester) -> None:
    """The sandboxed test after an inline os.chdir runs where pytest is now, restored or not."""
    root = pytester.path
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_text("inner")
    (root / "sub2").mkdir()
    (root / "marker.txt").write_text("top")
    pytester.makepyfile(
        test_a_cwd=f"""
        import os
        import pytest

        ROOT = {str(root)!r}

        @pytest.mark.nsbox
        def test_1_sandboxed_first():
            assert os.getcwd() == ROOT

        def test_2_inline_chdir_and_back():
            os.chdir(os.path.join(ROOT, "sub"))
            os.chdir(ROOT)

        @pytest.mark.nsbox
        def test_3_sandboxed_after_restored_chdir():
            assert os.getcwd() == ROOT
            assert open("marker.txt").read() == "top"

        def test_4_inline_chdir_for_good():
            os.chdir(os.path.join(ROOT, "sub"))

        @pytest.mark.nsbox
        def test_5_sandboxed_after_chdir_for_good():
            assert os.getcwd() == os.path.join(ROOT, "sub")
            assert open("inner.txt").read() == "inner"

        @pytest.mark.nsbox
        def test_6_sandboxed_again():
            assert os.getcwd() == os.path.join(ROOT, "sub")

        def test_7_inline_back_to_root():
            os.chdir(ROOT)
        """,
        test_b_cwd=f"""
        import os
        import pytest

        ROOT = {str(root)!r}

        @pytest.fixture(scope="module")
        def in_sub2():
            os.chdir(os.path.join(ROOT, "sub2"))
            yield
            os.chdir(ROOT)

        def test_1_inline_in_sub2(in_sub2):
            assert os.getcwd() == os.path.join(ROOT, "sub2")

        @pytest.mark.nsbox
        def test_2_sandboxed_while_the_fixture_holds_sub2():
            # Its sandbox was built in sub2; the next test's too, and the
            # fixture's teardown takes pytest back to ROOT before that one runs.
            assert os.getcwd() == os.path.join(ROOT, "sub2")
        """,
        test_c_cwd=f"""
        import os
        import pytest

        ROOT = {str(root)!r}

        @pytest.mark.nsbox
        def test_1_sandboxed_after_the_fixture_teardown():
            assert os.getcwd() == ROOT
            assert open("marker.txt").read() == "top"
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
    result.assert_outcomes(passed=10)
    # The sandbox built in sub2 for test_c was discarded: quietly.
    assert "Traceback" not in result.stderr.str(), result.stderr.str()


def test_a_sandbox_never_used_is_dropped_quietly(pytester: pytest.Pytester) -> None:
    """-x stops the session while the next test's sandbox is ready: dropping it prints nothing."""
    pytester.makepyfile(
        test_stopped="""
        import pytest

        pytestmark = pytest.mark.nsbox

        def test_1_fails():
            assert False

        def test_2_never_runs():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-x")
    result.assert_outcomes(failed=1)
    assert "Traceback" not in result.stderr.str(), result.stderr.str()


# -- 4. after a session, nothing of it is left -------------------------------------

CLEANUP_CONFTEST = """
import json, os

SEEN = {"factories": [], "pid_ns_equal": []}


def _factories():
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                    cmdline = cmd.read()
            except OSError:
                continue
            if ppid == me and b"pytest_nsbox.factory" in cmdline:
                found.append(int(entry))
    return found


def pytest_runtest_logfinish(nodeid):
    SEEN["factories"].extend(pid for pid in _factories() if pid not in SEEN["factories"])
    SEEN["pid_ns_equal"].append(
        os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
    )


def pytest_sessionfinish(session):
    with open(os.path.join(str(session.config.rootpath), "seen.json"), "w") as out:
        json.dump(SEEN, out)
"""


@needs_cgroups
def test_after_a_session_nothing_is_left(pytester: pytest.Pytester) -> None:
    """In-process sessions: pid namespace for children back, factory and sandboxes gone, cgroups removed."""
    me = os.getpid()
    before = descendants(me)
    assert os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
    pytester.makeconftest(CLEANUP_CONFTEST)
    pytester.makepyfile(
        test_mix="""
        import os, subprocess, time
        import pytest

        pytestmark = pytest.mark.nsbox(memory="128m")

        @pytest.mark.parametrize("n", range(3))
        def test_plain(n):
            assert os.getpid() == 2

        @pytest.mark.nsbox(enabled=False)
        def test_inline_between():
            assert os.getpid() != 2

        def test_leaves_a_process():
            subprocess.Popen(["sleep", "30"])

        @pytest.mark.nsbox(timeout=0.5)
        def test_times_out():
            time.sleep(30)

        def test_fails():
            assert False

        @pytest.mark.nsbox(network="host", writes="report")
        def test_last():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=6, failed=2)
    seen = json.loads((pytester.path / "seen.json").read_text())
    assert len(seen["factories"]) == 1, seen
    assert all(seen["pid_ns_equal"]), seen
    (factory,) = seen["factories"]

    # A second session stopped by -x after a quick failure: the next test's
    # sandbox is in the making when the session ends.
    pytester.makepyfile(
        test_mix="""
        import pytest

        @pytest.mark.nsbox(memory="64m")
        def test_fails_at_once():
            assert False

        @pytest.mark.nsbox(memory="96m", hostname="never-run")
        def test_never_run():
            pass
        """
    )
    stopped = pytester.runpytest("-p", "no:cacheprovider", "-x")
    stopped.assert_outcomes(failed=1)

    assert os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
    assert not os.path.exists(f"/proc/{factory}"), (
        f"the factory (pid {factory}) is still there (a zombie?)"
    )
    assert wait_for(lambda: not factory_processes(me), 5), (
        f"factory processes of this pid left: {factory_processes(me)}"
    )
    assert wait_for(lambda: not (descendants(me) - before), 5), {
        pid: proc_table().get(pid) for pid in descendants(me) - before
    }
    assert [d for d, owner in cgroup_session_dirs().items() if owner == me] == []


CGROUP_COUNT_CONFTEST = """
import json, os, re

COUNTS = []
_SESSIONS = []


def _session_dirs():
    pattern = re.compile(rf"nsbox-{os.getpid()}(-\\d+)?")
    with open("/proc/self/mountinfo") as mounts:
        tops = [f[4] for f in map(str.split, mounts) if f[f.index("-") + 1] in ("cgroup", "cgroup2")]
    return [
        os.path.join(dirpath, name)
        for top in tops
        for dirpath, dirnames, _ in os.walk(top)
        for name in dirnames
        if pattern.fullmatch(name)
    ]


def pytest_runtest_logfinish(nodeid):
    _SESSIONS[:] = _SESSIONS or _session_dirs()
    COUNTS.append(max(sum(name.startswith("t") for name in os.listdir(s)) for s in _SESSIONS))


def pytest_sessionfinish(session):
    with open("counts.json", "w") as out:
        json.dump(COUNTS, out)
"""


@needs_cgroups
def test_each_tests_cgroup_is_removed_while_the_session_goes_on(pytester: pytest.Pytester) -> None:
    """The factory removes a test's cgroup once its init has exited: they do not pile up.

    At each test's end there are its own cgroup, the next test's, and
    those of a sandbox or two whose init is on its way out or not yet
    reaped (the factory reaps when the next request comes): a handful, how
    however many tests ran.
    """
    pytester.makeconftest(CGROUP_COUNT_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.nsbox(memory="64m")

        @pytest.mark.parametrize("n", range(24))
        def test_limited(n):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=24)
    counts = json.loads((pytester.path / "counts.json").read_text())
    assert len(counts) == 24 and max(counts) <= 6, counts


# -- 5. pytest-xdist -----------------------------------------------------------------

XDIST_TESTS = (
    DESCRIPTOR_CHECK
    + """
import json, os, socket
import pytest

pytestmark = pytest.mark.nsbox(writable="out")


@pytest.mark.parametrize("n", range(12))
def test_records_its_sandbox(n):
    with open("/proc/1/stat") as stat:
        init_start = stat.read().rpartition(")")[2].split()[19]
    record = {
        "worker": os.environ.get("PYTEST_XDIST_WORKER"),
        "pid": os.getpid(),
        "pid_ns": os.readlink("/proc/self/ns/pid"),
        "mnt_ns": os.readlink("/proc/self/ns/mnt"),
        "init_start": init_start,
        "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "hostname": socket.gethostname(),
        "tmp": sorted(os.listdir("/tmp")),
        "foreign_descriptors": foreign_descriptors(),
    }
    open(f"/tmp/mine-{n}", "w").close()
    with open(os.path.join(os.path.dirname(__file__), "out", f"{n}.json"), "w") as out:
        json.dump(record, out)
"""
)


def test_xdist_workers_sandbox_each_test_apart(pytester: pytest.Pytester) -> None:
    (pytester.path / "out").mkdir()
    pytester.makepyfile(test_xdist=XDIST_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-rA")
    result.assert_outcomes(passed=12)
    records = {
        int(path.stem): json.loads(path.read_text())
        for path in (pytester.path / "out").glob("*.json")
    }
    assert sorted(records) == list(range(12))
    by_worker: dict[str, list[int]] = {}
    for n, record in records.items():
        by_worker.setdefault(record["worker"], []).append(n)
        assert record["pid"] == 2, record
        assert record["processes"] == [1, 2], record
        assert record["hostname"] == f"nsbox-test-records-its-sandbox-{n}", record
        assert not any(name.startswith("mine-") for name in record["tmp"]), record
        assert record["foreign_descriptors"] == {}, record
    assert sorted(by_worker) == ["gw0", "gw1"], by_worker
    assert all(len(ns) >= 2 for ns in by_worker.values()), by_worker
    # Namespace inode numbers are reused once a namespace is gone; with the
    # start time of its init, a sandbox is told from every other.
    identities = [(r["pid_ns"], r["init_start"]) for r in records.values()]
    assert len(set(identities)) == 12, identities
    mounts = [(r["mnt_ns"], r["init_start"]) for r in records.values()]
    assert len(set(mounts)) == 12, mounts


# -- 6. a timeout does not take the prepared next sandbox with it -----------------


@pytest.mark.parametrize("limited", [True, False], ids=["cgroup", "no-limits"])
def test_tests_after_a_timeout_pass(pytester: pytest.Pytester, limited: bool) -> None:
    if limited and not HAVE_CGROUPS:
        pytest.skip("needs cgroups")
    mark = 'memory="128m", pids=32' if limited else ""
    pytester.makepyfile(
        test_timeout=f"""
        import os, subprocess, time
        import pytest

        pytestmark = pytest.mark.nsbox({mark})

        @pytest.mark.nsbox(timeout=1)
        def test_1_hangs():
            subprocess.Popen(["sleep", "60"])
            time.sleep(60)

        def test_2_after():
            assert os.getpid() == 2
            assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2]

        @pytest.mark.nsbox(timeout=1)
        def test_3_hangs_again():
            time.sleep(60)

        @pytest.mark.nsbox(timeout=1)
        def test_4_hangs_right_after():
            time.sleep(60)

        @pytest.mark.parametrize("n", range(2))
        def test_5_after(n):
            assert os.getpid() == 2
        """
    )
    started = time.monotonic()
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
    elapsed = time.monotonic() - started
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines_random(
        [
            "TIMEOUT *::test_1_hangs - Timeout: sandbox killed after 1.0 s (2 processes)*",
            "TIMEOUT *::test_3_hangs_again - Timeout: sandbox killed after 1.0 s (1 process)*",
            "TIMEOUT *::test_4_hangs_right_after - Timeout: sandbox killed after 1.0 s (1 process)*",
            "PASSED *::test_2_after",
            "PASSED *::test_5_after?0?",
            "PASSED *::test_5_after?1?",
        ]
    )
    assert elapsed < 15, elapsed


# -- 7. the after-test report: processes left running, files written -------------

REPORT_TESTS = """
import os, subprocess, sys, time
import pytest

pytestmark = pytest.mark.nsbox
ROOT = os.path.dirname(os.path.abspath(__file__))


def test_1_leaves_sleep_running():
    subprocess.Popen(["sleep", "30"])


def test_2_next_passes():
    assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2]


def test_3_leaves_a_daemon():
    # Double fork: the grandchild is re-parented to the sandbox's init (it
    # may still be the forked sh, not yet sleep, when it is listed).
    subprocess.Popen(["sh", "-c", "sleep 30 & exit 0"]).wait()


def test_4_leaves_a_fork_holding_the_pipes():
    if os.fork() == 0:
        time.sleep(30)
        os._exit(0)


@pytest.mark.nsbox(writes="report")
def test_5_writes_reported():
    with open(os.path.join(ROOT, "written.txt"), "w") as out:
        out.write("x")
    os.remove(os.path.join(ROOT, "doomed.txt"))


def test_6_quiet():
    pass
"""

REPORT_LIMITED = """

@pytest.mark.nsbox(memory="128m")
def test_7_limited_leaves_sleep_running():
    subprocess.Popen(["sleep", "30"])


@pytest.mark.nsbox(memory="128m")
def test_8_limited_next_passes():
    assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2]
"""


def check_report_output(output: str, limited: bool, fork_name: str) -> None:
    """``fork_name``: a pattern for the name of a fork of the test process (its pytest's name)."""
    assert "passed" in output and "failed" not in output.splitlines()[-1], output
    assert re.search(
        r"test_1_leaves_sleep_running: left running, killed: sleep \(pid 3\)", output
    ), output
    assert re.search(
        r"test_3_leaves_a_daemon: left running, killed: (sleep|sh) \(pid \d+\)", output
    ), output
    assert re.search(
        rf"test_4_leaves_a_fork_holding_the_pipes: left running, killed: {fork_name} \(pid 3\)",
        output,
    ), output
    assert "pid 3: sleep (sleep 30)" in output, output
    assert "nsbox: files written to the repo (thrown away)" in output, output
    assert "created written.txt" in output, output
    assert "deleted doomed.txt" in output, output
    assert "test_2_next_passes: left running" not in output, output
    assert "test_6_quiet: left running" not in output, output
    if limited:
        assert re.search(
            r"test_7_limited_leaves_sleep_running: left running, killed: sleep \(pid 3\)", output
        ), output


def test_after_test_report(pytester: pytest.Pytester) -> None:
    """Root: what was left running is reported and killed, writes are listed, the next test passes."""
    (pytester.path / "doomed.txt").write_text("doomed")
    pytester.makepyfile(test_report=REPORT_TESTS + (REPORT_LIMITED if HAVE_CGROUPS else ""))
    me = os.getpid()
    before = descendants(me)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
    result.assert_outcomes(passed=6 + (2 if HAVE_CGROUPS else 0))
    # In-process: a fork of the test is named as this process ("python", or "pytest"
    # when launched by its entry-point script, as under tox).
    check_report_output(result.stdout.str(), HAVE_CGROUPS, re.escape(PROCESS_NAME))
    assert (pytester.path / "doomed.txt").exists()
    assert not (pytester.path / "written.txt").exists()
    assert wait_for(lambda: not (descendants(me) - before), 5)
    assert wait_for(lambda: not factory_processes(me), 5), factory_processes(me)


def test_a_leftover_caught_in_execve_is_listed_with_its_arguments() -> None:
    """subprocess.Popen returns while its child's execve has set the new name, not yet the arguments.

    Init reads an empty command line again for a moment (this is the
    listing's reader, on the host's /proc): a process just started gets its
    arguments, and one that never has any (a zombie) costs the bounded wait.
    """
    zombie = subprocess.Popen(["true"])
    state = Path(f"/proc/{zombie.pid}/stat")
    assert wait_for(lambda: state.read_text().rpartition(")")[2].split()[0] == "Z", 5)
    live = subprocess.Popen(["sleep", "30"])
    try:
        assert sandbox._command_line(str(live.pid)) == "sleep 30"
        started = time.monotonic()
        assert sandbox._command_line(str(zombie.pid)) == ""
        assert time.monotonic() - started >= sandbox._CMDLINE_TRIES * 0.001
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_after_test_report_rootless(plain_user: PlainUser, user_project: Path) -> None:
    write_user_file(user_project, plain_user, "doomed.txt", "doomed")
    write_user_file(user_project, plain_user, "test_report.py", REPORT_TESTS)
    code, output = run_user_pytest(user_project, plain_user, "-p", "no:randomly")
    assert code == 0, output
    assert "6 passed" in output, output
    check_report_output(output, limited=False, fork_name=r"python\S*")  # python -m pytest
    assert (user_project / "doomed.txt").exists()
    assert not (user_project / "written.txt").exists()


@needs_cgroups
def test_process_left_in_a_child_cgroup_is_reported(pytester: pytest.Pytester) -> None:
    """A test may make cgroups of its own below its cgroup; what it leaves running there is left running too."""
    pytester.makepyfile(
        test_child_cgroup="""
        import os, re, subprocess
        import pytest

        def own_cgroup_dirs():
            # The cgroup namespace is rooted at the test's cgroup, but the
            # host's cgroup mounts show the whole tree: in each hierarchy,
            # the test's cgroup is the nsbox-<pid>/t<N> dir that lists this
            # process (init stays outside it).
            found = []
            for line in open("/proc/self/mountinfo"):
                fields = line.split()
                if fields[fields.index("-") + 1] not in ("cgroup", "cgroup2"):
                    continue
                for dirpath, dirnames, filenames in os.walk(fields[4]):
                    if not re.fullmatch(r"t\\d+", os.path.basename(dirpath)):
                        continue
                    if not os.path.basename(os.path.dirname(dirpath)).startswith("nsbox-"):
                        continue
                    try:
                        procs = open(os.path.join(dirpath, "cgroup.procs")).read().split()
                    except OSError:
                        continue
                    if str(os.getpid()) in procs:
                        found.append(dirpath)
            if not found:
                pytest.skip("the test's own cgroup is not visible from the sandbox")
            return found

        @pytest.mark.nsbox(pids=32, memory="128m")
        def test_1_leaves_sleep_in_a_child_cgroup():
            proc = subprocess.Popen(["sleep", "30"])
            for own in own_cgroup_dirs():
                child = os.path.join(own, "mine")
                try:
                    os.mkdir(child)
                    with open(os.path.join(child, "cgroup.procs"), "w") as procs:
                        procs.write(str(proc.pid))
                except OSError as exc:
                    pytest.skip(f"cannot use a child cgroup of {own}: {exc}")

        @pytest.mark.nsbox(pids=32, memory="128m")
        def test_2_next_passes():
            assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2]
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-p", "no:randomly")
    outcomes = result.parseoutcomes()
    if outcomes.get("skipped"):
        pytest.skip(result.stdout.str())
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*test_1_leaves_sleep_in_a_child_cgroup: left running, killed: sleep (pid 3)"]
    )


# -- 8. the factory dies mid-session --------------------------------------------------

KILL_FACTORY_CONFTEST = """
import json, os, signal, time

# NSBOX_TEST_KILL_AND_WAIT=1: give the next test's sandbox time to be ready,
# kill, and wait until the factory, its init (and outer) processes are all
# gone before the next test starts. Else kill and go on at once: the sandbox
# prepared for the next test dies (being built, or ready) as that test starts.
WAIT = os.environ.get("NSBOX_TEST_KILL_AND_WAIT") == "1"
STATE = {"killed": None, "tree": [], "pid_ns_equal": []}


def _table():
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
                with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                    cmdline = cmd.read()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[0], cmdline)
    return table


def _factory_pid(table):
    me = os.getpid()
    for pid, (ppid, _, cmdline) in table.items():
        if ppid == me and b"pytest_nsbox.factory" in cmdline:
            return pid
    return None


def _gone(pid):
    state = _table().get(pid)
    return state is None or state[1] == "Z"


def pytest_runtest_logfinish(nodeid):
    # In the pytest process (a sandboxed test's own hooks run in its sandbox).
    if nodeid.endswith("test_1_first") and STATE["killed"] is None:
        if WAIT:
            time.sleep(0.3)
        table = _table()
        pid = _factory_pid(table)
        assert pid is not None, "no sandbox factory among pytest's children"
        tree = [p for p, (ppid, _, _) in table.items() if ppid == pid]
        tree += [p for p, (ppid, _, _) in table.items() if ppid in tree]
        os.kill(pid, signal.SIGKILL)
        STATE["killed"] = pid
        STATE["tree"] = tree
        if WAIT:
            deadline = time.monotonic() + 10
            while not all(_gone(p) for p in [pid, *tree]):
                assert time.monotonic() < deadline, "the killed factory's processes stay"
                time.sleep(0.01)
    STATE["pid_ns_equal"].append(
        os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
    )


def pytest_sessionfinish(session):
    with open(os.path.join(str(session.config.rootpath), "state.json"), "w") as out:
        json.dump(STATE, out)
"""


def check_later_tests(summary: list[str], names: tuple[str, ...], output: str) -> None:
    """Each later test passed, or every line of its that did not pass names the factory.

    A test may have two lines: its call passed, and its sandbox ended (with
    the factory) during its teardown, an ERROR of its own.
    """
    for name in names:
        lines = [line for line in summary if f"::{name}" in line]
        assert lines, f"{name} is not in the summary:\n{output}"
        assert len(lines) <= 2, lines
        for line in lines:
            if not line.startswith("PASSED"):
                assert "sandbox factory" in line, (
                    f"{name} failed without naming the sandbox factory: {line}"
                )


KILL_MODES = pytest.mark.parametrize(
    "wait", [False, True], ids=["next-test-at-once", "after-all-gone"]
)


@KILL_MODES
def test_factory_death_mid_session_is_named_not_hung(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, wait: bool
) -> None:
    """Kill the factory after the first test: later tests pass or fail naming the factory; the session ends."""
    monkeypatch.setenv("NSBOX_TEST_KILL_AND_WAIT", "1" if wait else "0")
    pytester.makeconftest(KILL_FACTORY_CONFTEST)
    pytester.makepyfile(
        test_factory_dies="""
        import os
        import pytest

        pytestmark = pytest.mark.nsbox

        def test_1_first():
            assert os.getpid() == 2

        def test_2_prepared_by_the_dead_factory():
            assert os.getpid() == 2

        def test_3_later():
            assert os.getpid() == 2

        @pytest.mark.nsbox(hostname="other")
        def test_4_later_other_spec():
            assert os.getpid() == 2

        def test_5_last():
            assert os.getpid() == 2
        """
    )
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "-p", "no:randomly", timeout=60
    )
    elapsed = time.monotonic() - started
    output = result.stdout.str() + result.stderr.str()
    assert elapsed < 30, output
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), output
    assert "INTERNALERROR" not in output, output
    assert "Traceback" not in output, output
    state = json.loads((pytester.path / "state.json").read_text())
    assert state["killed"], state
    assert all(state["pid_ns_equal"]), state
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 5, output
    summary = summary_lines(output)
    assert any("PASSED" in line and "test_1_first" in line for line in summary), output
    check_later_tests(
        summary,
        (
            "test_2_prepared_by_the_dead_factory",
            "test_3_later",
            "test_4_later_other_spec",
            "test_5_last",
        ),
        output,
    )
    assert not os.path.exists(f"/proc/{state['killed']}"), "the killed factory was never reaped"


@KILL_MODES
def test_factory_death_mid_session_rootless(
    plain_user: PlainUser, user_project: Path, wait: bool
) -> None:
    """The same as a plain user (no cgroups): later tests pass or fail naming the factory."""
    write_user_file(user_project, plain_user, "conftest.py", KILL_FACTORY_CONFTEST)
    write_user_file(
        user_project,
        plain_user,
        "test_factory_dies.py",
        """
        import os
        import pytest

        pytestmark = pytest.mark.nsbox

        def test_1_first():
            assert os.getpid() == 2

        def test_2_prepared_by_the_dead_factory():
            assert os.getpid() == 2

        def test_3_later():
            assert os.getpid() == 2

        def test_4_last():
            assert os.getpid() == 2
        """,
    )
    started = time.monotonic()
    code, output = run_user_pytest(
        user_project,
        plain_user,
        "-p",
        "no:randomly",
        env={"NSBOX_TEST_KILL_AND_WAIT": "1" if wait else "0"},
    )
    assert time.monotonic() - started < 30, output
    assert code in (0, 1), output
    assert "INTERNALERROR" not in output and "Traceback" not in output, output
    summary = summary_lines(output)
    assert any(line.startswith("PASSED") and "test_1_first" in line for line in summary), output
    check_later_tests(
        summary, ("test_2_prepared_by_the_dead_factory", "test_3_later", "test_4_last"), output
    )


def test_a_sandbox_given_up_by_a_dying_factory_names_its_end(tmp_path: Path) -> None:
    """The factory's descriptors close a moment before its exit can be waited for.

    A sandbox that failed in that moment still names the factory's end: here a
    stand-in factory takes one request, closes every descriptor (the sandbox's
    channel with them), and exits only 0.3 s later.
    """
    from pytest_nsbox.factory import SandboxFactory

    class DyingFactory(SandboxFactory):
        def command(self, sock_fd: int) -> list[str]:
            code = (
                f"import os, socket, time; requests = socket.socket(fileno={sock_fd}); "
                "socket.recv_fds(requests, 1 << 20, 4); os.closerange(3, 1 << 16); "
                "time.sleep(0.3); os._exit(3)"
            )
            return [sys.executable, "-I", "-S", "-c", code]

    spec = project_spec(
        tmp_path, privileged=os.geteuid() == 0, isolate_network=False, list_writes=False
    )
    factory = DyingFactory()
    try:
        prepared = factory.prepare(spec, None).wait()
        pid = factory.pid
    finally:
        factory.close()
    assert prepared.setup_error is not None
    message = prepared.setup_error["message"]
    assert message.endswith(f"; the sandbox factory (pid {pid}) exited with status 3"), message


def test_factory_death_while_idle_then_more_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The factory dies between tests with nothing prepared (an inline test in between): later sandboxed tests are not hung."""
    monkeypatch.setenv("NSBOX_TEST_KILL_AND_WAIT", "1")
    pytester.makeconftest(KILL_FACTORY_CONFTEST)
    pytester.makepyfile(
        test_factory_idle="""
        import os
        import pytest

        @pytest.mark.nsbox
        def test_1_first():
            assert os.getpid() == 2

        def test_2_inline():
            assert os.getpid() != 2

        @pytest.mark.nsbox
        def test_3_sandboxed_after_the_death():
            assert os.getpid() == 2

        @pytest.mark.nsbox
        def test_4_last():
            assert os.getpid() == 2
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "-p", "no:randomly", timeout=60
    )
    output = result.stdout.str() + result.stderr.str()
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), output
    assert "INTERNALERROR" not in output and "Traceback" not in output, output
    summary = summary_lines(output)
    for name in ("test_3_sandboxed_after_the_death", "test_4_last"):
        (line,) = [line for line in summary if f"::{name}" in line]
        if not line.startswith("PASSED"):
            assert "sandbox factory" in line, (
                f"{name} failed without naming the sandbox factory: {line}"
            )


def test_a_session_that_sandboxes_nothing_keeps_no_factory(pytester: pytest.Pytester) -> None:
    """The header's probe starts the factory; with no sandboxed test it is gone after collection."""
    pytester.makepyfile(
        test_plain=FACTORIES_OF_THIS_PYTEST
        + textwrap.dedent(
            """
            def test_no_factory_while_tests_run():
                assert factories_of_this_pytest() == []
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
    result.stdout.fnmatch_lines(["nsbox: *namespaces*"])  # the header still probed
    result.assert_outcomes(passed=1)


def test_nsbox_starts_the_factory_before_collection(pytester: pytest.Pytester) -> None:
    """--nsbox starts the factory at configure, so that its start overlaps collection.

    With -q there is no header, whose probe would start it too; a session
    sandboxed only by markers does not know at configure that it will need
    one, and starts none then.
    """
    pytester.makeconftest(
        FACTORIES_OF_THIS_PYTEST
        + textwrap.dedent(
            """
            def pytest_collection(session):
                print(f"factories at collection: {len(factories_of_this_pytest())}")
            """
        )
    )
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    sandboxed = pytester.runpytest("-q", "-s", "-p", "no:cacheprovider", "--nsbox")
    sandboxed.assert_outcomes(passed=1)
    sandboxed.stdout.fnmatch_lines(["factories at collection: 1"])
    unmarked = pytester.runpytest("-q", "-s", "-p", "no:cacheprovider")
    unmarked.assert_outcomes(passed=1)
    unmarked.stdout.fnmatch_lines(["factories at collection: 0"])


def test_an_xdist_controller_keeps_no_factory(pytester: pytest.Pytester) -> None:
    """-n 2 -q: the controller runs no test and, without a header to probe, starts no factory."""
    pytester.makeconftest(
        FACTORIES_OF_THIS_PYTEST
        + textwrap.dedent(
            """
            def pytest_sessionfinish(session):
                if not hasattr(session.config, "workerinput"):
                    print(f"controller's factories: {len(factories_of_this_pytest())}")
            """
        )
    )
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-q", "-s", "-p", "no:cacheprovider", "--nsbox", "-n", "2"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*controller's factories: 0"])


def test_the_factory_interpreter_does_not_import_threading() -> None:
    """threading's at-fork handler would run in every init the factory forks.

    It cost init about 140 copy-on-write faults before its first line, a
    quarter of all it takes. subprocess (which imports it) is imported only
    where pytest uses it.
    """
    import subprocess

    from pytest_nsbox.factory import SandboxFactory

    interpreter = SandboxFactory().command(0)[:-2]  # without its -c code
    package_parent = str(Path(sandbox.__file__).parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {package_parent!r}); import pytest_nsbox.factory; "
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run([*interpreter, "-c", code], capture_output=True, text=True, check=True)
    modules = set(done.stdout.split())
    assert "pytest_nsbox.sandbox" in modules
    assert not modules & {"threading", "subprocess"}


def test_a_factory_that_does_not_end_is_killed_at_close() -> None:
    """close() waits 5 s for the factory to leave its loop, then kills it and returns."""
    from pytest_nsbox.factory import SandboxFactory

    factory = SandboxFactory()
    try:
        assert factory.pid is None
        factory._started()  # what the first prepare() does
        pid = factory.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # stopped, it never sees its socket close
        started = time.monotonic()
        factory.close()
        assert 4.5 < time.monotonic() - started < 30
        assert factory.pid is None
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
    finally:
        if factory.pid is not None:
            os.kill(factory.pid, signal.SIGKILL)
            factory.close()


# -- 9. root that cannot return to its own namespaces ---------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs real root to map every id")
def test_root_of_a_user_namespace_that_owns_none_of_its_namespaces(tmp_path: Path) -> None:
    """Root in a user namespace that maps every id but owns none of its namespaces.

    Such a factory could not return to its own namespaces after forking an
    init (setns needs CAP_SYS_ADMIN over their owner), so it forks an outer
    per sandbox, as a plain user's does. Root's sequence fails there (an
    overlay without userxattr needs the host's root), and the session
    sandboxes the rootless way, with the same factory.
    """
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text(
        textwrap.dedent(
            """
            from pytest_nsbox import sandbox

            def pytest_report_header():
                home = sandbox.HomeNamespaces.open()
                return f"home namespaces: {'returnable' if home else 'not returnable'}"
            """
        )
    )
    (project / "test_inside.py").write_text(
        textwrap.dedent(
            """
            import os, pytest

            pytestmark = pytest.mark.nsbox

            def test_sandboxed():
                assert os.getpid() == 2
                assert open("/proc/1/comm").read().strip() == "nsbox-init"
                with open("data", "w") as data:
                    data.write("changed")  # thrown away
            """
        )
    )
    (project / "data").write_text("x")
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs pytest or exits
        try:
            os.close(go_w)
            os.close(ready_r)
            os.close(out_r)
            kernel.unshare(kernel.CLONE_NEWUSER)  # its other namespaces stay the host's
            os.write(ready_w, b"u")
            os.read(go_r, 1)  # the parent writes the id maps
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.chdir(project)
            argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--nsbox"]
            os.execv(sys.executable, argv)
        except BaseException as exc:
            os.write(ready_w, repr(exc).encode())
        finally:
            os._exit(127)
    for fd in (go_r, ready_w, out_w):
        os.close(fd)
    try:
        ready = os.read(ready_r, 1)
        assert ready == b"u", ready + os.read(ready_r, 1000)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as id_map:
                id_map.write("0 0 4294967295")
        os.write(go_w, b"g")
        chunks = []
        while chunk := os.read(out_r, 65536):
            chunks.append(chunk)
    finally:
        for fd in (go_w, ready_r, out_r):
            os.close(fd)
        _, status = os.waitpid(pid, 0)
    output = b"".join(chunks).decode(errors="replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, output
    assert "home namespaces: not returnable" in output, output
    assert "(rootless)" in output, output
    assert "1 passed" in output, output
    assert (project / "data").read_text() == "x"
