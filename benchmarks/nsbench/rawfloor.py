"""The raw floor: the sandbox's system calls from a minimal Python process.

Run as ``python -I -S rawfloor.py ...`` by ``benchmarks/run.py``: it imports
only ctypes, json, os, socket, struct, sys and time, so its process is a few
MB and every figure is close to what the kernel itself costs. Each iteration
builds one sandbox at a given level and tears it down, timed from the first
call in the parent to the parent having reaped it; the levels are interleaved
(``fork ns overlay lo full fork ns ...``) so load drifts hit them alike.

Levels (each includes the ones before it, as the benchmark's rows do):

``fork``    fork; the child writes 2 bytes to a pipe and exits; the parent reads and reaps.
``ns``      the three processes of a sandbox: outer unshares mnt/pid/net/uts/ipc/cgroup
            (plus user when not root) and forks init; init makes mounts private, mounts
            /proc and forks the test process, which unshares user+mnt and waits for init
            to write its uid/gid maps (two pipes), then answers on the result pipe.
``overlay`` init also mounts a scratch tmpfs on /dev/shm, the overlay on the rootdir (upper
            and work dirs in the scratch), detaches the scratch, mounts tmpfs on /tmp and
            /dev/shm, and binds the ``--bind`` dir back.
``lo``      init also brings lo up: one RTM_NEWLINK on a netlink socket, ack checked.
``full``    the parent also makes a cgroup per hierarchy (mkdir + the memory=256m, cpu=1,
            pids=64 limit writes), the outer attaches itself (write "0" to cgroup.procs),
            init sets the hostname; after reaping, the parent reads cgroup.procs and rmdirs.

Prints one JSON object: seconds per iteration for each level, and this process's RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import struct
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
OUTER_FLAGS = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC
OUTER_FLAGS |= CLONE_NEWCGROUP
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
SIGKILL = 9
TMP_SIZE = 16 * 1024 * 1024
LEVELS = ("fork", "ns", "overlay", "lo", "full")
# RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq 1; ifinfomsg for index 1 with IFF_UP set.
LO_UP = struct.pack("=IHHII", 32, 16, 0x1 | 0x4, 1, 0) + struct.pack("=BBHiII", 0, 0, 0, 1, 1, 1)

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
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


def scratch_and_overlay(rootdir: str, privileged: bool) -> int:
    """As pytest_nsbox.filesystem does: tmpfs on a borrowed dir, overlay, tmpfs detached."""
    borrowed = "/dev/shm"
    mount("nsbox-scratch", borrowed, "tmpfs", MS_NOSUID | MS_NODEV, f"size={TMP_SIZE},mode=0700")
    scratch = os.open(borrowed, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in ("upper", "work"):
        os.mkdir(f"{borrowed}/{name}", 0o755)
    extra = "redirect_dir=on" if privileged else "userxattr"
    options = f"lowerdir={rootdir},upperdir={borrowed}/upper,workdir={borrowed}/work,{extra}"
    mount("overlay", rootdir, "overlay", 0, options)
    check(libc.umount2(borrowed.encode(), MNT_DETACH), "umount2")
    return scratch


def write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def lo_up() -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.sendto(LO_UP, (0, 0))
        reply = sock.recv(4096)
    finally:
        sock.close()
    if struct.unpack_from("=i", reply, 16)[0] != 0:
        raise OSError("RTM_NEWLINK lo up refused")


def set_up_filesystem(args: argparse.Namespace, level: int, privileged: bool) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    if level >= LEVELS.index("overlay"):
        scratch_and_overlay(args.rootdir, privileged)
        # Held before /tmp and /dev/shm are hidden, bound back after, as the plugin does.
        hidden = [p for p in (args.bind, args.rootdir) if p.startswith(("/tmp/", "/dev/shm/"))]
        held = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in hidden}
        for source, target, size in (("t", "/tmp", TMP_SIZE), ("s", "/dev/shm", 64 << 20)):
            mount(source, target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
        for path in sorted(held, key=lambda p: p.count("/")):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{held[path]}", path, None, MS_BIND | MS_REC, None)
            os.close(held[path])
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV, None)


def run_test_process(args: argparse.Namespace, result_w: int, ready_w: int, go_r: int) -> None:
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare user+mnt")
    os.write(ready_w, b"u")
    if os.read(go_r, 1) != b"g":
        os._exit(3)
    os.chdir(args.rootdir)
    os.write(result_w, b"ok")
    os._exit(0)


def run_init(args: argparse.Namespace, level: int, result_w: int, privileged: bool) -> None:
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    set_up_filesystem(args, level, privileged)
    if level >= LEVELS.index("full"):
        name = b"nsbench-floor"
        check(libc.sethostname(name, len(name)), "sethostname")
    if level >= LEVELS.index("lo"):
        lo_up()
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    test_pid = os.fork()
    if test_pid == 0:
        run_test_process(args, result_w, ready_w, go_r)
    os.close(result_w)
    if os.read(ready_r, 1) != b"u":
        os._exit(4)
    uid, gid = os.getuid(), os.getgid()
    write(f"/proc/{test_pid}/uid_map", "0 0 4294967295" if privileged else f"{uid} {uid} 1")
    write(f"/proc/{test_pid}/gid_map", "0 0 4294967295" if privileged else f"{gid} {gid} 1")
    os.write(go_w, b"g")
    _, status = os.waitpid(test_pid, 0)
    os._exit(0 if status == 0 else 5)


def run_outer(args: argparse.Namespace, level: int, result_w: int, cgroup: list[str]) -> None:
    privileged = os.geteuid() == 0
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    for path in cgroup:
        write(f"{path}/cgroup.procs", "0")
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(OUTER_FLAGS | (0 if privileged else CLONE_NEWUSER)), "unshare")
    if not privileged:
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", f"{uid} {uid} 1")
        write("/proc/self/gid_map", f"{gid} {gid} 1")
    init_pid = os.fork()
    if init_pid == 0:
        run_init(args, level, result_w, privileged)
    os.close(result_w)
    _, status = os.waitpid(init_pid, 0)
    os._exit(0 if status == 0 else 6)


def limit_files(session_dirs: list[str]) -> list[tuple[str, str]]:
    """(file name relative to a test's cgroup, value), found once as the plugin does."""
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
                found.append((f"{index}/{name}", value))
    return found


def one_iteration(args: argparse.Namespace, level: int, number: int, limits: list) -> float:
    started = time.perf_counter()
    cgroup = []
    if level >= LEVELS.index("full"):
        cgroup = [f"{session}/floor{number}" for session in args.cgroup_session]
        for path in cgroup:
            os.mkdir(path)
        for name, value in limits:
            index, _, file = name.partition("/")
            write(f"{cgroup[int(index)]}/{file}", value)
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(result_r)
            if level == 0:
                os.write(result_w, b"ok")
                os._exit(0)
            run_outer(args, level, result_w, cgroup)
        except BaseException as exc:
            sys.stderr.write(f"rawfloor level {LEVELS[level]} (pid {os.getpid()}): {exc!r}\n")
            sys.stderr.flush()
        finally:
            os._exit(7)
    os.close(result_w)
    answer = os.read(result_r, 2)
    while os.read(result_r, 64):
        pass
    os.close(result_r)
    _, status = os.waitpid(pid, 0)
    for path in cgroup:
        with open(f"{path}/cgroup.procs") as procs:
            if procs.read().strip():
                raise RuntimeError(f"{path} is not empty")
        os.rmdir(path)
    elapsed = time.perf_counter() - started
    if answer != b"ok" or status != 0:
        raise RuntimeError(f"level {LEVELS[level]}: answer {answer!r}, wait status {status}")
    return elapsed


def rss() -> int:
    with open("/proc/self/status") as status:
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
    ballast = bytearray(b"\x01") * (args.ballast_mb << 20)
    levels = [LEVELS.index(name) for name in args.levels.split(",")]
    if LEVELS.index("full") in levels and not args.cgroup_session:
        raise SystemExit("level full needs --cgroup-session")
    limits = limit_files(args.cgroup_session)
    times: dict[str, list[float]] = {LEVELS[level]: [] for level in levels}
    for number in range(args.iterations):
        for level in levels:
            times[LEVELS[level]].append(one_iteration(args, level, number, limits))
    json.dump({"seconds": times, "rss": rss(), "ballast": len(ballast)}, sys.stdout)


if __name__ == "__main__":
    main()
