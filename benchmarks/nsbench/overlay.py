"""Section 3: the overlay's set-up time against the size of the rootdir, and copytree's.

Set-up is timed around ``pytest_nsbox.filesystem.set_up`` itself (the
sandbox init's whole mount sequence: private propagation, detached tmpfs,
overlay on the rootdir, private /tmp and /dev/shm, /proc), in a forked
child that first entered a mount namespace of its own (and a user namespace
when not root), so the host's mounts never change. The child reports its
figure on a pipe and exits; its namespace and every mount go with it.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Sequence

from pytest_nsbox import filesystem, kernel

FILES_PER_DIR = 100
DIRS_PER_PACKAGE = 50


def make_tree(root: str, files: int) -> None:
    """A repo-like tree: packages of directories of small Python files."""
    for number in range(files):
        directory = number // FILES_PER_DIR
        path = os.path.join(root, f"pkg{directory // DIRS_PER_PACKAGE}", f"mod{directory}")
        if number % FILES_PER_DIR == 0:
            os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, f"file{number}.py"), "w") as out:
            out.write(f"VALUE = {number}\n")


def _enter_mount_namespace() -> bool:
    """unshare(mnt), plus user with a one-id map when not root; True when privileged."""
    privileged = os.geteuid() == 0
    if privileged:
        kernel.unshare(kernel.CLONE_NEWNS)
        return True
    uid, gid = os.getuid(), os.getgid()
    kernel.unshare(kernel.CLONE_NEWNS | kernel.CLONE_NEWUSER)
    kernel.write_file("/proc/self/setgroups", "deny")
    kernel.write_file("/proc/self/uid_map", f"{uid} {uid} 1")
    kernel.write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    return False


def time_set_up(rootdir: str) -> float:
    """Seconds that ``filesystem.set_up`` takes for this rootdir, in a throw-away child."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            privileged = _enter_mount_namespace()
            plan = filesystem.plan(
                rootdir=rootdir,
                privileged=privileged,
                private_tmp=True,
                tmp_size=16 << 20,
                upper_size=16 << 20,
                passthrough=(),
            )
            started = time.perf_counter()
            filesystem.set_up(plan)
            os.write(write_fd, struct.pack("d", time.perf_counter() - started))
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        data = os.read(read_fd, 8)
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if status != 0 or len(data) != 8:
        raise RuntimeError(f"overlay set-up child failed (wait status {status})")
    return float(struct.unpack("d", data)[0])


def time_copytree(source: str, scratch: str) -> float:
    """Seconds for shutil.copytree of the tree (the copy is removed afterwards, untimed)."""
    target = os.path.join(scratch, "copy")
    started = time.perf_counter()
    shutil.copytree(source, target, symlinks=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return elapsed


def measure(
    top: str, sizes: Sequence[int], set_up_reps: int, copy_reps: int
) -> dict[int, dict[str, list[float]]]:
    """Both timings for each size, the sizes interleaved within each repetition."""
    trees = {}
    for size in sizes:
        trees[size] = os.path.join(top, f"tree-{size}")
        make_tree(trees[size], size)
    results: dict[int, dict[str, list[float]]] = {s: {"set_up": [], "copytree": []} for s in sizes}
    for _ in range(set_up_reps):
        for size in sizes:
            results[size]["set_up"].append(time_set_up(trees[size]))
    for _ in range(copy_reps):
        for size in sizes:
            results[size]["copytree"].append(time_copytree(trees[size], top))
    for path in trees.values():
        shutil.rmtree(path)
    return results
