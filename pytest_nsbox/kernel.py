"""The Linux calls the sandbox is built from, each behind one small function.

Python's ``os`` module lacks most of them (``mount``, ``sethostname``,
``capset``; ``unshare`` and ``setns`` before 3.12), so they go through libc
with ctypes. Where ``os`` has one it is used: the test process joins its
sandbox with ``setns`` between fork and test, where a ctypes call's first
use copies pages of the ctypes machinery that ``os.setns`` never touches.
Every wrapper raises :class:`SandboxSetupError`, which names the step, the
path and the errno, so a failed set-up reads like bubblewrap's messages:
``mount overlay on /repo failed: EINVAL (Invalid argument)``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from typing import Any, NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_RELATIME = 0x200000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _function(name: str, *argtypes: Any) -> Any:
    """A libc function, looked up and typed once, here.

    The test process calls some of them between fork and test, where every
    object Python creates or first looks up costs copied pages: with argtypes
    set, ints and bytes go to C without a ctypes object each.
    """
    function = getattr(_libc, name)
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_mount = _function(
    "mount", ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
)
_umount2 = _function("umount2", ctypes.c_char_p, ctypes.c_int)
_sethostname = _function("sethostname", ctypes.c_char_p, ctypes.c_size_t)
_prctl = _function(
    "prctl", ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong
)
_sched_getcpu = _function("sched_getcpu")


class StepError(OSError):
    """A step failed; the message names the step, the path and the errno.

    ``mount overlay on /repo failed: EINVAL (Invalid argument)``.
    """

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        name = errno.errorcode.get(err, f"errno {err}")
        message = f"{step} failed: {name} ({os.strerror(err)})"
        if detail:
            message += f"; {detail}"
        super().__init__(err, message)
        self.step = step
        self.detail = detail

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[StepError], tuple[str, int, str]]:
        # The default would rebuild from (errno, message) and lose the step.
        return type(self), (self.step, self.errno or errno.EIO, self.detail)


class SandboxSetupError(StepError):
    """A step of the sandbox's set-up failed."""


def _fail(step: str) -> NoReturn:
    """Raise for the libc call that just failed (the message is built only now)."""
    raise SandboxSetupError(step, ctypes.get_errno())


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


if sys.version_info >= (3, 12):

    def unshare(flags: int) -> None:
        """unshare(2): enter new namespaces (the calling process only)."""
        try:
            os.unshare(flags)
        except OSError as exc:
            step = f"unshare({describe_clone_flags(flags)})"
            raise SandboxSetupError(step, exc.errno or errno.EIO) from None

    def setns(fd: int, nstype: int, what: str) -> None:
        """setns(2): join the namespace ``fd`` refers to (``what`` names it in the error)."""
        try:
            os.setns(fd, nstype)
        except OSError as exc:
            raise SandboxSetupError(f"setns({what})", exc.errno or errno.EIO) from None

else:
    _unshare = _function("unshare", ctypes.c_int)
    _setns = _function("setns", ctypes.c_int, ctypes.c_int)

    def unshare(flags: int) -> None:
        """unshare(2): enter new namespaces (the calling process only)."""
        if _unshare(flags) < 0:
            _fail(f"unshare({describe_clone_flags(flags)})")

    def setns(fd: int, nstype: int, what: str) -> None:
        """setns(2): join the namespace ``fd`` refers to (``what`` names it in the error)."""
        if _setns(fd, nstype) < 0:
            _fail(f"setns({what})")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2), with the file system type and target in the error."""
    what = fstype or ("bind" if flags & MS_BIND else "propagation")
    if _mount(_b(source), _b(target), _b(fstype), flags, _b(data)) < 0:
        _fail(f"mount {what} on {target}")


def umount2(target: str, flags: int) -> None:
    """umount2(2)."""
    if _umount2(_b(target), flags) < 0:
        _fail(f"umount {target}")


def sethostname(name: str) -> None:
    """sethostname(2) in the current UTS namespace."""
    raw = name.encode()
    if _sethostname(raw, len(raw)) < 0:
        _fail(f"sethostname {name!r}")


def prctl(option: int, arg: int) -> None:
    """prctl(2) with one argument."""
    if _prctl(option, arg, 0, 0, 0) < 0:
        _fail(f"prctl({option})")


def current_cpu() -> int:
    """sched_getcpu(3): the CPU the calling thread runs on now (glibc reads it from rseq)."""
    cpu = _sched_getcpu()
    if cpu < 0:
        _fail("sched_getcpu")
    return int(cpu)


# -- fork straight into a cgroup2 cgroup --------------------------------------

CLONE_INTO_CGROUP = 0x200000000
_SYS_CLONE3 = 435  # the same number on every architecture (added after they were unified)


class _CloneArgs(ctypes.Structure):
    """struct clone_args up to its ``cgroup`` field (CLONE_ARGS_SIZE_VER2, Linux 5.7)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


