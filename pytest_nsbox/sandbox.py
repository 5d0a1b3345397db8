"""The sandbox, from inside: one readable sequence of steps per process.

A sandbox is built ahead of its test by the sandbox factory
(:mod:`pytest_nsbox.factory`), a small process, so that the pytest process
is forked once per test instead of once per sandbox process::

    factory ── init (pid 1)                   built while the previous test runs
    pytest ─────────── test (pid 2) ── whatever the test starts
                       (joins init's namespaces with setns)

* **the factory** (root) unshares the new namespaces (mnt, pid, net, uts,
  ipc) itself, forks init into them and returns to its own with ``setns``
  (:func:`start_privileged`). A plain user cannot leave a user namespace,
  so its factory forks an **outer** process (:func:`run_outer`) that
  unshares a new user namespace with the others and forks init;
* **init** is pid 1 of the new pid namespace: it builds the file system view
  and the network and makes the test's cgroup, which it stays outside of
  (its own work is not the test's, in the limits or the figures). Last it
  unshares the *lock namespace*, one
  more user and mount namespace (a copy of every mount it made), whose id
  maps the process that forked it writes. Every mount seen from there came
  from a more privileged mount namespace, so the kernel locks them: even as
  root the test cannot unmount the overlay or the private ``/proc`` to
  reach what is beneath, nor clear a read-only flag. Init then makes itself
  non-dumpable (the test shares its user namespace and must not reach its
  descriptors) and sends the pytest process a descriptor of each namespace.
  It reaps orphans while the test runs; when pytest asks (something is left
  in the cgroup, or the writes are listed) it lists and kills whatever the
  test left running and reports what only it can see;
* **test** is forked from pytest into init's pid namespace (pytest points
  its pid namespace for children there for the one ``fork``; a plain user
  cannot, so a first fork joins the user and pid namespaces and forks the
  test), joins the cgroup (under v2 it is born there), joins init's
  namespaces with ``setns``, unshares a cgroup namespace of its own, rooted
  at the test's cgroup, joins the lock namespace last, and runs the test;
  as a plain user it then drops the
  capabilities that namespace granted, and runs with none, as on the host.

Each step raises :class:`~pytest_nsbox.kernel.SandboxSetupError`; it reaches
the parent as a ``setup_error`` frame naming the step.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # see signals_to_reset
import contextlib
import errno
import gc
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from pytest_nsbox import filesystem, kernel, network, protocol, writes

if TYPE_CHECKING:
    from pytest_nsbox.cgroups import SandboxCgroup

EXIT_SETUP_FAILED = 120
EXIT_TEST_RUNNER_FAILED = 121

_MAP_ALL_IDS = "0 0 4294967295"
_FULL_MARGIN = 64 * 1024  # a tmpfs with less free space than this counts as full
_CMDLINE_TRIES = 20  # reads of an empty /proc/PID/cmdline, 1 ms apart (see _command_line)

#: The namespaces of init's the test joins with setns, in order, by the name /proc/PID/ns
#: gives them. ``outer_user`` (a plain user's only) comes before them: it grants the rights to
#: join the others. Then the test unshares a cgroup namespace of its own (owned, as init's are,
#: by the user namespace it is in then) and joins the lock namespace, :data:`LOCK_NAMESPACES`.
SHARED_NAMESPACES = (
    ("net", kernel.CLONE_NEWNET),
    ("uts", kernel.CLONE_NEWUTS),
    ("ipc", kernel.CLONE_NEWIPC),
)
#: The lock namespace (see :func:`_make_lock_namespace`), joined last.
LOCK_NAMESPACES = (
    ("user", kernel.CLONE_NEWUSER),
    ("mnt", kernel.CLONE_NEWNS),
)
FINISHED = b"f"  # pytest to init: the test process has exited


class TestProcess(Protocol):
    """What the sandbox's test process runs, in two steps."""

    def prepare(self) -> None:
        """Runs with the capabilities of the test's own namespaces, before they are dropped."""

    def run(self) -> None:
        """Runs the test."""


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a sandbox is built from, computed in the parent.

    Two specs that compare equal build the same sandbox: a sandbox prepared
    for the next test is used only if the spec computed when that test runs
    is equal to the one it was built from.
    """

    namespaces: int
    privileged: bool
    uid: int
    gid: int
    hostname: str | None
    cwd: str
    filesystem: filesystem.FilesystemPlan
    loopback_request: bytes | None
    list_writes: bool


def base_namespaces(network_isolated: bool, privileged: bool) -> int:
    """The CLONE_NEW* flags init is forked into (it unshares the lock namespace itself)."""
    flags = kernel.CLONE_NEWNS | kernel.CLONE_NEWPID | kernel.CLONE_NEWUTS | kernel.CLONE_NEWIPC
    if network_isolated:
        flags |= kernel.CLONE_NEWNET
    if not privileged:
        flags |= kernel.CLONE_NEWUSER
    return flags


# -- in the factory: the sandbox's creator and init ---------------------------


@dataclass(frozen=True)
class HomeNamespaces:
    """The root factory's own namespaces, to return to after each sandbox it starts.

    Root needs no process between the factory and init: the factory
    unshares the sandbox's namespaces itself, forks init into them (the
    first process of the new pid namespace is its pid 1) and goes back to
    these with ``setns``. A plain user cannot: a user namespace cannot be
    left, so its factory forks an outer process for that (:func:`run_outer`).
    """

    proc: int  # the host's /proc, to write the lock namespace's id maps
    namespaces: tuple[tuple[int, int, str], ...]  # (fd, CLONE_NEW*, name)

    @classmethod
    def open(cls) -> HomeNamespaces | None:
        """The factory's own namespaces; None where it could not come back to them.

        Root of a user namespace that does not own them (some containers)
        lacks the CAP_SYS_ADMIN over their owner that ``setns`` needs: a
        ``setns`` into the namespace one is already in checks exactly that.
        Such a factory forks an outer process per sandbox, as a plain user's.
        """
        own = tuple(
            (_open_namespace(f"/proc/self/ns/{name}"), nstype, name)
            for name, nstype in (
                ("mnt", kernel.CLONE_NEWNS),
                ("net", kernel.CLONE_NEWNET),
                ("uts", kernel.CLONE_NEWUTS),
                ("ipc", kernel.CLONE_NEWIPC),
                ("pid", kernel.CLONE_NEWPID),  # for children: init's pid namespace was theirs
            )
        )
        home = cls(filesystem.open_path("/proc"), own)
        try:
            home.enter()
        except kernel.SandboxSetupError:
            for fd in home.descriptors():
                os.close(fd)
            return None
        return home

    def descriptors(self) -> tuple[int, ...]:
        return (self.proc, *(fd for fd, _, _ in self.namespaces))

    def enter(self) -> None:
        """Back to the factory's own namespaces; failing, the factory cannot go on."""
        for fd, nstype, name in self.namespaces:
            kernel.setns(fd, nstype, f"the factory's own {name} namespace")


