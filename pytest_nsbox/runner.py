"""The parent's side of one sandbox: fork the test into it, collect frames, enforce the timeout.

Nothing here knows about pytest: it runs a callable in a prepared sandbox
(:mod:`pytest_nsbox.factory`) and returns what came back (frames from the
test process and from the sandbox's init) and what the kernel says (wait
status, resource usage). Turning that into test reports is
:mod:`pytest_nsbox.outcomes`' job, so data flows one way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_nsbox import kernel, protocol, sandbox
from pytest_nsbox.factory import PreparedSandbox, SandboxFactory

if TYPE_CHECKING:
    from pytest_nsbox.cgroups import SandboxCgroup

_READ_CHUNK = 1 << 20
_PIPE_SIZE = 1 << 20
_DRAIN_SECONDS = 0.02
_INIT_EXIT_GRACE = 0.2  # seconds init may take to finish dying (see _init_outlived)
_FORK_WARNS = sys.version_info >= (3, 12)  # see _fork
_clone_into_cgroup_refused = False  # see _fork_in_cgroup
_NO_CLONE_INTO_CGROUP = {errno.ENOSYS, errno.E2BIG, errno.EPERM}


@dataclass
class SandboxRun:
    """Everything known about one finished sandbox.

    ``test_status`` is the test process's wait status; ``child_status`` that
    of pytest's own child, which is the test process for root and, for a
    plain user, the process that forked it.
    """

    frames: list[protocol.Frame] = field(default_factory=list)
    protocol_error: str | None = None
    test_status: int | None = None
    child_status: int | None = None
    cpu_seconds: float = 0.0
    max_rss: int = 0
    timeout: float | None = None
    timed_out: bool = False
    killed_at_timeout: int = 0
    interrupted: bool = False
    wall_seconds: float = 0.0
    #: Set when the sandbox's init was gone before the test process ended, and why.
    init_lost: str | None = None

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        return [frame.body for frame in self.frames if frame.kind == kind]

    def first(self, kind: str) -> dict[str, Any] | None:
        found = self.bodies(kind)
        return found[0] if found else None


def run(
    prepared: PreparedSandbox,
    run_test: Callable[[int], sandbox.TestProcess],
    *,
    factory: SandboxFactory,
    timeout: float | None,
) -> SandboxRun:
    """Fork a test process into ``prepared`` that runs ``run_test(result_fd)``, and wait for it.

    ``run_test`` is called in the child with the pipe's write end. Root's
    child is forked straight into the sandbox's pid namespace: the pytest
    process points its pid namespace for children there for the ``fork``,
    and back to its own once the child is reaped (meanwhile pytest only
    waits, and does not fork). The child closes every descriptor of
    the factory and its sandboxes before the test runs. On timeout the whole
    sandbox is killed: through the cgroup when there is one, and through its
    init, whose death takes every process of its pid namespace with it. On
    KeyboardInterrupt the sandbox is killed and the interrupt re-raised.
    """
    result = SandboxRun(timeout=timeout)
    if prepared.setup_error is not None or prepared.channel is None:
        error = prepared.setup_error or {"step": "prepare", "message": "no sandbox"}
        result.frames.append(protocol.Frame("setup_error", error))
        return result
    channel = prepared.channel.fileno()
    spec = prepared.spec
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)
    with contextlib.suppress(OSError):  # a larger pipe: the parent empties it rarely
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    # Everything the child needs is built here: what the child runs of
    # Python between fork and test, it pays for in copied pages.
    closing = tuple({*factory.descriptors(), *prepared.descriptors()})
    test_process = run_test(write_fd)
    signal_resets = sandbox.signals_to_reset()
    # And what the parent needs while the child lives: every page it writes
    # then is copied too, as long as the child still shares it.
    child = _Child(read_fd, channel)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    # Frozen objects are never traversed by a collection, the child's or
    # (until the child is gone) the parent's, so their pages stay shared
    # instead of being copied (fork's copy-on-write).
    gc.freeze()
    affinity = _hold_this_cpu()
    try:
        pid, born_in_cgroup = _fork_into(prepared, factory)
    except BaseException as exc:
        sandbox.restore_affinity(affinity)
        gc.unfreeze()
        os.close(read_fd)
        os.close(write_fd)
        if not isinstance(exc, kernel.SandboxSetupError):
            raise
        result.frames.append(protocol.Frame("setup_error", {"step": exc.step, "message": str(exc)}))
        return result
    if pid == 0:
        os.close(read_fd)
        sandbox.run_test_process(
            spec,
            prepared.namespaces,
            None if born_in_cgroup else prepared.cgroup,
            write_fd,
            closing,
            test_process,
            signal_resets,
            affinity,
        )
    os.close(write_fd)
    try:
        child.follow(pid)
        try:
            _collect(child, prepared, factory, result, deadline)
        finally:
            if child.pidfd >= 0:
                os.close(child.pidfd)
    except BaseException:
        result.interrupted = True
        _kill_sandbox(pid, prepared, result)
        if result.child_status is None:
            _reap(pid, result)
        raise
    finally:
        sandbox.restore_affinity(affinity)
        os.close(read_fd)
        gc.unfreeze()
        if spec.privileged:
            _return_to_own_pid_namespace(factory)
    for data in child.buffers.values():
        _decode(data, result)
    if result.test_status is None:
        exit_frame = result.first("exit")
        if exit_frame is not None:
            result.test_status = int(exit_frame["status"])
        elif spec.privileged:
            result.test_status = result.child_status
    setup_error = result.first("setup_error")
    if setup_error is not None and result.init_lost is not None:
        setup_error["message"] = f"{setup_error['message']}; {result.init_lost}"
    result.wall_seconds = time.monotonic() - started
    return result


def _init_outlived(prepared: PreparedSandbox, child_status: int | None) -> bool:
    """Whether init is still there now that pytest's child ended (before init is told).

    A child killed by SIGKILL may be one its pid namespace's end took (a
    plain user's child ends as its test process did): init kills the
    namespace's processes on its way out, and its pidfd says it exited only
    once every one of them has been reaped, so init gets a moment to finish.
    """
    return prepared.alive(_INIT_EXIT_GRACE if sandbox.killed_by_sigkill(child_status) else 0.0)


def _init_lost(prepared: PreparedSandbox, factory: SandboxFactory) -> str:
    """Why the sandbox's init is gone while the test still needed it."""
    reasons = ["the sandbox's init has exited", factory.death(prepared.factory_pid, settle=True)]
    return "; ".join(filter(None, reasons))