# Called with the GIL held (PyDLL), as os.fork calls fork(): the interpreter's
# own fork hooks run on each side, and no other thread can run Python meanwhile.
_syscall_holding_gil = ctypes.PyDLL(None, use_errno=True).syscall
_syscall_holding_gil.restype = ctypes.c_long
_syscall_holding_gil.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t]
_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_fork_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
_after_fork_child = ctypes.pythonapi.PyOS_AfterFork_Child
for _hook in (_before_fork, _after_fork_parent, _after_fork_child):
    _hook.argtypes, _hook.restype = [], None
_pthread_sigmask = _function("pthread_sigmask", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_SIG_BLOCK, _SIG_SETMASK = 0, 2
_SIGSET_BYTES = 128
_EVERY_SIGNAL = ctypes.create_string_buffer(_SIGSET_BYTES)
_libc.sigfillset(_EVERY_SIGNAL)


def fork_into_cgroup(cgroup_fd: int) -> int:
    """os.fork(), with the child born in the cgroup2 directory ``cgroup_fd`` (clone3).

    Moving a process afterwards (a write to ``cgroup.procs``) takes a lock
    that every fork on the machine takes too; its first write after a quiet
    moment waits for an RCU grace period, several ms. A child cloned with
    ``CLONE_INTO_CGROUP`` never moves. Only for a single-threaded process:
    this is the raw system call, without the C library's fork handlers,
    which another thread's held locks would need. The interpreter's hooks
    run as in os.fork (``os.register_at_fork`` callbacks included), with
    every signal blocked across, so that a signal's Python handler cannot
    run in the child before its hooks have cleared what the parent had
    pending. Raises OSError in the parent (no child) where clone3 or
    CLONE_INTO_CGROUP is missing (ENOSYS, E2BIG; ENOSYS or EPERM under a
    seccomp filter) or the cgroup refuses the process.
    """
    args = _CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
    old_mask = ctypes.create_string_buffer(_SIGSET_BYTES)
    sys.audit("os.fork")
    failed = _pthread_sigmask(_SIG_BLOCK, _EVERY_SIGNAL, old_mask)
    if failed:  # pthread_sigmask returns the error number; errno is left alone
        raise SandboxSetupError("pthread_sigmask (block every signal)", failed)
    _before_fork()
    pid = _syscall_holding_gil(_SYS_CLONE3, ctypes.addressof(args), ctypes.sizeof(args))
    if pid == 0:
        _after_fork_child()
        _pthread_sigmask(_SIG_SETMASK, old_mask, None)
        return 0
    err = ctypes.get_errno()
    _after_fork_parent()
    _pthread_sigmask(_SIG_SETMASK, old_mask, None)
    if pid < 0:
        raise OSError(err, f"clone3(CLONE_INTO_CGROUP): {os.strerror(err)}")
    return int(pid)


def single_threaded() -> bool:
    """Whether this process has one thread (``/proc/self/task`` links 2 + its threads)."""
    return os.stat("/proc/self/task").st_nlink == 3


def set_process_name(name: str) -> None:
    """Name this process in ps and /proc/PID/comm (which keeps 15 bytes)."""
    write_file("/proc/self/comm", name[:15])


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> None:
    """capset(2) with empty sets: the process keeps no capability at all.

    A plain user who enters a user namespace gets every capability inside it;
    dropping them makes permission checks (a ``chmod 000`` file, "am I root")
    behave as they do on the host.
    """
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), ctypes.byref(data)) < 0:
        _fail("capset (drop all)")


_FLAG_NAMES = (
    (CLONE_NEWUSER, "user"),
    (CLONE_NEWNS, "mnt"),
    (CLONE_NEWPID, "pid"),
    (CLONE_NEWNET, "net"),
    (CLONE_NEWUTS, "uts"),
    (CLONE_NEWIPC, "ipc"),
    (CLONE_NEWCGROUP, "cgroup"),
)


def describe_clone_flags(flags: int) -> str:
    """``user+mnt+pid`` for a set of CLONE_NEW* flags."""
    return "+".join(name for flag, name in _FLAG_NAMES if flags & flag)


def write_file(path: str, data: str, *, dir_fd: int | None = None, shown: str = "") -> None:
    """Write a small proc/sys file in one write(2), naming it on failure.

    With ``dir_fd``, ``path`` is relative to that directory and messages
    name the file ``shown``.
    """
    shown = shown or path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise SandboxSetupError(f"open {shown}", exc.errno or errno.EIO) from None
    try:
        os.write(fd, data.encode())
    except OSError as exc:
        raise SandboxSetupError(
            f"write {data.strip()!r} to {shown}", exc.errno or errno.EIO
        ) from None
    finally:
        os.close(fd)