def start_privileged(
    spec: SandboxSpec,
    cgroup: SandboxCgroup | None,
    channel_fd: int,
    home: HomeNamespaces,
    factory_fds: tuple[int, ...],
) -> int | None:
    """Root, in the factory: unshare the sandbox's namespaces, fork init into them, go home.

    Returns init's pid, None if there is no init. A failure to build the
    sandbox reaches pytest as its setup error; a failure to return home
    raises, and the factory ends. Init closes ``factory_fds`` (the
    factory's own) and ``home``'s descriptors first.
    """
    try:
        kernel.unshare(spec.namespaces)
    except kernel.SandboxSetupError as exc:
        _report_setup_error(channel_fd, exc)
        return None
    try:
        init_pid, lock = _fork_init(spec, cgroup, channel_fd, (*factory_fds, *home.descriptors()))
    except kernel.SandboxSetupError as exc:
        _report_setup_error(channel_fd, exc)
        return None
    finally:
        home.enter()
    _answer_lock_request(lock, init_pid, _lock_id_maps(spec), home.proc)
    return init_pid


def run_outer(
    spec: SandboxSpec, cgroup: SandboxCgroup | None, channel_fd: int, factory_pid: int
) -> NoReturn:
    """The outer process, right after fork in the factory. Never returns.

    For a plain user's factory (or root's that could not return to its own
    namespaces, see :class:`HomeNamespaces`): it enters the new namespaces
    (a plain user's with a user namespace), forks init into them, writes the
    id maps of init's lock namespace when init asks (its user namespace is
    that one's parent) and waits for init.
    """
    try:
        gc.disable()  # as in init
        _die_with_parent(factory_pid)
        kernel.set_process_name("nsbox-outer")
        kernel.unshare(spec.namespaces)
        if spec.namespaces & kernel.CLONE_NEWUSER:
            _write_id_maps("self", *_own_id_maps(spec), deny_setgroups=True)
        # Init mounts its own /proc on the /proc it shares with outer.
        host_proc = filesystem.open_path("/proc")
        init_pid, lock = _fork_init(spec, cgroup, channel_fd, (host_proc,))
        os.close(channel_fd)
        _answer_lock_request(lock, init_pid, _lock_id_maps(spec), host_proc)
        os.close(host_proc)
        status = _wait_for(init_pid)
    except BaseException as exc:
        _report_setup_error(channel_fd, exc)
        os._exit(EXIT_SETUP_FAILED)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