def _fork_into(prepared: PreparedSandbox, factory: SandboxFactory) -> tuple[int, bool]:
    """fork(); root's child is born in the sandbox's pid namespace, the parent stays in its own.

    Returns the pid and whether the child was born in the sandbox's cgroup
    (see :func:`_fork_in_cgroup`); if not, it joins the cgroup itself.
    """
    privileged = prepared.spec.privileged
    if privileged:
        kernel.setns(prepared.namespaces["pid"], kernel.CLONE_NEWPID, "pid, for the test")
    try:
        cloned = _fork_in_cgroup(prepared.cgroup)
        pid = _fork() if cloned is None else cloned
    except BaseException as exc:
        if privileged:
            _return_to_own_pid_namespace(factory)
        if isinstance(exc, OSError):
            # A pid namespace whose init has exited takes no new process: ENOMEM.
            detail = "" if prepared.alive() else _init_lost(prepared, factory)
            step = "fork the test process into the sandbox"
            raise kernel.SandboxSetupError(step, exc.errno or 0, detail) from None
        raise
    return pid, cloned is not None


def _fork_in_cgroup(cgroup: SandboxCgroup | None) -> int | None:
    """The child's pid, cloned straight into ``cgroup``; None if it cannot be.

    cgroup v2 only (its ``birth_fd``), and only while pytest has one thread
    (a pytest-xdist worker has more): see
    :func:`pytest_nsbox.kernel.fork_into_cgroup`, which saves the child's
    join a wait of up to an RCU grace period. Where
    the kernel refuses, the child is forked and joins its cgroup as under
    v1, which names any lasting refusal in the test's set-up error; where
    it has no such clone3 (before 5.7, or a seccomp filter's ENOSYS or
    EPERM), pytest stops asking for the session.
    """
    global _clone_into_cgroup_refused
    birth_fd = None if cgroup is None else cgroup.birth_fd
    if birth_fd is None or _clone_into_cgroup_refused or not kernel.single_threaded():
        return None
    try:
        return kernel.fork_into_cgroup(birth_fd)
    except OSError as exc:
        if exc.errno in _NO_CLONE_INTO_CGROUP:
            _clone_into_cgroup_refused = True
        return None


