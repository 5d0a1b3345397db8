"""Run a command as a plain user, with this interpreter and its packages reachable.

Shared by the benchmark's rootless rows and the test suite's rootless tests.
The interpreter and packages may live under ``/root`` (mode 0700), as pyenv
and tox put them. The command's child, still root, enters a private mount
namespace, lays a 0755 tmpfs over each directory the user may not traverse
(holding only bind mounts of the entries on the way to the needed paths),
then drops its ids. Nothing changes outside that child's mount namespace.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from pytest_nsbox import kernel

PLAIN_USER = "nsbox-tester"


def interpreter_paths() -> list[str]:
    """What a plain user needs to read to run this interpreter with its packages."""
    import pytest_nsbox
    from pytest_nsbox.sandbox import interpreter_paths as python_paths

    package_root = os.path.dirname(os.path.dirname(pytest_nsbox.__file__))
    return sorted({*python_paths(), os.path.realpath(sys.executable), package_root})


def make_reachable(paths: Sequence[str]) -> None:
    """In a private mount namespace (entered here), make ``paths`` reachable by any user."""
    kernel.unshare(kernel.CLONE_NEWNS)
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, None)
    for _ in range(16):
        blocked: dict[str, set[str]] = {}
        for path in paths:
            found = _blocking_ancestor(path)
            if found is not None:
                blocked.setdefault(found[0], set()).add(found[1])
        if not blocked:
            return
        for directory, children in sorted(blocked.items()):
            held = {child: os.open(os.path.join(directory, child), os.O_PATH) for child in children}
            kernel.mount("tmpfs", directory, "tmpfs", 0, "mode=0755,size=1m")
            for child, fd in held.items():
                target = os.path.join(directory, child)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(target)
                else:
                    open(target, "w").close()
                kernel.mount(
                    f"/proc/self/fd/{fd}", target, None, kernel.MS_BIND | kernel.MS_REC, None
                )
                os.close(fd)
    raise RuntimeError(f"could not make {list(paths)} reachable")


def _blocking_ancestor(path: str) -> tuple[str, str] | None:
    """The first directory on the way to ``path`` that others may not traverse.

    Returns (that directory, the next path component below it), or None when
    the whole path is reachable for any user.
    """
    parts = os.path.abspath(path).split("/")[1:]
    current = "/"
    for part in parts:
        if not os.stat(current).st_mode & 0o001:
            return current, part
        current = os.path.join(current, part)
    return None


def becoming(
    uid: int, gid: int, reachable: Sequence[str], as_root_first: Callable[[], None] | None = None
) -> Callable[[], None]:
    """A ``preexec_fn``: make ``reachable`` reachable, then drop to ``uid``/``gid``.

    ``as_root_first`` runs in the private mount namespace before the ids are
    dropped: a place to mount things only that command sees.
    """

    def become() -> None:
        make_reachable(reachable)
        if as_root_first is not None:
            as_root_first()
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return become