@dataclass(frozen=True)
class _LockRequest:
    """Init's line to the process that forked it, which writes the lock namespace's id maps."""

    ask: int  # init writes b"l" here once it unshared the lock namespace
    done: int  # answered b"u" once the maps are written, or the errno


def _fork_init(
    spec: SandboxSpec, cgroup: SandboxCgroup | None, channel_fd: int, parents_fds: tuple[int, ...]
) -> tuple[int, _LockRequest]:
    """Fork init into the namespaces just entered; the parent keeps the lock request's ends.

    Init closes ``parents_fds`` first: it keeps only its channel to pytest.
    """
    ask_r, ask_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    try:
        init_pid = os.fork()
    except OSError as exc:
        for fd in (ask_r, ask_w, done_r, done_w):
            os.close(fd)
        raise kernel.SandboxSetupError("fork the sandbox's init", exc.errno or 0) from None
    if init_pid == 0:
        for fd in (ask_r, done_w, *parents_fds):
            os.close(fd)
        _run_init(spec, cgroup, channel_fd, _LockRequest(ask_w, done_r))
    os.close(ask_w)
    os.close(done_r)
    return init_pid, _LockRequest(ask_r, done_w)


def _answer_lock_request(
    lock: _LockRequest, init_pid: int, id_maps: tuple[str, str], proc_fd: int
) -> None:
    """When init asks, write its lock namespace's id maps through ``proc_fd``, and answer.

    Init gone before it asked (its set-up failed) closes the request unasked.
    """
    try:
        if os.read(lock.ask, 1) != b"l":
            return
        try:
            _write_id_maps(str(init_pid), *id_maps, deny_setgroups=False, proc_fd=proc_fd)
            reply = b"u"
        except kernel.SandboxSetupError as exc:
            reply = str(exc.errno).encode()
        with contextlib.suppress(BrokenPipeError):
            os.write(lock.done, reply)
    finally:
        os.close(lock.ask)
        os.close(lock.done)


