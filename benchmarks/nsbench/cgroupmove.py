"""Section 7: what getting a new process into its cgroup costs, by the way it gets there.

Each move is timed in this process from just before its fork (or clone)
until the child has said, on a pipe, that it is in the cgroup; the child
also times its own write, the move itself. The ways:

``tasks``         the child writes 0 to ``tasks`` in each v1 hierarchy of a test's cgroup
                  (``SandboxCgroup.attach_self``, the plugin's v1 path): the kernel moves
                  the one thread and takes no global lock.
``cgroup.procs``  the child writes 0 to ``cgroup.procs`` in each (on v2, ``attach_self``'s
                  own write, the plugin's fallback there): the whole thread group
                  moves, under the lock every fork and exit on the machine takes too
                  (``cgroup_threadgroup_rwsem``), whose first writer after a quiet moment
                  waits for an RCU grace period. The only way into a cgroup2 domain cgroup
                  once born, and what a pytest-xdist worker's test processes still do there.
``clone``         the child is born in a cgroup2 directory (``kernel.fork_into_cgroup``,
                  clone3 with CLONE_INTO_CGROUP: the plugin's v2 path) and never moves. On a
                  v1 host, a directory below this process's own in the controller-less
                  cgroup2 hierarchy.

The ways take turns, move by move, at two paces: a move every 10 ms (the
pace of sandboxed tests back to back here) and every 50 ms (a slower test,
or a quiet moment). The grace period is the kernel's, not the plugin's, so
its share depends on what else the machine does: the figures are this run's.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nsbench.stats import summarize
from pytest_nsbox import cgroups, kernel

PACES_MS = (10, 50)
SLOW_MS = 1.0  # a move this long waited for something (a grace period, here)
_MOVE_LIMITS = cgroups.Limits(memory=256 << 20, cpu=1.0, pids=64)


@dataclass(frozen=True)
class _Way:
    """How a child gets into its cgroup: written by the child, or born there (a descriptor)."""

    name: str
    dirs: tuple[str, ...]  # where the child is once in
    move: Callable[[], None] | None = None  # what the child runs to get in
    birth_fd: int | None = None


def _own_cgroup2_dir() -> str | None:
    """This process's directory in the cgroup2 hierarchy, if one is mounted."""
    with open("/proc/self/cgroup") as membership:
        path = next((line.strip()[3:] for line in membership if line.startswith("0::")), None)
    with open("/proc/self/mountinfo") as mountinfo:
        point = next(
            (
                line.split()[4]
                for line in mountinfo
                if line.partition(" - ")[2].startswith("cgroup2 ")
            ),
            None,
        )
    return None if path is None or point is None else os.path.normpath(point + path)


@contextlib.contextmanager
def _ways(manager: cgroups.CgroupManager) -> Iterator[tuple[dict[str, _Way], dict[str, str]]]:
    """Each way this machine has, with a test's cgroup made for it; and why a way is missing."""
    missing: dict[str, str] = {}
    ways: dict[str, _Way] = {}
    made: list[str] = []
    cgroup = manager.create(_MOVE_LIMITS)
    birth_fd = None
    try:
        if manager.version == 1:
            procs = tuple(f"{path}/cgroup.procs" for path in cgroup.paths)

            def write_procs() -> None:  # what attach_self does, to v1's cgroup.procs
                for target in procs:
                    kernel.write_file(target, "0")

            ways["tasks"] = _Way("tasks", cgroup.paths, move=cgroup.attach_self)
            ways["cgroup.procs"] = _Way("cgroup.procs", cgroup.paths, move=write_procs)
        else:
            missing["tasks"] = "cgroup2 domain cgroups have no tasks file"
            ways["cgroup.procs"] = _Way("cgroup.procs", cgroup.paths, move=cgroup.attach_self)
        birth = cgroup.birth_directory()
        if birth is None:
            own = _own_cgroup2_dir()
            if own is not None and os.access(own, os.W_OK):
                birth = os.path.join(own, f"nsbench-move-{os.getpid()}")
                os.mkdir(birth)
                made.append(birth)
        if birth is None:
            missing["clone"] = "no cgroup2 directory to be born in"
        elif not kernel.single_threaded():
            missing["clone"] = "this process has threads"
        else:
            birth_fd = os.open(birth, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            ways["clone"] = _Way("clone", (birth,), birth_fd=birth_fd)
        for way in ways.values():
            _check(way)
        yield ways, missing
    finally:
        if birth_fd is not None:
            os.close(birth_fd)
        for path in made:
            os.rmdir(path)
        cgroup.remove()


def _check(way: _Way) -> None:
    """One move, untimed, that shows the child in each of the way's directories."""
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)

    def listed(pid: int) -> None:
        try:
            for path in way.dirs:
                with open(f"{path}/cgroup.procs") as procs:
                    if str(pid) not in procs.read().split():
                        raise RuntimeError(f"the {way.name} way's child {pid} is not in {path}")
        finally:
            os.write(hold_w, b"g")  # let it go

    try:
        _one_move(way, hold_r, listed)
    finally:
        os.close(hold_r)
        os.close(hold_w)


def _one_move(
    way: _Way, hold_fd: int | None = None, check: Callable[[int], None] | None = None
) -> tuple[float, float | None]:
    """(seconds from the fork until the child is in, seconds of its move) for one child.

    With ``hold_fd``, the child, once in, waits for a byte on it, and
    ``check`` sees its pid meanwhile.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    started = time.perf_counter()
    try:
        pid = os.fork() if way.birth_fd is None else kernel.fork_into_cgroup(way.birth_fd)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:
        status = 1
        try:
            moved = time.perf_counter()
            if way.move is not None:
                way.move()
            os.write(write_fd, struct.pack("d", time.perf_counter() - moved))
            if hold_fd is not None:
                os.read(hold_fd, 1)
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        answer = os.read(read_fd, 8)
        seen = time.perf_counter() - started
        if check is not None and len(answer) == 8:
            check(pid)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if len(answer) != 8 or os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"a child of the {way.name} way failed (status {status})")
    return seen, (None if way.move is None else struct.unpack("d", answer)[0])


def measure_moves(
    manager: cgroups.CgroupManager, moves: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """``moves`` moves of each way at each pace, the ways taking turns in a random order."""
    with _ways(manager) as (ways, missing):
        figures: dict[str, Any] = {"missing": missing, "slow_ms": SLOW_MS, "paces": {}}
        for pace in PACES_MS:
            log(f"  a move every {pace} ms: {', '.join(ways)}, {moves} each")
            seen: dict[str, list[float]] = {name: [] for name in ways}
            own: dict[str, list[float]] = {name: [] for name in ways}
            slot = pace / 1000 / len(ways)  # each way moves once per pace
            due = time.monotonic()
            for _ in range(moves):
                for name in random.sample(list(ways), len(ways)):
                    total, write = _one_move(ways[name])
                    seen[name].append(total * 1000)
                    if write is not None:
                        own[name].append(write * 1000)
                    due += slot
                    time.sleep(max(0.0, due - time.monotonic()))
            figures["paces"][str(pace)] = {
                name: {
                    "in_cgroup_ms": summarize(seen[name]).as_dict(),
                    "move_ms": summarize(own[name]).as_dict() if own[name] else None,
                    "slowest_ms": max(seen[name]),
                    "slow": sum(ms > SLOW_MS for ms in own[name]),
                    "moves": len(seen[name]),
                }
                for name in ways
            }
    return figures
