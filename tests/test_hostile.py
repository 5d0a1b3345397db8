"""Hostile and careless tests: each is contained, and the host is unchanged.

Every scenario runs in an inner pytest session (a subprocess, as users run
it). What the sandboxed test tries, it asserts fails from inside; what must
hold on the host (files, mounts, processes, cgroups) is asserted here.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

HOSTILE_CONFTEST = """
import os
PYTEST_PID = os.getpid()  # imported before the fork: the sandbox knows it
"""


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Mode and content of every file the test made (not pytester's own output)."""
    result = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "__pycache__" in rel or rel in ("stdout", "stderr") or rel.startswith("runpytest"):
            continue
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        result[rel] = (st.st_mode, digest)
    return result


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[3:]) for line in f)


def test_escape_attempts_fail_and_change_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(HOSTILE_CONFTEST)
    (pytester.path / "data.txt").write_text("precious")
    pytester.makepyfile(
        """
        import ctypes, errno, os, signal, socket
        from pathlib import Path
        import pytest
        from conftest import PYTEST_PID

        ROOT = Path(__file__).parent
        libc = ctypes.CDLL(None, use_errno=True)
        pytestmark = pytest.mark.nsbox
        MS_REMOUNT, MS_BIND, MS_RDONLY = 32, 4096, 1

        def fails(result):
            return result == -1 and ctypes.get_errno() != 0

        def test_cannot_unmount_the_overlay_or_proc():
            assert fails(libc.umount2(str(ROOT).encode(), 0))
            assert fails(libc.umount2(str(ROOT).encode(), 2))  # MNT_DETACH
            assert fails(libc.umount2(b"/proc", 2))
            assert (ROOT / "data.txt").read_text() == "precious"

        def test_cannot_uncover_the_overlays_scratch():
            # The tmpfs holding the overlay's upper layer stays beneath the
            # private /dev/shm: that mount cannot be removed either.
            (ROOT / "written.txt").write_text("upper")
            assert fails(libc.umount2(b"/dev/shm", 0))
            assert fails(libc.umount2(b"/dev/shm", 2))
            assert fails(libc.umount2(b"/tmp", 2))
            assert not any(p.name == "upper" for p in Path("/dev/shm").iterdir())

        def test_cannot_clear_locked_mount_flags():
            # /proc was mounted nosuid,nodev by the sandbox: those flags are locked.
            assert fails(libc.mount(None, b"/proc", None, MS_REMOUNT | MS_BIND, None))

        def test_cannot_enter_other_namespaces():
            # /proc/1 is the sandbox's init; the host's namespaces are not even
            # named here. Init's own may not be opened, or not entered.
            for ns in ("mnt", "user", "net", "pid"):
                try:
                    fd = os.open(f"/proc/1/ns/{ns}", os.O_RDONLY)
                except PermissionError:
                    continue
                try:
                    assert fails(libc.setns(fd, 0)), ns
                finally:
                    os.close(fd)

        def test_cannot_reach_what_init_holds():
            # Init shares the test's user namespace and holds the repository
            # beneath the overlay and the channel to pytest: none of it shows.
            held = os.listdir("/proc/1/fd")
            assert held
            for fd in held:
                with pytest.raises(PermissionError):
                    os.open(f"/proc/1/fd/{fd}", os.O_PATH)
            with pytest.raises(PermissionError):
                os.readlink("/proc/1/cwd")
            assert fails(libc.ptrace(16, 1, None, None))  # PTRACE_ATTACH

        def test_cannot_see_or_signal_or_trace_pytest():
            assert PYTEST_PID > 2
            with pytest.raises(ProcessLookupError):
                os.kill(PYTEST_PID, signal.SIGKILL)
            assert fails(libc.ptrace(16, PYTEST_PID, None, None))  # PTRACE_ATTACH
            with pytest.raises(FileNotFoundError):
                open(f"/proc/{PYTEST_PID}/mem", "rb")
            assert not os.path.exists(f"/proc/{PYTEST_PID}")

        def test_cannot_change_the_hostname_or_network():
            assert fails(libc.sethostname(b"evil", 4))
            assert socket.if_nameindex() == [(1, "lo")]

        def test_chmod_everything_to_000():
            for path in ROOT.rglob("*"):
                os.chmod(path, 0)
            os.chmod(ROOT, 0)
        """
    )
    before = snapshot(pytester.path)
    mounts_before = host_mounts()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=8)
    assert snapshot(pytester.path) == before
    assert stat.S_IMODE(pytester.path.stat().st_mode) != 0
    assert host_mounts() == mounts_before


def test_fork_bomb_under_pids_limit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, time
        import pytest

        @pytest.mark.nsbox(pids=32, timeout=20)
        def test_fork_bomb():
            while True:
                try:
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                except BlockingIOError:
                    break
            raise AssertionError("fork stopped working")
        """
    )
    result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*PIDS-LIMIT*pids limit 32 reached*fork stopped working*"])
    assert not any("fork_bomb" in p for p in _cmdlines())


def _cmdlines() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                continue
    return found


def test_filling_tmp_is_bounded_and_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(tmp_size="32m")
        def test_writes_a_gigabyte():
            with open("/tmp/huge", "wb") as f:
                for _ in range(1024):
                    f.write(b"\\0" * (1 << 20))
        """
    )
    free_before = os.statvfs("/tmp").f_bavail
    result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*TMP-FULL*/tmp is full: its 32.0 MiB tmpfs (tmp_size) ran out, so writes failed "
            "with ENOSPC; OSError: [[]Errno 28[]] No space left on device*"
        ]
    )
    assert abs(os.statvfs("/tmp").f_bavail - free_before) * os.statvfs("/tmp").f_frsize < (
        512 * 1024 * 1024
    )


def test_garbage_on_the_result_pipe(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import fcntl, os
        import pytest

        def result_pipes():
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                try:
                    target = os.readlink(f"/proc/self/fd/{name}")
                    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                except OSError:
                    continue
                if target.startswith("pipe:") and flags & os.O_ACCMODE == os.O_WRONLY:
                    yield fd

        @pytest.mark.nsbox
        def test_writes_garbage():
            for fd in result_pipes():
                os.write(fd, b"this is not a frame")

        @pytest.mark.nsbox
        def test_closes_the_pipe():
            for fd in result_pipes():
                os.close(fd)

        @pytest.mark.nsbox
        def test_next_one_is_fine():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*::test_writes_garbage - nsbox: protocol error on the result pipe: unexpected "
            "bytes on the result pipe: b'this is not a fr' (did the test write to or close the "
            "sandbox's result pipe?)",
            "*::test_closes_the_pipe - nsbox: the test process could not send its call report*",
        ]
    )


def test_daemons_are_killed_and_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, time
        import pytest

        @pytest.mark.nsbox
        def test_double_fork_daemon():
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execvp("sleep", ["sleep", "4242.5"])
                os._exit(0)
            time.sleep(0.2)
        """
    )
    result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_double_fork_daemon: left running, killed: sleep (pid *)"])
    assert not any("4242.5" in p for p in _cmdlines())
