"""The sandbox's view of the file system, set up by the sandbox's init.

The order matters and is kept in one function, :func:`set_up`, so a failure
points at its step:

1. make every mount private, so nothing below propagates to the host;
2. open the host paths that stay writable (``writable=``, pytest's basetemp)
   before the overlay can hide them;
3. a tmpfs holds the overlay's upper and work directories, on a directory
   that step 5 mounts over (else it is detached again);
4. overlayfs on the rootdir's own path: the repo as it is, every write
   landing in the upper layer and thrown away with the sandbox;
5. a private, size-limited ``/tmp`` and ``/dev/shm``;
6. the held paths bound back at their own paths (inside the new ``/tmp`` too),
   and, read-only, the interpreter's own paths that the new ``/tmp`` would
   hide (a virtualenv under ``/tmp``, as CI checkouts often have);
7. a ``/proc`` for the new pid namespace.

Mounted by real root, the overlay gets ``redirect_dir=on`` (directory
renames work); in a user namespace it needs ``userxattr`` (without it,
deleting a directory fails with EIO), which excludes ``redirect_dir``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import lru_cache

from pytest_nsbox import kernel

DEV_SHM_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True)
class FilesystemPlan:
    """What the sandbox's mount namespace should look like; built in the parent by :func:`plan`.

    ``readonly`` and ``scratch`` depend only on the host's paths, so they are
    worked out there, once per session, instead of by every sandbox's init:
    in a forked interpreter that Python cost about 0.1 ms of CPU a sandbox.
    """

    rootdir: str
    privileged: bool
    private_tmp: bool
    tmp_size: int
    upper_size: int
    passthrough: tuple[str, ...]
    #: The interpreter's paths that the private /tmp or /dev/shm would hide: bound back read-only.
    readonly: tuple[str, ...]
    #: Where the scratch tmpfs is laid for a moment; "" when no candidate fits.
    scratch: str

    @property
    def hidden_tops(self) -> tuple[str, ...]:
        """The host directories the sandbox covers with a private tmpfs."""
        return _hidden_tops(self.private_tmp)


@lru_cache(maxsize=32)
def plan(
    *,
    rootdir: str,
    privileged: bool,
    private_tmp: bool,
    tmp_size: int,
    upper_size: int,
    passthrough: tuple[str, ...],
    interpreter: tuple[str, ...] = (),
) -> FilesystemPlan:
    """The plan for these settings (cached); ``interpreter``: the paths the test's Python needs."""
    hidden = _hidden_tops(private_tmp)
    # Never a hidden top itself: a script run from /tmp puts "/tmp" on
    # sys.path, and binding that back would undo the private /tmp.
    readonly = tuple(
        path
        for path in _outermost(tuple(p for p in interpreter if p not in hidden))
        if any(_under(path, top) for top in hidden) and not _under(path, rootdir)
    )
    scratch = scratch_mountpoint((rootdir, *passthrough, *interpreter))
    return FilesystemPlan(
        rootdir, privileged, private_tmp, tmp_size, upper_size, passthrough, readonly, scratch
    )


def _hidden_tops(private_tmp: bool) -> tuple[str, ...]:
    return ("/dev/shm", "/tmp") if private_tmp else ("/dev/shm",)