def _hold_this_cpu() -> set[int] | None:
    """Keep pytest's thread on the CPU it runs on until its test process is reaped.

    The test process is then born on that CPU, which pytest leaves to it as
    it waits, and pytest wakes after it where it ran. Left to itself, fork
    places the child on whichever CPU looks least loaded at that instant:
    often the one where the factory has just woken to build the next
    sandbox, which the test then waits for, with cold caches (see the
    README's Performance). Returns the affinity to restore, which the test
    process also restores, before anything of the test runs; None where
    one CPU is all there is.
    """
    affinity = os.sched_getaffinity(0)
    if len(affinity) < 2:
        return None
    try:
        os.sched_setaffinity(0, (kernel.current_cpu(),))
    except OSError:  # a CPU taken away meanwhile: the scheduler places the child
        return None
    return affinity


def _fork() -> int:
    """os.fork(), without Python 3.12's warning for a multi-threaded process.

    That is a pytest-xdist worker; the child never touches another thread's
    state: it runs the test and talks only through its own pipe. Before
    3.12 there is no warning, and no filters to copy in both processes.
    """
    if not _FORK_WARNS:
        return os.fork()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _return_to_own_pid_namespace(factory: SandboxFactory) -> None:
    """Point pytest's pid namespace for children back at its own.

    If that fails, every later fork of pytest would land in a sandbox: the
    session stops with the reason.
    """
    try:
        kernel.setns(factory.own_pid_namespace, kernel.CLONE_NEWPID, "pytest's own pid")
    except kernel.SandboxSetupError as exc:
        raise RuntimeError(f"nsbox: cannot go on forking tests: {exc}") from None


class _Child:
    """The test process as the parent watches it: its pidfd and the two byte streams.

    Made before the fork, with init's channel already watched, so that the
    parent only opens the child's pidfd before it sleeps in ``poll``.
    """

    def __init__(self, pipe: int, channel: int) -> None:
        self.pipe = pipe  # the test's result pipe
        self.channel = channel  # init's end of the conversation
        self.pid = 0
        self.pidfd = -1
        self.buffers = {pipe: bytearray(), channel: bytearray()}
        self.poller = select.poll()
        self.poller.register(channel, select.POLLIN)
        self.watched = {channel}

    def follow(self, pid: int) -> None:
        """Watch the forked child ``pid`` through its pidfd."""
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.poller.register(self.pidfd, select.POLLIN)
        self.watched.add(self.pidfd)


def _collect(
    child: _Child,
    prepared: PreparedSandbox,
    factory: SandboxFactory,
    result: SandboxRun,
    deadline: float | None,
) -> None:
    """Buffer both byte streams until the child is reaped and they are done, or the deadline.

    While the child lives the parent stays quiet: it sleeps on the child's
    pidfd and empties the pipe (made 1 MiB) only when the child exits or
    after ``_DRAIN_SECONDS`` without a wake-up, instead of waking for each
    report. Whatever
    the parent writes while the child lives it pays for twice: the
    copy-on-write fault, and the page copied. Bytes are only buffered
    here, decoded after.

    Then the test's pipe closes when everything the test started is gone.
    Init is asked for its report only when it has something to tell (see
    :func:`_init_has_news`); it ends when its channel closes.
    """
    poller, watched = child.poller, child.watched
    while watched:
        wait = _DRAIN_SECONDS if child.pidfd in watched else None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.timed_out = True
                _kill_sandbox(child.pid, prepared, result)
                deadline = None
                continue
            wait = remaining if wait is None else min(wait, remaining)
        ready = poller.poll(None if wait is None else max(1, int(wait * 1000)))
        if not ready and child.pidfd in watched:  # the child lives: empty its pipe now and then
            _drain(child.pipe, child.buffers[child.pipe])
        for fd, _ in ready:
            if fd not in watched:  # dropped earlier in this round (init's channel, see below)
                continue
            if fd == child.pidfd:
                _reap(child.pid, result)
                if not result.timed_out and not _init_outlived(prepared, result.child_status):
                    result.init_lost = _init_lost(prepared, factory)
                poller.unregister(child.pidfd)
                watched.discard(child.pidfd)
                poller.register(child.pipe, select.POLLIN)
                watched.add(child.pipe)
                if _init_has_news(prepared):
                    with contextlib.suppress(OSError):
                        os.write(child.channel, sandbox.FINISHED)
                elif child.channel in watched:
                    poller.unregister(child.channel)
                    watched.discard(child.channel)
            elif _read_into(fd, child.buffers[fd]):
                poller.unregister(fd)
                watched.discard(fd)
    full = sandbox.full_filesystems(prepared.spec, prepared.mounts)
    if full:
        result.frames.append(protocol.Frame("full", {"filesystems": full}))


