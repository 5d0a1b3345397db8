"""Shared fixtures: the unprivileged user that rootless tests run as.

Rootless tests need a real non-root uid. As root we create one system user
(``nsbox-tester``) once; it is the same user on every run, so there is nothing
to remove afterwards. Code runs as that user in a forked child that drops its
ids with setgid/setuid: no second interpreter has to be reachable by the user.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from pytest_nsbox import kernel, sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from nsbench import plainuser  # shared with the benchmark's rootless rows

if TYPE_CHECKING:
    from pytest_nsbox.cgroups import SandboxCgroup
    from pytest_nsbox.factory import PreparedSandbox
    from pytest_nsbox.runner import SandboxRun

PR_SET_DUMPABLE = 4
PLAIN_USER = plainuser.PLAIN_USER

T = TypeVar("T")


@dataclass(frozen=True)
class PlainUser:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="session")
def plain_user() -> PlainUser:
    """An unprivileged user, created with useradd when the suite runs as root."""
    try:
        entry = pwd.getpwnam(PLAIN_USER)
    except KeyError:
        if os.geteuid() != 0:
            pytest.fail(f"rootless tests need the user {PLAIN_USER!r}; run the suite as root once")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PLAIN_USER],
            check=True,
        )
        entry = pwd.getpwnam(PLAIN_USER)
    return PlainUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def run_in_fork_as(user: PlainUser, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a forked child with the user's uid/gid and return its result.

    The result (or the exception, re-raised here as RuntimeError with the
    child's traceback) travels back pickled over a pipe. The interpreter is
    made reachable first: a sandbox factory starts it anew.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_end)
            plainuser.becoming(user.uid, user.gid, plainuser.interpreter_paths())()
            # setuid() made this process non-dumpable, which makes its /proc
            # files root's; a user's own login process is dumpable.
            kernel.prctl(PR_SET_DUMPABLE, 1)
            payload = pickle.dumps((True, fn()))
        except BaseException:
            payload = pickle.dumps((False, traceback.format_exc()))
            status = 1
        finally:
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if not ok:
        raise RuntimeError(f"child running as {user.name} failed:\n{value}")
    return value  # type: ignore[no-any-return]


def run_as(
    user: PlainUser,
    argv: list[str],
    cwd: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    as_root_first: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command as ``user``, with this interpreter and its packages reachable.

    ``as_root_first`` runs in the command's private mount namespace before
    the ids are dropped: a place to mount things only that command sees.
    """
    reachable = [*plainuser.interpreter_paths(), cwd]
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": cwd,
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    return subprocess.run(
        argv,
        cwd=cwd,
        env=full_env,
        preexec_fn=plainuser.becoming(user.uid, user.gid, reachable, as_root_first),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def user_project(plain_user: PlainUser) -> Iterator[Path]:
    """An empty project directory the plain user owns, outside pytest's 0700 basetemp."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="nsbox-user-project-"))
    os.chown(path, plain_user.uid, plain_user.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def full_summary_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner sessions print whole short-summary lines, as on CI (pytest checks $CI)."""
    monkeypatch.setenv("CI", "true")


_SESSION_DIR = re.compile(r"nsbox-(\d+)(?:-\d+)?")


def cgroup_session_dirs() -> dict[str, int]:
    """Every pytest-nsbox session dir (``nsbox-<pid>[-n]``) in every cgroup hierarchy, with its owner."""
    found = {}
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[fields.index("-") + 1] in ("cgroup", "cgroup2"):
                for dirpath, dirnames, _ in os.walk(fields[4]):
                    for name in dirnames:
                        match = _SESSION_DIR.fullmatch(name)
                        if match:
                            found[os.path.join(dirpath, name)] = int(match.group(1))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def project_spec(
    root: Path, *, privileged: bool, isolate_network: bool, list_writes: bool
) -> sandbox.SandboxSpec:
    """A sandbox of the project ``root``, run from there: private /tmp, no hostname."""
    return sandbox.build_spec(
        rootdir=str(root),
        cwd=str(root),
        privileged=privileged,
        isolate_network=isolate_network,
        hostname=None,
        private_tmp=True,
        tmp_size=16 << 20,
        passthrough=(),
        list_writes=list_writes,
    )


def run_one_test_process(
    spec: sandbox.SandboxSpec,
    cgroup: SandboxCgroup | None,
    test_process: Callable[[int], sandbox.TestProcess],
    *,
    timeout: float,
    beside: Callable[[PreparedSandbox], contextlib.AbstractContextManager[None]] = (
        lambda prepared: contextlib.nullcontext()
    ),
) -> tuple[SandboxRun, str]:
    """One test process in a sandbox of a factory of its own: its run, and what it wrote.

    ``test_process(out)`` is what the test process runs, writing to ``out``;
    ``beside(prepared)`` is entered just before the fork and left once the
    test process has been reaped, before the sandbox is let go.
    """
    from pytest_nsbox import runner
    from pytest_nsbox.factory import SandboxFactory

    read_end, write_end = os.pipe()
    factory = SandboxFactory()
    try:
        prepared = factory.prepare(spec, cgroup).wait()
        assert prepared.setup_error is None, prepared.setup_error
        try:
            with beside(prepared):
                result = runner.run(
                    prepared, lambda fd: test_process(write_end), factory=factory, timeout=timeout
                )
        finally:
            prepared.close()
    finally:
        factory.close()
        os.close(write_end)
        with os.fdopen(read_end) as reader:
            written = reader.read()
    return result, written