def _run_init(
    spec: SandboxSpec, cgroup: SandboxCgroup | None, channel_fd: int, lock: _LockRequest
) -> NoReturn:
    """Init, pid 1 of the sandbox: build it, hand it over, clean up after the test."""
    try:
        # Init allocates little: a collection would only touch (and so
        # copy) the factory's pages.
        gc.disable()
        _die_with_parent(0)  # its parent is outside the pid namespace: getppid() is 0
        kernel.set_process_name("nsbox-init")
        scratch_fd, lower_fd = filesystem.set_up(spec.filesystem)
        if spec.hostname is not None:
            kernel.sethostname(spec.hostname)
        if spec.loopback_request is not None:
            network.bring_loopback_up(spec.loopback_request)
        counters: list[int] = []
        if cgroup is not None:
            # Made here, off the pytest process's path, and never joined:
            # init's work (its set-up, reaping, listing what is left) is
            # not the test's to pay for under its limits, and under v2 a
            # join can wait for an RCU grace period (see the README).
            cgroup.make()
            counters = cgroup.open_counters()
        namespaces = {name: _open_namespace(f"/proc/self/ns/{name}") for name in _own(spec)}
        if not spec.privileged:
            namespaces["outer_user"] = _open_namespace("/proc/self/ns/user")
        namespaces.update(_make_lock_namespace(lock))
        # Init lives in the lock namespace too, beside the test, and holds
        # what the test must not reach (the repository beneath the overlay,
        # the channel to pytest): not dumpable, its /proc files and ptrace
        # need CAP_SYS_PTRACE where its interpreter started, the host's.
        kernel.prctl(kernel.PR_SET_DUMPABLE, 0)
        mounts = {"scratch": scratch_fd}
        if spec.filesystem.private_tmp:
            mounts["tmp"] = filesystem.open_path("/tmp")
        pidfd = os.pidfd_open(os.getpid())
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        wakeup = _wake_on_sigchld()
        names, mount_names = sorted(namespaces), sorted(mounts)
        fds = [namespaces[n] for n in names] + [mounts[n] for n in mount_names]
        fds += [*counters, pidfd]
        body = {"namespaces": names, "mounts": mount_names, "counters": len(counters)}
        channel = socket.socket(fileno=channel_fd)  # kept: collecting it would close the fd
        socket.send_fds(channel, [protocol.encode("ready", body)], fds)
        for fd in fds:
            if fd != scratch_fd:
                os.close(fd)
    except BaseException as exc:
        _report_setup_error(channel_fd, exc)
        os._exit(EXIT_SETUP_FAILED)
    try:
        if _reap_until_finished(channel_fd, wakeup):
            left = _kill_leftovers()
            if left:
                protocol.send(channel_fd, "left_running", {"processes": left})
            if spec.list_writes:
                protocol.send(channel_fd, "writes", writes.list_changes(scratch_fd, lower_fd))
            if cgroup is not None:
                _stay_until_released(channel)
        else:
            _kill_leftovers()
    except BaseException:
        traceback.print_exc()
    os._exit(0)


def _own(spec: SandboxSpec) -> list[str]:
    """The namespaces of init's that the test joins (not the host's network)."""
    names = ["pid", "uts", "ipc"]
    if spec.namespaces & kernel.CLONE_NEWNET:
        names.append("net")
    return names