def _escape_option(path: str) -> str:
    """Overlay option values split on ',' and ':'; a backslash escapes them."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def open_path(path: str) -> int:
    """An O_PATH descriptor of ``path``, naming it if that fails."""
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel.SandboxSetupError(f"open {path}", exc.errno or 0) from None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _outermost(paths: tuple[str, ...]) -> list[str]:
    """The paths that are not below another one of them."""
    return [p for p in paths if not any(p != q and _under(p, q) for q in paths)]


def _bind(fd: int, target: str, *, readonly: bool = False) -> None:
    try:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "a"):
                pass
    except OSError as exc:
        raise kernel.SandboxSetupError(f"mkdir {target}", exc.errno or 0) from None
    kernel.mount(f"/proc/self/fd/{fd}", target, None, kernel.MS_BIND | kernel.MS_REC, None)
    if readonly:
        kernel.mount(None, target, None, _remount_readonly_flags(target), None)


# statvfs flag -> mount flag, for the flags a user namespace locks on inherited mounts.
_KEPT_FLAGS = (
    (os.ST_NOSUID, kernel.MS_NOSUID),
    (os.ST_NODEV, kernel.MS_NODEV),
    (os.ST_NOEXEC, kernel.MS_NOEXEC),
    (os.ST_NOATIME, kernel.MS_NOATIME),
    (os.ST_NODIRATIME, kernel.MS_NODIRATIME),
    (os.ST_RELATIME, kernel.MS_RELATIME),
)


def _remount_readonly_flags(target: str) -> int:
    """MS_RDONLY plus the flags the mount already has.

    In a user namespace the nosuid/nodev/noexec/atime flags of a mount made
    outside are locked: a remount that leaves one out is refused with EPERM
    (a ``/tmp`` mounted nosuid,nodev, for one). bubblewrap does the same.
    """
    current = os.statvfs(target).f_flag
    flags = kernel.MS_REMOUNT | kernel.MS_BIND | kernel.MS_RDONLY
    for st_flag, ms_flag in _KEPT_FLAGS:
        if current & st_flag:
            flags |= ms_flag
    return flags


SCRATCH_MOUNTPOINTS = ("/dev/shm", "/tmp", "/mnt", "/media", "/srv", "/opt", "/var", "/home")


def scratch_mountpoint(needed: tuple[str, ...]) -> str:
    """A directory to lay the scratch tmpfs on for a moment: no ancestor of what the test sees.

    Mounting there must not hide the repo, the interpreter or any path bound
    back later (``needed``), so the first existing candidate that contains
    none of them is taken; "" if there is none (init then fails the step).
    """
    for candidate in SCRATCH_MOUNTPOINTS:
        if os.path.isdir(candidate) and not any(_under(path, candidate) for path in needed):
            return candidate
    return ""


def mount_scratch_and_overlay(plan: FilesystemPlan, covered: tuple[str, ...]) -> int:
    """The overlay on the rootdir, its upper/work dirs in a tmpfs nobody can reach.

    The tmpfs is mounted on a borrowed directory and the overlay mounted.
    On one of the ``covered`` directories (a later step mounts the private
    ``/dev/shm`` or ``/tmp`` there) the tmpfs stays, beneath that mount,
    which the lock namespace makes impossible to remove, as it does the
    overlay that covers the repository. Elsewhere it is detached again (the
    overlay keeps its own reference to its upper layer): a detach costs
    init an expedited RCU grace period, about 0.3 ms, that interrupts every
    CPU. (Pointing the overlay at a tmpfs that was never attached, made
    with fsmount, fails with EINVAL on kernels before 6.6.) Returns an fd
    of the tmpfs root, for reading back what the test wrote.
    """
    mountpoint = plan.scratch
    if not mountpoint:
        raise kernel.SandboxSetupError(
            "choose a scratch mount point",
            errno.ENOENT,
            f"all of {SCRATCH_MOUNTPOINTS} hold test paths",
        )
    kernel.mount(
        "nsbox-scratch",
        mountpoint,
        "tmpfs",
        kernel.MS_NOSUID | kernel.MS_NODEV,
        f"size={plan.upper_size},mode=0700",
    )
    scratch_fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in ("upper", "work"):
        os.mkdir(os.path.join(mountpoint, name), 0o755)
    options = (
        f"lowerdir={_escape_option(plan.rootdir)},"
        f"upperdir={_escape_option(mountpoint)}/upper,workdir={_escape_option(mountpoint)}/work,"
        + ("redirect_dir=on" if plan.privileged else "userxattr")
    )
    kernel.mount("overlay", plan.rootdir, "overlay", 0, options)
    if mountpoint not in covered:
        kernel.umount2(mountpoint, kernel.MNT_DETACH)
    return scratch_fd


def set_up(plan: FilesystemPlan) -> tuple[int, int]:
    """Run the mount sequence.

    Returns the scratch tmpfs (its ``upper`` holds what the test wrote) and the
    repo as it is beneath the overlay, both as fds the test never inherits.
    """
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, None)
    hidden_tops = plan.hidden_tops
    held = {path: open_path(path) for path in plan.passthrough}
    readonly = {path: open_path(path) for path in plan.readonly}
    lower_fd = os.open(plan.rootdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    scratch_fd = mount_scratch_and_overlay(plan, hidden_tops)
    if any(_under(plan.rootdir, top) for top in hidden_tops):
        held[plan.rootdir] = open_path(plan.rootdir)
    if plan.private_tmp:
        kernel.mount(
            "nsbox-tmp",
            "/tmp",
            "tmpfs",
            kernel.MS_NOSUID | kernel.MS_NODEV,
            f"size={plan.tmp_size},mode=1777",
        )
    kernel.mount(
        "nsbox-shm",
        "/dev/shm",
        "tmpfs",
        kernel.MS_NOSUID | kernel.MS_NODEV,
        f"size={DEV_SHM_SIZE},mode=1777",
    )
    for path in sorted({*held, *readonly}, key=lambda p: p.count("/")):
        fd = held.get(path, readonly.get(path))
        assert fd is not None
        try:
            _bind(fd, path, readonly=path in readonly and path not in held)
        finally:
            os.close(fd)
    kernel.mount("proc", "/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV, None)
    return scratch_fd, lower_fd
