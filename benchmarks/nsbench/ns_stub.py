"""Imported first by the sandbox factory of the benchmark's "ns" row, before ``serve``.

It replaces ``pytest_nsbox.filesystem.set_up`` in the factory process (and
so in every init it forks) with :func:`namespaces_only_set_up`:
what a new mount and pid namespace needs, and nothing of the overlay. The
sandbox's init looks the function up on the module when it runs
(``filesystem.set_up(...)``), so the replacement takes.

The factory runs under ``python -I -S``: this module imports only the
standard library and ``pytest_nsbox`` itself, never pytest.
"""

from __future__ import annotations

import os

from pytest_nsbox import filesystem, kernel


def namespaces_only_set_up(plan: filesystem.FilesystemPlan) -> tuple[int, int]:
    """``filesystem.set_up`` reduced to private propagation and a new /proc.

    Init lists ``/proc`` when the test ends, so its pid namespace needs its
    own. Returns what ``set_up`` returns, (scratch, lower): there is no
    scratch tmpfs, so both are descriptors of the rootdir (init reads the
    scratch one's free space only to report a full tmpfs).
    """
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, None)
    kernel.mount("proc", "/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV, None)
    lower_fd = os.open(plan.rootdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return os.dup(lower_fd), lower_fd


filesystem.set_up = namespaces_only_set_up