def _open_namespace(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel.SandboxSetupError(f"open {path}", exc.errno or 0) from None


def _make_lock_namespace(lock: _LockRequest) -> dict[str, int]:
    """Unshare the lock namespace, have its id maps written, and open it.

    Init enters it last, once every mount is made: a copy of them all,
    owned by a user namespace below the one that made them, so each is
    locked. The descriptors keep the namespaces alive for the test to join.
    """
    step = "lock namespace: unshare(user+mnt)"
    try:
        kernel.unshare(kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS)
        step = "lock namespace: write its id maps"
        os.write(lock.ask, b"l")
        reply = os.read(lock.done, 16)
    except BrokenPipeError:
        reply = b""
    finally:
        os.close(lock.ask)
        os.close(lock.done)
    if not reply:
        raise kernel.SandboxSetupError(step, errno.ESRCH, "the process that forked init has exited")
    if reply != b"u":
        raise kernel.SandboxSetupError(step, int(reply))
    return {
        "user": _open_namespace("/proc/self/ns/user"),
        "mnt": _open_namespace("/proc/self/ns/mnt"),
    }


def _wake_on_sigchld() -> int:
    """A pipe that becomes readable when a child exits, to poll beside the channel."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    return wake_r


def _reap_until_finished(channel_fd: int, wakeup: int) -> bool:
    """As pid 1: reap orphans (they are re-parented here) until pytest says the test ended.

    True once pytest said so; False if the channel closed first (pytest
    discarded this sandbox, or died).
    """
    poller = select.poll()
    poller.register(channel_fd, select.POLLIN)
    poller.register(wakeup, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wakeup:
                with contextlib.suppress(BlockingIOError):
                    os.read(wakeup, 4096)
                reap_exited()
            else:
                try:
                    return os.read(channel_fd, 1) == FINISHED
                except ConnectionResetError:  # closed with "ready" unread: discarded
                    return False


def _stay_until_released(channel: socket.socket) -> None:
    """End the report (pytest reads it to its end), and exit only once pytest lets go.

    pytest reads the test's cgroup counters after the report, and the
    factory removes the cgroup as soon as init has exited.
    """
    with contextlib.suppress(OSError):
        channel.shutdown(socket.SHUT_WR)
        while channel.recv(4096):
            pass


def reap_exited(*, wait_for_all: bool = False) -> list[int]:
    """Reap every child that has exited (``wait_for_all``: every child, waiting); their pids."""
    reaped: list[int] = []
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if wait_for_all else os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)


# -- in the pytest process's child: the test ---------------------------------


def run_test_process(
    spec: SandboxSpec,
    namespaces: Mapping[str, int],
    cgroup: SandboxCgroup | None,
    result_fd: int,
    inherited: tuple[int, ...],
    run_test: TestProcess,
    signal_resets: tuple[tuple[int, Any], ...],
    affinity: set[int] | None,
) -> NoReturn:
    """The pytest process's child: join the prepared sandbox and run the test. Never returns.

    Root's child is already in the sandbox's pid namespace (see
    :func:`pytest_nsbox.runner.run`). A plain user's joins init's user
    namespace, which grants the right to join its pid namespace, and forks
    the test process there; it waits for the test and sends its exit status.
    ``inherited`` are the parent's descriptors of the sandbox: closed before
    the test runs; ``signal_resets`` are the handlers the test gets back
    (see :func:`signals_to_reset`), ``affinity`` the CPUs it gets back
    (pytest held to one CPU for the fork; None if it did not).

    pytest's child needs no parent-death signal of its own: pytest's death
    ends the factory (its parent-death signal), the factory's ends init
    (init's own, or outer's first), and init's ends every process in its
    pid namespace, the test among them. Root's child thus makes no ctypes
    call on Python 3.12+, where ``setns`` is in ``os``.
    """
    try:
        if cgroup is not None:
            cgroup.attach_self()
        if not spec.privileged:
            kernel.setns(namespaces["outer_user"], kernel.CLONE_NEWUSER, "outer user namespace")
            kernel.setns(namespaces["pid"], kernel.CLONE_NEWPID, "pid")
            try:
                test_pid = os.fork()
            except OSError as exc:  # ENOMEM: the pid namespace lost its init
                raise kernel.SandboxSetupError(
                    "fork the test process into the sandbox", exc.errno or 0
                ) from None
            if test_pid != 0:
                _wait_and_send_status(test_pid, result_fd)
            kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent is outside the pid namespace (getppid() is 0); init's
        # number means it already died.
        if os.getppid() != 0:
            os._exit(EXIT_SETUP_FAILED)
        for name, nstype in SHARED_NAMESPACES:
            if name in namespaces:
                kernel.setns(namespaces[name], nstype, name)
        kernel.unshare(kernel.CLONE_NEWCGROUP)  # rooted at the test's cgroup, which it is in
        for name, nstype in LOCK_NAMESPACES:
            kernel.setns(namespaces[name], nstype, name)
        for fd in inherited:
            os.close(fd)
        os.chdir(spec.cwd)  # enter the cwd through the overlay
        restore_affinity(affinity)
        run_test.prepare()
        if not spec.privileged:
            kernel.drop_capabilities()
        _be_the_oom_killers_choice()
        for signum, handler in signal_resets:
            signal.signal(signum, handler)
    except BaseException as exc:
        _report_setup_error(result_fd, exc)
        os._exit(EXIT_SETUP_FAILED)
    try:
        run_test.run()
    except BaseException:
        traceback.print_exc()
        _flush_std()
        os._exit(EXIT_TEST_RUNNER_FAILED)
    _flush_std()
    os._exit(0)


def restore_affinity(affinity: set[int] | None) -> None:
    """Let the calling thread run on ``affinity`` again, or on every CPU its cpuset allows.

    ``affinity`` is what pytest's thread had before it held its CPU for a
    fork (see :func:`pytest_nsbox.runner.run`); None if it did not hold one.
    Setting the old set fails only if none of its CPUs is left to the
    process (a cpuset changed meanwhile); then every CPU is asked for and
    the kernel keeps those the cpuset allows, rather than leave the thread
    on one CPU.
    """
    if affinity is None:
        return
    try:
        os.sched_setaffinity(0, affinity)
    except OSError:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


def signals_to_reset() -> tuple[tuple[int, Any], ...]:
    """The handlers a test must get back: Ctrl-C raises KeyboardInterrupt, SIGTERM ends it.

    Asked in the parent before each fork (a conftest, a plugin or a test run
    inline may have changed them), so the child calls ``signal.signal`` only
    when needed: in the child, its first call costs about 0.2 ms of enum
    conversions and copy-on-write faults. The parent asks ``_signal``, the C
    module behind ``signal``, whose handlers are plain ints and callables:
    ``signal.getsignal``'s conversion of 0 to ``Handlers.SIG_DFL`` touches
    enough of the enum machinery to cost the parent about 30 page faults per
    test after each fork.
    """
    wanted = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
    return tuple(
        (signum, handler) for signum, handler in wanted if _signal.getsignal(signum) != handler
    )


def killed_by_sigkill(status: int | None) -> bool:
    """Whether the wait status ``status`` is that of a process SIGKILL ended."""
    return status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _wait_and_send_status(test_pid: int, result_fd: int) -> NoReturn:
    """A plain user's first child: report the test process's wait status, then exit.

    A test process killed by SIGKILL is killed here too: pytest sees this
    process's wait status before it reads the pipe, and a SIGKILL may be the
    end of the sandbox's pid namespace, whose init is then still exiting
    (see :func:`pytest_nsbox.runner._init_outlived`), as it is for root's
    child, which is the test process.
    """
    status = 0
    try:
        status = _wait_for(test_pid)
        protocol.send(result_fd, "exit", {"status": status})
    finally:
        if killed_by_sigkill(status):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)


def full_filesystems(spec: SandboxSpec, mounts: Mapping[str, int]) -> list[dict[str, object]]:
    """The sandbox's size-limited tmpfs mounts that the test filled up.

    ``mounts`` are the descriptors init sent: the scratch tmpfs (the repo's
    upper layer) and the private ``/tmp``; fstatvfs works on them from any
    mount namespace.
    """
    found = []
    for name, fd in sorted(mounts.items()):
        st = os.fstatvfs(fd)
        if st.f_bavail * st.f_frsize < _FULL_MARGIN:
            path = "/tmp" if name == "tmp" else f"{spec.filesystem.rootdir} (writes to the repo)"
            found.append({"path": path, "size": st.f_blocks * st.f_frsize})
    return found


def _kill_leftovers() -> list[list[object]]:
    """List the processes still running besides pid 1, kill them all, reap everything."""
    left: list[list[object]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == "1":
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    continue  # exited, only not reaped yet: not left running
            with open(f"/proc/{entry}/comm") as comm:
                name = comm.read().strip()
            cmdline = _command_line(entry)
        except OSError:
            continue  # it exited meanwhile
        left.append([int(entry), name, cmdline])
    if left:
        # From pid 1, -1 means every other process of the namespace.
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    reap_exited(wait_for_all=True)
    return sorted(left)


def _command_line(pid: str) -> str:
    """/proc/PID/cmdline, read again for a moment while it is empty.

    A process caught in ``execve`` already has its new name but not yet
    its arguments (the kernel sets them last), and ``subprocess.Popen``
    returns in that window: a test that ends right after it would leave a
    ``sleep`` listed without its ``30``. A process that stays without
    arguments (one that cleared them) costs the wait once, and only when
    something was left running.
    """
    for _ in range(_CMDLINE_TRIES):
        with open(f"/proc/{pid}/cmdline", "rb") as cmd:
            cmdline = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
        if cmdline:
            return cmdline
        time.sleep(0.001)
    return ""


def _wait_for(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (and if it already has)."""
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(EXIT_SETUP_FAILED)


def _lock_id_maps(spec: SandboxSpec) -> tuple[str, str]:
    """The lock namespace's id maps: all ids for root, the user's own otherwise."""
    return (_MAP_ALL_IDS, _MAP_ALL_IDS) if spec.privileged else _own_id_maps(spec)


def _own_id_maps(spec: SandboxSpec) -> tuple[str, str]:
    """The uid and gid maps of a plain user's namespaces: the user's own ids, to themselves."""
    return f"{spec.uid} {spec.uid} 1", f"{spec.gid} {spec.gid} 1"


def _write_id_maps(
    pid: str, uid_map: str, gid_map: str, *, deny_setgroups: bool, proc_fd: int | None = None
) -> None:
    """Write /proc/PID's id maps; ``proc_fd``: through that /proc, not the one mounted here.

    (Relative to it: ``/proc/self`` may already be a /proc of another pid
    namespace, where this process has no number.)
    """
    names = ("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)
    for name, data in names if deny_setgroups else names[1:]:
        path = f"/proc/{pid}/{name}"
        if proc_fd is None:
            kernel.write_file(path, data)
        else:
            kernel.write_file(f"{pid}/{name}", data, dir_fd=proc_fd, shown=f"{path} (the host's)")


def spare_from_oom_killer() -> None:
    """Root's factory, and so every init it forks: never the OOM killer's choice."""
    # Lowering it needs CAP_SYS_RESOURCE, which root in a container may lack.
    with contextlib.suppress(kernel.SandboxSetupError):
        kernel.write_file("/proc/self/oom_score_adj", "-1000")


def _be_the_oom_killers_choice() -> None:
    """The test process, not the sandbox's own processes, is the one the OOM killer takes.

    Raising one's own score needs no privilege. Written with constants
    only: in the test process, between fork and test, each object touched
    costs copied pages.
    """
    try:
        fd = os.open(b"/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass  # not worth failing the test for: the sandbox's own are spared anyway


def _report_setup_error(result_fd: int, exc: BaseException) -> None:
    step = getattr(exc, "step", type(exc).__name__)
    with contextlib.suppress(OSError):
        protocol.send(result_fd, "setup_error", {"step": step, "message": str(exc) or repr(exc)})


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def interpreter_paths() -> tuple[str, ...]:
    """What the test's Python needs to keep working: its prefixes and import path."""
    return _interpreter_paths(tuple(sys.path))


@lru_cache(maxsize=8)
def _interpreter_paths(import_path: tuple[str, ...]) -> tuple[str, ...]:
    """Resolved once per ``sys.path`` (realpath costs a stat per path component)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.update(p for p in import_path if p)
    return tuple(sorted(os.path.realpath(p) for p in paths if os.path.exists(p)))


def build_spec(
    *,
    rootdir: str,
    cwd: str,
    privileged: bool,
    isolate_network: bool,
    hostname: str | None,
    private_tmp: bool,
    tmp_size: int,
    passthrough: tuple[str, ...],
    list_writes: bool,
) -> SandboxSpec:
    """The sandbox for one test, from settings already validated."""
    return SandboxSpec(
        namespaces=base_namespaces(isolate_network, privileged),
        privileged=privileged,
        uid=os.getuid(),
        gid=os.getgid(),
        hostname=hostname,
        cwd=cwd,
        filesystem=filesystem.plan(
            rootdir=rootdir,
            privileged=privileged,
            private_tmp=private_tmp,
            tmp_size=tmp_size,
            upper_size=tmp_size,
            passthrough=passthrough,
            interpreter=interpreter_paths(),
        ),
        loopback_request=network.loopback_up_request() if isolate_network else None,
        list_writes=list_writes,
    )
