"""The raw floor: the sandbox's system calls from a minimal Python process.

Run as ``python -I -S rawfloor.py ...`` by ``benchmarks/run.py``: it imports
only the standard library (argparse, ctypes, errno, fcntl, json, os, select,
signal, socket, struct, sys, time), so its processes are a few MB and every
figure is close to what the kernel itself costs.

It plays the two long-lived processes of the engine: this process stands in
for pytest, and a *factory* forked from it at start (before ``--ballast-mb``
pads this process to pytest's RSS: the real factory is a small interpreter
of its own) forks init per request (a plain user's factory forks outer,
which forks init). Each iteration builds one sandbox at a level, runs its
test process and takes it all down **in sequence**, timed from the request
until init (a plain user's: outer) has exited (and, with a cgroup, its
rmdir); the levels are interleaved (``fork ns overlay lo full fork ns ...``)
so load drifts hit them alike. The plugin instead asks for the next test's
sandbox before it forks the current test, so that building overlaps the
test (and its factory removes a cgroup once init has exited): the sum here is the sequential
cost of the calls, not a bound on the plugin's time per test.

Levels (each includes the ones before it, as the benchmark's rows do):

``fork``    this process forks; the child writes 2 bytes to a pipe and exits; read, reap.
``ns``      a request to the factory (one end of a socketpair, by SCM_RIGHTS). As root the
            factory unshares mnt/pid/net/uts/ipc itself, forks init (pid 1) and goes back to
            its own mnt/net/uts/ipc/pid namespaces with setns (descriptors, and an O_PATH one
            of the host /proc, opened once at its start; it set its oom_score_adj to -1000
            then too). A plain user's factory forks outer instead, which unshares user and the
            others, writes its one-id maps, opens the host /proc (O_PATH) and forks init.
            Init makes the mounts private, mounts /proc, opens its
            pid/uts/ipc/net namespaces (a plain user's: its user one too), unshares
            user+mnt itself (the lock namespace) and asks the process that forked it (two
            pipes), which writes init's uid/gid maps relative to its host /proc fd (root: all
            ids; a plain user: its own id) and answers; init opens its
            /proc/self/ns/user and mnt as the lock ones, sets PR_SET_DUMPABLE 0 and sends its
            namespaces with O_PATH fds of the scratch (at this level the rootdir, as the
            benchmark's stub) and /tmp and its pidfd (SCM_RIGHTS). This process forks the
            test process into init's pid namespace (root: setns of pid-for-children around
            the fork; a plain user: a first child joins outer's user namespace and the pid
            namespace and forks the test), which joins net/uts/ipc with setns, unshares
            cgroup, joins user/mnt, closes the inherited fds, chdirs and answers on a pipe;
            a pidfd poll, the reap, fstatvfs of the two mounts; then "finished" to init,
            which lists its /proc and exits (its channel's EOF; then init's pidfd, a plain
            user's outer's exit).
``overlay`` init's mounts are filesystem.set_up's: scratch tmpfs on /dev/shm, the overlay on
            the rootdir, tmpfs on /tmp and /dev/shm (over the scratch), the ``--bind``
            dir (and a rootdir below /tmp or /dev/shm) bound back, /proc.
``lo``      init also brings lo up: one RTM_NEWLINK on a netlink socket, ack checked.
``full``    init also sets the hostname, makes the cgroup (mkdir in every hierarchy, the
            memory=256m, cpu=1, pids=64 writes), which it stays outside of, and opens the
            counter files the plugin reads (pids.current, the OOM, CPU and pids counters, the
            peaks) to send them with the rest; the test process joins it first thing
            (``tasks`` on v1, ``cgroup.procs`` on v2); after the reap this process reads
            every counter through those descriptors, counts the cgroup's tasks
            (pids.current) instead of telling init (0: nothing left), closes the channel,
            waits on init's pidfd for its exit and rmdirs the cgroup (the plugin's factory
            removes it when it reaps init, at its next request).

Prints one JSON object: seconds per iteration for each level, the same split
in phases (build: the request until init's descriptors are here; test: the
test process's fork until its reap; teardown: the rest, including a wait for
init's exit (a plain user's: for outer's, which follows it), which the engine
does not wait for), this process's RSS and the factory's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# What root's factory (a plain user's outer, with CLONE_NEWUSER) unshares and forks init into.
SANDBOX_FLAGS = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC
# Root's factory goes back to these after each init (pytest_nsbox.sandbox.HomeNamespaces).
HOME_NAMESPACES = (
    ("mnt", CLONE_NEWNS),
    ("net", CLONE_NEWNET),
    ("uts", CLONE_NEWUTS),
    ("ipc", CLONE_NEWIPC),
    ("pid", CLONE_NEWPID),  # for children: init's pid namespace was theirs
)
# The namespaces the test process joins, in the engine's order (pytest_nsbox.sandbox's
# SHARED_NAMESPACES, then an unshared cgroup namespace, then LOCK_NAMESPACES).
SHARED_NAMESPACES = (
    ("net", CLONE_NEWNET),
    ("uts", CLONE_NEWUTS),
    ("ipc", CLONE_NEWIPC),
)
LOCK_NAMESPACES = (
    ("user", CLONE_NEWUSER),
    ("mnt", CLONE_NEWNS),
)
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
# The files the plugin reads after a test, of cgroup v1 and v2 (those of this machine exist).
COUNTER_FILES = (
    "pids.current",
    "memory.events",
    "memory.oom_control",
    "cpu.stat",
    "pids.events",
    "memory.peak",
    "memory.max_usage_in_bytes",
    "memory.failcnt",
    "memory.memsw.failcnt",
    "cpuacct.usage",
    "pids.peak",
)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
SIGKILL = 9
F_SETPIPE_SZ = 1031
TMP_SIZE = 256 * 1024 * 1024  # the plugin's default tmp_size (nothing is written to it)
SHM_SIZE = 64 * 1024 * 1024
MAP_ALL_IDS = "0 0 4294967295"
FINISHED = b"f"
WAIT_SECONDS = 30.0
LEVELS = ("fork", "ns", "overlay", "lo", "full")
FORK, NS, OVERLAY, LO, FULL = range(len(LEVELS))
# RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq 1; ifinfomsg for index 1 with IFF_UP set.
LO_UP = struct.pack("=IHHII", 32, 16, 0x1 | 0x4, 1, 0) + struct.pack("=BBHiII", 0, 0, 0, 1, 1, 1)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    def b(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    check(libc.mount(b(source), b(target), b(fstype), flags, b(data)), f"mount {target}")


def unshare(flags: int, what: str) -> None:
    check(libc.unshare(flags), f"unshare {what}")


def setns(fd: int, nstype: int, what: str) -> None:
    check(libc.setns(fd, nstype), f"setns {what}")


def die_with_parent(parent_pid: int) -> None:
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != parent_pid:
        os._exit(8)


def drop_capabilities() -> None:
    """capset(2) with empty sets, as a plain user's test process does."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")


