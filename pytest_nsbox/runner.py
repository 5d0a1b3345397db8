"""The parent's side of one sandbox: fork, collect frames, enforce the timeout, wait.

Nothing here knows about pytest: it runs a callable in a sandbox and returns
what came back (frames from the child) and what the kernel says (wait status,
resource usage, the cgroup's counters). Turning that into test reports is
:mod:`pytest_nsbox.outcomes`' job, so data flows one way.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_nsbox import protocol, sandbox
from pytest_nsbox.cgroups import SandboxCgroup

_READ_CHUNK = 1 << 16


@dataclass
class SandboxRun:
    """Everything known about one finished sandbox."""

    frames: list[protocol.Frame] = field(default_factory=list)
    protocol_error: str | None = None
    outer_status: int | None = None
    cpu_seconds: float = 0.0
    max_rss: int = 0
    timeout: float | None = None
    timed_out: bool = False
    killed_at_timeout: int = 0
    interrupted: bool = False
    wall_seconds: float = 0.0

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        return [frame.body for frame in self.frames if frame.kind == kind]

    def first(self, kind: str) -> dict[str, Any] | None:
        found = self.bodies(kind)
        return found[0] if found else None


def run(
    spec: sandbox.SandboxSpec,
    run_test: Callable[[int], sandbox.TestProcess],
    *,
    cgroup: SandboxCgroup | None,
    timeout: float | None,
) -> SandboxRun:
    """Fork a sandbox that runs ``run_test(result_fd)`` and wait for it.

    ``run_test`` is called in the child with the pipe's write end and returns
    what the test process runs. On timeout the whole sandbox is
    killed: through the cgroup when there is one, else through its init
    (pid 1), whose death takes every process of its pid namespace with it.
    On KeyboardInterrupt the sandbox is killed and the interrupt re-raised.
    """
    result = SandboxRun(timeout=timeout)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    parent_pid = os.getpid()
    started = time.monotonic()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a multi-threaded process (a
        # pytest-xdist worker). The child never touches another thread's
        # state: it runs the test and talks only through its own pipe.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Frozen objects are never traversed by the children's collections,
        # so their pages stay shared instead of being copied (fork's CoW).
        gc.freeze()
        pid = os.fork()
    if pid != 0:
        gc.unfreeze()
    if pid == 0:
        os.close(read_fd)
        sandbox.run_outer(spec, write_fd, cgroup, run_test(write_fd), parent_pid)
    os.close(write_fd)
    try:
        _collect(read_fd, result, started, timeout, pid, cgroup)
    except BaseException:
        result.interrupted = True
        _kill_sandbox(pid, cgroup, result)
        _wait(pid, result)
        raise
    finally:
        os.close(read_fd)
    _wait(pid, result)
    result.wall_seconds = time.monotonic() - started
    return result


def _collect(
    read_fd: int,
    result: SandboxRun,
    started: float,
    timeout: float | None,
    pid: int,
    cgroup: SandboxCgroup | None,
) -> None:
    """Read frames until every writer closed the pipe, or the deadline passed."""
    reader = protocol.FrameReader()
    deadline = None if timeout is None else started + timeout
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    while True:
        wait_ms = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.timed_out = True
                _kill_sandbox(pid, cgroup, result)
                deadline = None
                continue
            wait_ms = max(1, int(remaining * 1000))
        if not poller.poll(wait_ms):
            continue
        chunk = os.read(read_fd, _READ_CHUNK)
        if not chunk:
            break
        if result.protocol_error is not None:
            continue  # drain until the writers are gone
        try:
            result.frames.extend(reader.feed(chunk))
        except protocol.ProtocolError as exc:
            result.protocol_error = str(exc)
    if result.protocol_error is None:
        try:
            reader.finish()
        except protocol.ProtocolError as exc:
            result.protocol_error = str(exc)


def _kill_sandbox(pid: int, cgroup: SandboxCgroup | None, result: SandboxRun) -> None:
    """SIGKILL every process of the sandbox, counting the test's own first."""
    init = result.first("started")
    if init is not None:
        # The test's processes: everything in its pid namespace but init.
        result.killed_at_timeout = max(count_pid_namespace(int(init["init_pid"])) - 1, 0)
    if cgroup is not None:
        cgroup.kill()
    for target in ([int(init["init_pid"])] if init else []) + [pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def count_pid_namespace(init_pid: int) -> int:
    """How many processes live in the pid namespace whose init is ``init_pid``."""
    try:
        target = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return 0
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == target:
                    count += 1
            except OSError:
                continue
    return count


def _wait(pid: int, result: SandboxRun) -> None:
    while True:
        try:
            _, status, usage = os.wait4(pid, 0)
            break
        except InterruptedError:
            continue
    result.outer_status = status
    # wait4 counts the outer process and every descendant that was reaped:
    # init reaps the whole sandbox, so this is the sandbox's CPU time.
    result.cpu_seconds = usage.ru_utime + usage.ru_stime
    result.max_rss = usage.ru_maxrss * 1024