def _init_has_news(prepared: PreparedSandbox) -> bool:
    """Whether init has something to report now that the test process is gone.

    Init stays outside the test's cgroup, so once the test process is
    reaped the cgroup holds only what the test left running, also in cgroups
    the test made below its own: any task means leftovers (or an orphan init
    has yet to reap: then init reports nothing). If init is gone there is no
    report to ask for, and its pid namespace took the rest with it.
    """
    if prepared.spec.list_writes or prepared.cgroup is None:
        return True
    return prepared.cgroup.task_count() > 0


def _drain(fd: int, buffer: bytearray) -> None:
    """Read what the pipe holds now, without waiting."""
    while True:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            return
        buffer += chunk


def _read_into(fd: int, buffer: bytearray) -> bool:
    """Append what is there to ``buffer``; True at the end of the stream."""
    try:
        chunk = os.read(fd, _READ_CHUNK)
    except ConnectionResetError:
        return True
    buffer += chunk
    return not chunk


def _decode(data: bytearray, result: SandboxRun) -> None:
    """The frames of one stream; anything else is the run's protocol error."""
    reader = protocol.FrameReader()
    try:
        result.frames.extend(reader.feed(bytes(data)))
        reader.finish()
    except protocol.ProtocolError as exc:
        if result.protocol_error is None:
            result.protocol_error = str(exc)


def _kill_sandbox(pid: int, prepared: PreparedSandbox, result: SandboxRun) -> None:
    """SIGKILL every process of the sandbox, counting the test's own first."""
    if "pid" in prepared.namespaces:
        # The test's processes: everything in its pid namespace but init.
        init = None if prepared.init_pidfd is None else pidfd_pid(prepared.init_pidfd)
        result.killed_at_timeout = count_pid_namespace(prepared.namespaces["pid"], besides=init)
    if prepared.cgroup is not None:
        prepared.cgroup.kill()
    if prepared.init_pidfd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(prepared.init_pidfd, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def count_pid_namespace(namespace_fd: int, besides: int | None = None) -> int:
    """How many processes live in the pid namespace that ``namespace_fd`` refers to.

    ``besides``: a pid not to count (init's: a plain user may not even read
    its /proc entry, as it is not dumpable).
    """
    target = os.fstat(namespace_fd)
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(besides):
            try:
                found = os.stat(f"/proc/{entry}/ns/pid")
            except OSError:
                continue
            if (found.st_ino, found.st_dev) == (target.st_ino, target.st_dev):
                count += 1
    return count


def pidfd_pid(pidfd: int) -> int | None:
    """The pid a pidfd refers to, from its fdinfo; None once that process has been reaped."""
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                return pid if pid > 0 else None
    return None


def _reap(pid: int, result: SandboxRun) -> None:
    while True:
        try:
            _, status, usage = os.wait4(pid, 0)
            break
        except InterruptedError:
            continue
    result.child_status = status
    # wait4 counts the child and every descendant it reaped.
    result.cpu_seconds = usage.ru_utime + usage.ru_stime
    result.max_rss = usage.ru_maxrss * 1024