def write(path: str, data: str, dir_fd: int | None = None) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"write {data!r} to {path}: {exc.strerror}") from None


def set_oom_score_adj(value: str) -> None:
    """As the engine: lowering it needs CAP_SYS_RESOURCE, and a refusal is ignored."""
    with contextlib.suppress(OSError):
        write("/proc/self/oom_score_adj", value)


def open_path(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def child(fn: Callable[[], None], who: str) -> NoReturn:
    """Run ``fn`` in a forked child, which must end with os._exit; report what went wrong."""
    try:
        fn()
    except BaseException as exc:
        sys.stderr.write(f"rawfloor {who} (pid {os.getpid()}): {exc!r}\n")
        sys.stderr.flush()
    finally:
        os._exit(7)


def wait_status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


# -- the sandbox: init, forked by the factory (a plain user's: by outer) --------


def scratch_and_overlay(rootdir: str, privileged: bool) -> int:
    """As pytest_nsbox.filesystem does: tmpfs on /dev/shm, the overlay; /dev/shm's covers it."""
    borrowed = "/dev/shm"
    mount("nsbox-scratch", borrowed, "tmpfs", MS_NOSUID | MS_NODEV, f"size={TMP_SIZE},mode=0700")
    scratch = os.open(borrowed, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in ("upper", "work"):
        os.mkdir(f"{borrowed}/{name}", 0o755)
    extra = "redirect_dir=on" if privileged else "userxattr"
    options = f"lowerdir={rootdir},upperdir={borrowed}/upper,workdir={borrowed}/work,{extra}"
    mount("overlay", rootdir, "overlay", 0, options)
    return scratch


def set_up_filesystem(args: argparse.Namespace, level: int) -> int:
    """Init's mounts at this level; returns the scratch descriptor init sends."""
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    if level < OVERLAY:
        # The benchmark's stub: no scratch tmpfs, the rootdir stands in for it.
        os.open(args.rootdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # "lower"
        scratch = os.open(args.rootdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        # Held before the overlay and the tmpfs can hide them, bound back after, as set_up does.
        held = {path: open_path(path) for path in filter(None, [args.bind])}
        os.open(args.rootdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # "lower"
        scratch = scratch_and_overlay(args.rootdir, args.privileged)
        if args.rootdir.startswith(("/tmp/", "/dev/shm/")):
            held[args.rootdir] = open_path(args.rootdir)
        for source, target, size in (("t", "/tmp", TMP_SIZE), ("s", "/dev/shm", SHM_SIZE)):
            mount(source, target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
        for path in sorted(held, key=lambda p: p.count("/")):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{held[path]}", path, None, MS_BIND | MS_REC, None)
            os.close(held[path])
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV, None)
    return scratch


def lo_up() -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.sendto(LO_UP, (0, 0))
        reply = sock.recv(4096)
    finally:
        sock.close()
    if struct.unpack_from("=i", reply, 16)[0] != 0:
        raise OSError("RTM_NEWLINK lo up refused")


def attach(targets: list[str]) -> None:
    for target in targets:
        write(target, "0")


def list_and_reap_leftovers() -> None:
    """Init's end, as pytest_nsbox.sandbox._kill_leftovers: list /proc, reap everything."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != "1":
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    stat.read()
            except OSError:
                continue
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def make_lock_namespace(ask_w: int, done_r: int) -> dict[str, int]:
    """Init's last namespace, unshared by itself: a copy of its mounts, all of them locked.

    Its id maps are written by the process that forked init, whose user
    namespace is the new one's parent (the factory as root, outer otherwise).
    """
    unshare(CLONE_NEWUSER | CLONE_NEWNS, "user+mnt (the lock namespace)")
    os.write(ask_w, b"l")
    reply = os.read(done_r, 16)
    os.close(ask_w)
    os.close(done_r)
    if reply != b"u":
        raise OSError(errno.ESRCH, "the lock namespace's id maps were not written")
    return {n: os.open(f"/proc/self/ns/{n}", os.O_RDONLY | os.O_CLOEXEC) for n in ("user", "mnt")}


def run_init(
    args: argparse.Namespace,
    level: int,
    number: int,
    channel_fd: int,
    outer_pid: int,
    ask_w: int,
    done_r: int,
) -> None:
    die_with_parent(0)  # the factory, or outer, is outside the pid namespace
    scratch = set_up_filesystem(args, level)
    if level >= FULL:
        hostname = f"nsbench-floor{number}".encode()
        check(libc.sethostname(hostname, len(hostname)), "sethostname")
    if level >= LO:
        lo_up()
    if level >= FULL:
        paths = cgroup_paths(args, number)
        for path in paths:
            os.mkdir(path)
        for index, file, value in args.limits:
            write(f"{paths[index]}/{file}", value)
        counters = [
            os.open(f"{paths[i]}/{name}", os.O_RDONLY | os.O_CLOEXEC) for i, name in args.counters
        ]
    else:
        counters = []
    names = ["pid", "uts", "ipc", "net"]
    namespaces = {n: os.open(f"/proc/self/ns/{n}", os.O_RDONLY | os.O_CLOEXEC) for n in names}
    if not args.privileged:
        namespaces["outer_user"] = os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    namespaces.update(make_lock_namespace(ask_w, done_r))
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl PR_SET_DUMPABLE")
    mounts = [scratch, os.open("/tmp", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    pidfd = os.pidfd_open(os.getpid())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    ordered = sorted(namespaces)
    fds = [namespaces[n] for n in ordered] + mounts + counters + [pidfd]
    channel = socket.socket(fileno=channel_fd)
    # Outer's pid (0: none, as root) rides along for this floor only: it waits for outer's exit.
    socket.send_fds(channel, [f"{outer_pid} {' '.join(ordered)}".encode()], fds)
    for fd in fds:
        if fd != scratch:
            os.close(fd)
    poller = select.poll()
    poller.register(channel_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    finished = False
    while not finished:
        for fd, _ in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            else:
                os.read(channel_fd, 1)  # "finished", or the EOF of a closed channel
                finished = True
    list_and_reap_leftovers()
    os._exit(0)


def fork_init(
    args: argparse.Namespace, level: int, number: int, channel_fd: int, outer_pid: int
) -> tuple[int, int, int]:
    """Fork init into the namespaces just unshared: (its pid, the lock request's two ends)."""
    ask_r, ask_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    init_pid = os.fork()
    if init_pid == 0:
        os.close(ask_r)
        os.close(done_w)
        child(
            lambda: run_init(args, level, number, channel_fd, outer_pid, ask_w, done_r),
            f"init ({LEVELS[level]})",
        )
    os.close(ask_w)
    os.close(done_r)
    return init_pid, ask_r, done_w


def answer_lock_request(
    ask_r: int, done_w: int, init_pid: int, id_maps: tuple[str, str], host_proc: int
) -> None:
    """When init asks, write its lock namespace's maps relative to the host /proc, answer.

    Relative to that descriptor: the /proc mounted here may already be
    init's, where init is 1 and this process has no number.
    """
    if os.read(ask_r, 1) == b"l":
        write(f"{init_pid}/uid_map", id_maps[0], dir_fd=host_proc)
        write(f"{init_pid}/gid_map", id_maps[1], dir_fd=host_proc)
        os.write(done_w, b"u")
    os.close(ask_r)
    os.close(done_w)


def open_home() -> tuple[list[tuple[int, int, str]], int]:
    """Root's factory, once: its own namespaces to return to, and the host /proc."""
    home = [
        (os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), nstype, name)
        for name, nstype in HOME_NAMESPACES
    ]
    return home, open_path("/proc")


def start_privileged(
    args: argparse.Namespace,
    level: int,
    number: int,
    channel_fd: int,
    home: list[tuple[int, int, str]],
    host_proc: int,
) -> None:
    """Root, in the factory: unshare, fork init into the new namespaces, go home, answer."""
    unshare(SANDBOX_FLAGS, "mnt/pid/net/uts/ipc")
    try:
        init_pid, ask_r, done_w = fork_init(args, level, number, channel_fd, 0)
    finally:
        for fd, nstype, name in home:
            setns(fd, nstype, f"the factory's own {name}")
    answer_lock_request(ask_r, done_w, init_pid, (MAP_ALL_IDS, MAP_ALL_IDS), host_proc)


def run_outer(
    args: argparse.Namespace, level: int, number: int, channel_fd: int, factory_pid: int
) -> None:
    """A plain user's outer: it cannot leave a user namespace, so it is the one to enter it."""
    die_with_parent(factory_pid)
    unshare(SANDBOX_FLAGS | CLONE_NEWUSER, "user+mnt/pid/net/uts/ipc")
    own_maps = f"{args.uid} {args.uid} 1", f"{args.gid} {args.gid} 1"
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", own_maps[0])
    write("/proc/self/gid_map", own_maps[1])
    host_proc = open_path("/proc")  # before init mounts its own on it
    init_pid, ask_r, done_w = fork_init(args, level, number, channel_fd, os.getpid())
    os.close(channel_fd)
    answer_lock_request(ask_r, done_w, init_pid, own_maps, host_proc)
    os.close(host_proc)
    os._exit(wait_status(init_pid))


def serve(args: argparse.Namespace, requests: socket.socket, parent_pid: int) -> None:
    """The factory: one sandbox per request, until this process closes the socket."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    factory_pid = os.getpid()
    if args.privileged:
        set_oom_score_adj("-1000")  # inherited by every init it forks
        home, host_proc = open_home()
    while True:
        data, fds, _, _ = socket.recv_fds(requests, 64, 1)
        if not data:
            os._exit(0)
        level, number = (int(field) for field in data.split())
        channel_fd = fds[0]
        if args.privileged:
            start_privileged(args, level, number, channel_fd, home, host_proc)
        elif os.fork() == 0:
            requests.close()
            child(
                lambda: run_outer(args, level, number, channel_fd, factory_pid),  # noqa: B023
                f"outer ({LEVELS[level]})",
            )
        for fd in fds:
            os.close(fd)
        while True:  # reap the inits (a plain user's: outers) that ended
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def start_factory(args: argparse.Namespace) -> tuple[socket.socket, int]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        ours.close()
        child(lambda: serve(args, theirs, parent_pid), "factory")
    theirs.close()
    return ours, pid


# -- the test process and this process's side ---------------------------------


def run_test_process(
    args: argparse.Namespace,
    level: int,
    namespaces: dict[str, int],
    targets: list[str],
    result_w: int,
    inherited: list[int],
) -> None:
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    if level >= FULL:
        attach(targets)
    if not args.privileged:
        setns(namespaces["outer_user"], CLONE_NEWUSER, "outer user")
        setns(namespaces["pid"], CLONE_NEWPID, "pid")
        test_pid = os.fork()
        if test_pid != 0:
            os._exit(wait_status(test_pid))
        check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != 0:
        os._exit(9)
    for name, nstype in SHARED_NAMESPACES:
        setns(namespaces[name], nstype, name)
    unshare(CLONE_NEWCGROUP, "cgroup")
    for name, nstype in LOCK_NAMESPACES:
        setns(namespaces[name], nstype, name)
    for fd in inherited:
        os.close(fd)
    os.chdir(args.rootdir)
    if not args.privileged:
        drop_capabilities()
    set_oom_score_adj("1000")
    os.write(result_w, b"ok")
    os._exit(0)


def rmdir_retrying(path: str) -> None:
    """rmdir, retried a moment on EBUSY (a task that just exited may still be counted)."""
    deadline = time.monotonic() + 2.0
    delay = 0.0005
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def wait_readable(pidfd: int, what: str) -> None:
    """Poll a pidfd until its process has exited (bounded: a hang must not stall the run)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if not poller.poll(int(WAIT_SECONDS * 1000)):
        raise RuntimeError(f"{what}: still running after {WAIT_SECONDS:g} s")


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def one_fork(phases: dict[str, list[float]]) -> float:
    started = time.perf_counter()
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.write(result_w, b"ok")
        os._exit(0)
    os.close(result_w)
    answer = read_all(result_r)
    os.close(result_r)
    status = wait_status(pid)
    elapsed = time.perf_counter() - started
    if answer != b"ok" or status != 0:
        raise RuntimeError(f"level fork: answer {answer!r}, exit status {status}")
    phases["test"].append(elapsed)
    return elapsed


def one_sandbox(
    args: argparse.Namespace,
    level: int,
    number: int,
    requests: socket.socket,
    own_pid_ns: int,
    phases: dict[str, list[float]],
) -> float:
    started = time.perf_counter()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    socket.send_fds(requests, [f"{level} {number}".encode()], [theirs.fileno()])
    theirs.close()
    data, fds, _, _ = socket.recv_fds(ours, 4096, 64)
    if not data:
        ours.close()
        raise RuntimeError(f"level {LEVELS[level]}: init ended before it was ready (see stderr)")
    outer, *names = data.decode().split()
    namespaces = dict(zip(names, fds, strict=False))
    mounts, counters, init_pidfd = (
        fds[len(names) : len(names) + 2],
        fds[len(names) + 2 : -1],
        fds[-1],
    )
    paths = cgroup_paths(args, number) if level >= FULL else []
    targets = attach_targets(args, paths) if paths else []
    ready = time.perf_counter()

    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(result_w, F_SETPIPE_SZ, 1 << 20)
    inherited = [*fds, ours.fileno(), requests.fileno(), own_pid_ns]
    if args.privileged:
        setns(namespaces["pid"], CLONE_NEWPID, "pid, for the test")
    try:
        pid = os.fork()
    except BaseException:
        if args.privileged:
            setns(own_pid_ns, CLONE_NEWPID, "own pid")
        raise
    if pid == 0:
        os.close(result_r)
        child(
            lambda: run_test_process(args, level, namespaces, targets, result_w, inherited),
            f"test ({LEVELS[level]})",
        )
    if args.privileged:
        setns(own_pid_ns, CLONE_NEWPID, "own pid")
    os.close(result_w)
    pidfd = os.pidfd_open(pid)
    wait_readable(pidfd, f"level {LEVELS[level]}: the test process")
    _, status, _ = os.wait4(pid, 0)
    os.close(pidfd)
    answer = read_all(result_r)
    os.close(result_r)
    tested = time.perf_counter()

    for fd in mounts:
        os.fstatvfs(fd)
    # A plain user's outer, alive (it waits for init, init for us); root has none ("0").
    outer_pidfd = os.pidfd_open(int(outer)) if outer != "0" else None
    if level >= FULL:
        # What the engine asks instead of telling init: is anything still there?
        # (pids.current is the first counter; then the usage counters, as the plugin reads.)
        text = os.pread(counters[0], 4096, 0).decode()
        for fd in counters[1:]:
            os.pread(fd, 65536, 0)
        if int(text) != 0:
            raise RuntimeError(f"{paths[args.count_index]} still holds {text.strip()} tasks")
        for fd in fds[:-1]:
            os.close(fd)
        ours.close()
    else:
        ours.send(FINISHED)
        while ours.recv(4096):
            pass
        ours.close()
        for fd in fds[:-1]:
            os.close(fd)
    if level >= FULL or outer_pidfd is None:  # else outer's exit, below, follows init's
        wait_readable(init_pidfd, f"level {LEVELS[level]}: init's exit")
    os.close(init_pidfd)
    for path in paths:
        rmdir_retrying(path)
    if outer_pidfd is not None:
        wait_readable(outer_pidfd, f"level {LEVELS[level]}: outer's exit")
        os.close(outer_pidfd)
    ended = time.perf_counter()
    if answer != b"ok" or os.WEXITSTATUS(status) != 0 or not os.WIFEXITED(status):
        raise RuntimeError(f"level {LEVELS[level]}: answer {answer!r}, wait status {status}")
    phases["build"].append(ready - started)
    phases["test"].append(tested - ready)
    phases["teardown"].append(ended - tested)
    return ended - started


# -- cgroups, worked out once ---------------------------------------------------


def cgroup_paths(args: argparse.Namespace, number: int) -> list[str]:
    return [f"{session}/floor{number}" for session in args.cgroup_session]


def attach_targets(args: argparse.Namespace, paths: list[str]) -> list[str]:
    return [f"{path}/{file}" for path, file in zip(paths, args.attach_files, strict=True)]


def limit_files(session_dirs: list[str]) -> list[tuple[int, str, str]]:
    """(hierarchy index, file name in a test's cgroup, value), found once as the plugin does."""
    wanted = (
        ("memory.oom.group", "1"),  # cgroup2
        ("memory.max", str(256 << 20)),
        ("memory.swap.max", "0"),
        ("cpu.max", "100000 100000"),
        ("memory.limit_in_bytes", str(256 << 20)),  # cgroup v1
        ("memory.memsw.limit_in_bytes", str(256 << 20)),
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "100000"),
        ("pids.max", "64"),
    )
    found = []
    for index, session in enumerate(session_dirs):
        for name, value in wanted:
            if os.path.exists(f"{session}/{name}"):
                found.append((index, name, value))
    return found


def rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rootdir", required=True)
    parser.add_argument("--bind", default="", help="a directory bound back after /tmp is hidden")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--levels", default=",".join(LEVELS))
    parser.add_argument("--cgroup-session", action="append", default=[])
    parser.add_argument("--ballast-mb", type=int, default=0, help="touch this much memory first")
    args = parser.parse_args()
    levels = [LEVELS.index(name) for name in args.levels.split(",")]
    if FULL in levels and not args.cgroup_session:
        raise SystemExit("level full needs --cgroup-session")
    args.privileged = os.geteuid() == 0
    args.uid, args.gid = os.getuid(), os.getgid()  # as the host sees them
    args.limits = limit_files(args.cgroup_session)
    # v1 attaches through "tasks" (as the engine: no global lock), cgroup2 through cgroup.procs.
    args.attach_files = [
        "tasks" if os.path.exists(f"{session}/tasks") else "cgroup.procs"
        for session in args.cgroup_session
    ]
    # The counter files the plugin's init opens (pytest_nsbox.cgroups' counter_files), by
    # hierarchy: pids.current first, which counts the tasks left (the pids hierarchy, or
    # cgroup2's one).
    args.counters = [
        (index, name)
        for name in COUNTER_FILES
        for index, session in enumerate(args.cgroup_session)
        if os.path.exists(f"{session}/{name}")
    ]
    if FULL in levels and (not args.counters or args.counters[0][1] != "pids.current"):
        raise SystemExit("level full needs a pids controller (pids.current)")
    args.count_index = args.counters[0][0] if args.counters else 0
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    requests, factory_pid = start_factory(args)  # before the ballast: the factory stays small
    try:
        ballast = bytearray(b"\x01") * (args.ballast_mb << 20)
        times: dict[str, list[float]] = {LEVELS[level]: [] for level in levels}
        phases: dict[str, dict[str, list[float]]] = {
            LEVELS[level]: {"build": [], "test": [], "teardown": []} for level in levels
        }
        for number in range(args.iterations):
            for level in levels:
                name = LEVELS[level]
                if level == FORK:
                    times[name].append(one_fork(phases[name]))
                else:
                    elapsed = one_sandbox(args, level, number, requests, own_pid_ns, phases[name])
                    times[name].append(elapsed)
        factory_rss = rss(factory_pid)
    finally:
        requests.close()
        os.waitpid(factory_pid, 0)
    result = {
        "seconds": times,
        "phases": {name: {k: v for k, v in p.items() if v} for name, p in phases.items()},
        "rss": rss(),
        "factory_rss": factory_rss,
        "ballast": len(ballast),
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
