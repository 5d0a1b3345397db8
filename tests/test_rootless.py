"""The rootless path, for real: pytest run by an unprivileged user.

The inner pytest runs as ``nsbox-tester`` in a project that user owns. The
sandbox there is built without any privilege: a user namespace, an overlay
with ``userxattr``, capabilities dropped before the test runs.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from conftest import PlainUser, run_as, run_in_fork_as

from pytest_nsbox import probe


def write(project: Path, user: PlainUser, name: str, text: str) -> None:
    path = project / name
    path.write_text(textwrap.dedent(text))
    os.chown(path, user.uid, user.gid)


def run_pytest(project: Path, user: PlainUser, *args: str) -> tuple[int, str]:
    result = run_as(
        user,
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=str(project),
    )
    return result.returncode, result.stdout + result.stderr


def test_probe_as_plain_user(plain_user: PlainUser) -> None:
    def ask() -> tuple[bool, bool, str]:
        probe.probe.cache_clear()
        caps = probe.probe()
        return caps.usable, caps.privileged, caps.namespaces

    usable, privileged, namespaces = run_in_fork_as(plain_user, ask)
    assert usable
    assert not privileged
    assert namespaces == "user+mnt+pid+net+uts+ipc+cgroup"


def test_rootless_sandbox_end_to_end(plain_user: PlainUser, user_project: Path) -> None:
    write(user_project, plain_user, "data.txt", "original")
    write(
        user_project,
        plain_user,
        "test_rootless.py",
        f"""
        import os, socket, ctypes
        from pathlib import Path
        import pytest

        ROOT = Path(__file__).parent
        pytestmark = pytest.mark.nsbox

        def test_identity_and_namespaces():
            assert os.getuid() == {plain_user.uid}
            assert os.getpid() == 2
            assert socket.if_nameindex() == [(1, "lo")]

        def test_no_capabilities_left():
            status = open("/proc/self/status").read()
            caps = {{line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Cap")}}
            assert caps["CapEff"] == "0000000000000000", caps
            assert caps["CapPrm"] == "0000000000000000", caps

        def test_writes_and_deletes_dirs():
            (ROOT / "data.txt").write_text("changed")
            (ROOT / "d").mkdir()
            (ROOT / "d" / "f").write_text("x")
            (ROOT / "d" / "f").unlink()
            (ROOT / "d").rmdir()

        def test_chmod_000_is_enforced():
            target = ROOT / "data.txt"
            target.chmod(0)
            with pytest.raises(PermissionError):
                target.read_text()

        def test_cannot_unmount_the_overlay():
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.umount2(str(ROOT).encode(), 2) == -1
            assert ctypes.get_errno() in (1, 22)

        def test_cannot_reach_what_init_holds():
            # Init runs as the same user in the same user namespace, but is
            # not dumpable: its descriptors (the repository beneath the
            # overlay, the channel to pytest) are not even listed.
            with pytest.raises(PermissionError):
                os.listdir("/proc/1/fd")
            with pytest.raises(PermissionError):
                os.open("/proc/1/fd/0", os.O_PATH)

        def test_repo_intact():
            assert (ROOT / "data.txt").read_text() == "original"

        def test_cpu_affinity_is_pytests():
            # pytest held itself to one CPU to fork the test, which gets all back.
            assert os.sched_getaffinity(0) == set({sorted(os.sched_getaffinity(0))})
        """,
    )
    code, output = run_pytest(user_project, plain_user)
    assert code == 0, output
    assert "8 passed" in output, output
    assert (user_project / "data.txt").read_text() == "original"
    assert (user_project / "data.txt").stat().st_mode & 0o777 == 0o644
    assert "rootless" in output


def test_rootless_ends_of_a_test_are_reported(plain_user: PlainUser, user_project: Path) -> None:
    """Each way a test process can end, as a plain user, and no child of pytest left over.

    The test process is a plain user's first child's child: that first
    child reports how it ended. At each test's end pytest has no child left
    exiting, nor at the session's.
    """
    write(
        user_project,
        plain_user,
        "conftest.py",
        """
        import json, os
        import pytest

        SEEN = []

        def _exiting_children():
            me, found = str(os.getpid()), 0
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                found += fields[1] == me and fields[0] in "ZX"
            return found

        def pytest_runtest_logfinish(nodeid):
            SEEN.append(_exiting_children())

        @pytest.hookimpl(trylast=True)  # after the plugin's, which closes the factory
        def pytest_unconfigure(config):
            SEEN.append(_exiting_children())
            with open(os.path.join(str(config.rootpath), "seen.json"), "w") as out:
                json.dump(SEEN, out)
        """,
    )
    write(
        user_project,
        plain_user,
        "test_ends.py",
        """
        import os, signal, subprocess, time
        import pytest

        pytestmark = pytest.mark.nsbox

        def test_passes():
            pass

        def test_segfaults():
            os.kill(os.getpid(), signal.SIGSEGV)

        def test_exits_3():
            os._exit(3)

        @pytest.mark.nsbox(timeout=0.5)
        def test_times_out():
            time.sleep(30)

        def test_leaves_a_process():
            subprocess.Popen(["sleep", "30"])

        @pytest.mark.parametrize("n", range(6))
        def test_more(n):
            pass
        """,
    )
    code, output = run_pytest(user_project, plain_user)
    assert code == 1, output
    assert "3 failed, 8 passed" in output, output
    assert "Crashed: the test process was killed by SIGSEGV (signal 11) during call" in output
    assert "Crashed: the test process exited with status 3 during call" in output, output
    assert "Timeout: sandbox killed after 0.5 s (1 process)" in output, output
    assert "test_leaves_a_process: left running, killed: sleep (pid 3)" in output, output
    seen = json.loads((user_project / "seen.json").read_text())
    assert seen == [0] * 12, seen


def test_rootless_limits_follow_unavailable_option(
    plain_user: PlainUser, user_project: Path
) -> None:
    write(
        user_project,
        plain_user,
        "test_limits.py",
        """
        import pytest

        @pytest.mark.nsbox(memory="64m")
        def test_limited():
            pass
        """,
    )
    code, output = run_pytest(user_project, plain_user)
    assert code == 1, output
    assert "nsbox: cannot sandbox this test: memory=64.0 MiB needs cgroups" in output, output
    assert "Delegate=yes" in output, output
    code, output = run_pytest(user_project, plain_user, "--nsbox-unavailable=skip")
    assert code == 0, output
    assert "1 skipped" in output, output
    code, output = run_pytest(user_project, plain_user, "--nsbox-unavailable=run")
    assert code == 0, output
    assert "ran without the sandbox" in output, output


def test_locked_mount_flags_are_kept(plain_user: PlainUser, user_project: Path) -> None:
    """A sys.path entry on a nosuid,nodev tmpfs under /tmp, rebound read-only rootless.

    In a user namespace those flags are locked: the read-only remount must
    carry them, or the kernel refuses it (seen on cgroup v2 CI guests).
    """
    import os
    import tempfile

    from pytest_nsbox import kernel

    libdir = tempfile.mkdtemp(prefix="nsbox-locked-", dir="/tmp")

    def mount_nosuid_tmpfs() -> None:
        flags = kernel.MS_NOSUID | kernel.MS_NODEV
        kernel.mount("nsbox-test", libdir, "tmpfs", flags, "size=1m,mode=0755")
        with open(os.path.join(libdir, "locked_helper.py"), "w") as module:
            module.write("VALUE = 7\n")

    write(
        user_project,
        plain_user,
        "test_locked.py",
        """
        import pytest

        @pytest.mark.nsbox
        def test_lazy_import():
            import locked_helper
            assert locked_helper.VALUE == 7
        """,
    )
    try:
        result = run_as(
            plain_user,
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA"],
            cwd=str(user_project),
            env={"PYTHONPATH": libdir},
            as_root_first=mount_nosuid_tmpfs,
        )
    finally:
        os.rmdir(libdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
