"""What a sandboxed test wrote into the repo, read from the overlay's upper layer.

Overlayfs records every change in its upper directory: a created or modified
file is there in full, a deleted one is a whiteout (a character device 0:0),
and a directory that replaced one of the same name is marked opaque. Compared
with the repo beneath, that says exactly which paths the test created,
modified or deleted, without scanning the repo itself.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable
from typing import Any

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def _exists_below(lower_fd: int, relpath: str) -> bool:
    try:
        os.stat(relpath, dir_fd=lower_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _is_opaque(path: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def list_changes(scratch_fd: int, lower_fd: int) -> dict[str, Any]:
    """Walk ``upper`` in the scratch tmpfs; paths are relative to the rootdir."""
    created: list[str] = []
    modified: list[str] = []
    deleted: list[str] = []
    upper_root = f"/proc/self/fd/{scratch_fd}/upper"
    for dirpath, dirnames, filenames in os.walk(upper_root):
        reldir = os.path.relpath(dirpath, upper_root)
        reldir = "" if reldir == "." else reldir + "/"
        for name in dirnames + filenames:
            rel = reldir + name
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                deleted.append(rel)
            elif not _exists_below(lower_fd, rel):
                created.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                if _is_opaque(os.path.join(dirpath, name)):
                    deleted.append(rel)  # replaced: the old directory's content is gone
                    created.append(rel)
            else:
                modified.append(rel)
    return {"created": sorted(created), "modified": sorted(modified), "deleted": sorted(deleted)}


def ignored(path: str, patterns: Iterable[str]) -> bool:
    """True when the path or any of its components matches one of the globs."""
    parts = path.split("/")
    return any(
        fnmatch.fnmatch(path, pattern) or any(fnmatch.fnmatch(part, pattern) for part in parts)
        for pattern in patterns
    )
