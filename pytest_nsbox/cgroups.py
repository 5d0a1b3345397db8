"""Per-test cgroups: the sandbox's memory, CPU and task limits, and what the kernel counted.

Each sandboxed test runs in a cgroup of its own, so the kernel both enforces
its limits and keeps the score: an OOM kill, CPU throttling or a refused fork
is read back from the cgroup's counters and becomes the test's outcome.

Everything lives below this process's own cgroup, never above it (that part
of the tree belongs to whoever started pytest): one session directory
``nsbox-<pid>`` per pytest process, holding one ``t<N>`` per test, in the
cgroup2 hierarchy or in each cgroup v1 hierarchy (memory, cpu, cpuacct, pids).

The system is probed once, in :func:`open_manager`; a test then costs a mkdir,
a few writes and an rmdir per hierarchy on paths worked out in advance.
:meth:`SandboxCgroup.attach_self` runs in a child forked from a possibly
multi-threaded pytest (an xdist worker), so it only calls ``os.open``,
``os.write`` and ``os.close`` on byte paths computed before the fork.

A session whose pytest died without cleaning up is removed by the next one
(:func:`remove_stale`), under a per-user file lock that also serialises the
one-time preparation of a cgroup2 parent that several pytest processes share.
Every failure names the step, the path and the errno.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pytest_nsbox.kernel import StepError

#: The CFS period, as docker uses it: ``--cpus=0.5`` is 50 ms of CPU time every 100 ms.
CPU_PERIOD_US = 100_000
#: The kernel refuses a smaller quota, so a tinier cpu limit gets this one.
MIN_CPU_QUOTA_US = 1_000
#: What a test's cgroup needs, in the names both cgroup versions use.
CONTROLLERS = ("memory", "cpu", "pids")
#: The cgroup v1 hierarchies used; cpuacct (the CPU time counter) only where mounted.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
SESSION_PREFIX = "nsbox-"
#: Where the processes of a cgroup2 parent go so that it may enable controllers.
LEAF_NAME = "nsbox.leaf"
#: How to get a cgroup of one's own on a systemd host, the fix CgroupUnavailable names.
DELEGATION_FIX = "systemd-run --user --scope -p Delegate=yes pytest ..."

KILL_TIMEOUT = 5.0
RMDIR_TIMEOUT = 2.0
LOCK_TIMEOUT = 60.0
_ENABLE = " ".join(f"+{c}" for c in CONTROLLERS)
_ENABLE_ATTEMPTS = 5
_SESSION_NAME = re.compile(rf"{SESSION_PREFIX}(\d+)(?:-\d+)?")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_ATTACH_FLAGS = os.O_WRONLY | os.O_CLOEXEC
_COUNTER_READ = 65536  # bytes per pread: a counter file's whole text


@dataclass(frozen=True)
class Limits:
    """What one test may use; None leaves a resource unlimited."""

    memory: int | None = None  # bytes
    cpu: float | None = None  # CPUs, like docker --cpus
    pids: int | None = None  # tasks (processes and threads)


@dataclass(frozen=True)
class Usage:
    """What the kernel counted for one test's cgroup; None where this kernel lacks the counter."""

    memory_peak: int | None  # bytes: v2 memory.peak, v1 memory.max_usage_in_bytes
    cpu_seconds: float | None  # v2 cpu.stat usage_usec, v1 cpuacct.usage
    nr_periods: int | None  # CFS periods with runnable tasks (cpu.stat)
    nr_throttled: int | None  # of those, periods that ran out of quota
    throttled_seconds: float | None  # v2 cpu.stat throttled_usec, v1 throttled_time
    oom_kills: int  # processes the OOM killer took (memory.events / memory.oom_control)
    memory_max_hits: int  # charges refused at the limit (v2 memory.events max, v1 failcnt)
    pids_max_hits: int  # forks refused by pids.max (pids.events max)
    pids_peak: int | None  # most tasks at once (pids.peak)


class CgroupUnavailable(Exception):
    """No cgroup can take the tests' limits here; the message says what is missing and the fix."""


class CgroupError(StepError):
    """A cgroup step failed; the message names the step, the path and the errno."""


# -- the kernel's files -------------------------------------------------------


def _read(path: str) -> str:
    """A cgroup or proc file, whole (cgroup.procs can span several reads)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"read {path}", exc.errno or errno.EIO) from None
    return b"".join(chunks).decode()


def _keyed(text: str) -> dict[str, int]:
    """The ``key value`` lines of memory.events, cpu.stat, pids.events, memory.oom_control."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def _write(path: str, value: str) -> None:
    """One write(2): cgroupfs takes each write as one whole setting or command."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        step = f"write {os.path.basename(path)}={value} to {os.path.dirname(path)}"
        raise CgroupError(step, exc.errno or errno.EIO) from None


def _mkdir(path: str) -> None:
    """Create a cgroup; the kernel fills the directory with its interface files."""
    try:
        os.mkdir(path)
    except OSError as exc:
        raise CgroupError(f"mkdir {path}", exc.errno or errno.EIO) from None


def _rmdir(path: str) -> bool:
    """Remove a cgroup; False if it was already gone.

    EBUSY means child cgroups (a test may make its own inside its cgroup: they
    are purged once) or tasks killed a moment ago that are still exiting (v1:
    with an OOM being handled): that is retried with a short, bounded backoff.
    """
    deadline = time.monotonic() + RMDIR_TIMEOUT
    delay = 0.0005
    children_purged = False
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"rmdir {path}", exc.errno or errno.EIO) from None
        if not children_purged:
            children_purged = True
            for name in _subdirs(path):
                _purge(f"{path}/{name}")
            continue
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _subdirs(path: str) -> list[str]:
    """The names of the child cgroups of ``path``; none if it is gone."""
    try:
        with os.scandir(path) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CgroupError(f"list {path}", exc.errno or errno.EIO) from None


def _procs(procs_files: Iterable[str]) -> set[int]:
    """The live processes listed in cgroup.procs files (zombies are not listed).

    A cgroup that is gone holds nothing: killing and purging stay idempotent.
    """
    pids: set[int] = set()
    for path in procs_files:
        try:
            pids.update(int(pid) for pid in _read(path).split())
        except CgroupError as exc:
            if exc.errno != errno.ENOENT:
                raise
    return pids


def _kill_all(procs_files: Sequence[str], kill_file: str | None) -> int:
    """SIGKILL every process in a cgroup and wait until it is empty; how many were found.

    ``cgroup.kill`` (cgroup2, Linux 5.14+) kills the whole cgroup at once, forks
    in flight included. Without it each listed pid is signalled, again and again
    until the listing stays empty, which also catches children forked meanwhile.
    """
    found: set[int] = set()
    deadline = time.monotonic() + KILL_TIMEOUT
    delay = 0.0005
    while pids := _procs(procs_files):
        if time.monotonic() > deadline:
            where = ", ".join(os.path.dirname(path) for path in procs_files)
            left = " ".join(str(pid) for pid in sorted(pids)[:10])
            raise CgroupError(
                f"kill the processes in {where}",
                errno.EBUSY,
                f"{len(pids)} still there after {KILL_TIMEOUT:g} s: {left}",
            )
        found |= pids
        if kill_file is not None:
            _write(kill_file, "1")
        else:
            for pid in pids:
                _signal_kill(pid)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return len(found)


def _signal_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited between the listing and the signal
    except OSError as exc:
        raise CgroupError(f"kill -KILL {pid}", exc.errno or errno.EIO) from None


def _purge(top: str) -> bool:
    """Kill everything in a cgroup tree, top-down, and remove it depth-first.

    False if ``top`` did not exist.
    """
    if not os.path.isdir(top):
        return False
    kill_file = f"{top}/cgroup.kill"  # cgroup2: takes the whole subtree at once
    _kill_all((f"{top}/cgroup.procs",), kill_file if os.path.exists(kill_file) else None)
    for name in _subdirs(top):
        _purge(f"{top}/{name}")
    _rmdir(top)
    return True


# -- where this process's cgroups are -----------------------------------------


@dataclass(frozen=True)
class _Mount:
    root: str  # the part of the cgroup tree that is mounted
    point: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]  # super options: a v1 mount's controllers are among them


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts(mountinfo: str) -> list[_Mount]:
    """The cgroup and cgroup2 mounts in /proc/self/mountinfo text."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        fstype = fields[sep + 1]
        if fstype in ("cgroup", "cgroup2"):
            options = frozenset(fields[sep + 3].split(","))
            mounts.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), fstype, options))
    return mounts


def _memberships(proc_cgroup: str) -> dict[str, str]:
    """Controller -> this process's cgroup, from /proc/self/cgroup; ``""`` is the cgroup2 line."""
    paths = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def _dir_in(mount: _Mount, path: str) -> str | None:
    """Where cgroup ``path`` appears below ``mount``; None if the mount shows another subtree."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    return os.path.normpath(mount.point + path[len(root) :])


def _own_v2_dir(mounts: Sequence[_Mount], memberships: dict[str, str]) -> str | None:
    """This process's cgroup2 directory, or the parent of the ``nsbox.leaf`` it was moved to."""
    path = memberships.get("")
    if path is None:
        return None
    for mount in mounts:
        if mount.fstype == "cgroup2" and (found := _dir_in(mount, path)) is not None:
            return os.path.dirname(found) if os.path.basename(found) == LEAF_NAME else found
    return None


def cgroup2_mount_of(path: str) -> tuple[str, bool] | None:
    """(mount point, mounted with ``favordynmods``) of the cgroup2 mount that holds ``path``.

    Moving a process into a cgroup2 cgroup (a write to ``cgroup.procs``)
    takes a lock that every fork and exit on the machine takes too, and the
    first move after a quiet moment waits for an RCU grace period, several
    ms. ``favordynmods`` (Linux 6.0+) keeps that lock's readers on their slow
    path instead: forks and exits cost a little more, and no move waits.
    None if no cgroup2 mount shows ``path``.
    """
    holding = _cgroup2_mounts_holding(path, _cgroup_mounts(_read("/proc/self/mountinfo")))
    if not holding:
        return None
    mount = max(holding, key=lambda m: len(m.point))  # the innermost
    return mount.point, "favordynmods" in mount.options


def _cgroup2_mounts_holding(path: str, mounts: Sequence[_Mount]) -> list[_Mount]:
    """The cgroup2 mounts of ``mounts`` whose tree holds ``path`` (at their point or below)."""
    return [
        mount
        for mount in mounts
        if mount.fstype == "cgroup2"
        and (path == mount.point or path.startswith(mount.point.rstrip("/") + "/"))
    ]


@dataclass(frozen=True)
class V1Hierarchy:
    """One mounted cgroup v1 hierarchy: its controllers (of V1_CONTROLLERS) and our cgroup in it."""

    controllers: tuple[str, ...]
    own_dir: str


def _own_v1_hierarchies(
    mounts: Sequence[_Mount], memberships: dict[str, str]
) -> tuple[list[V1Hierarchy], list[str]]:
    """This process's cgroup in each v1 hierarchy of V1_CONTROLLERS; and the missing required ones.

    Controllers mounted together (``cpu,cpuacct`` on most systems) make one hierarchy.
    """
    hierarchies: list[V1Hierarchy] = []
    missing = []
    for controller in V1_CONTROLLERS:
        if any(controller in h.controllers for h in hierarchies):
            continue
        path = memberships.get(controller)
        found = None
        for mount in mounts:
            if mount.fstype != "cgroup" or controller not in mount.options or path is None:
                continue
            own_dir = _dir_in(mount, path)
            if own_dir is not None:
                together = tuple(c for c in V1_CONTROLLERS if c in mount.options)
                found = V1Hierarchy(together, own_dir)
                break
        if found is not None:
            hierarchies.append(found)
        elif controller in CONTROLLERS:
            missing.append(controller)
    return hierarchies, missing


# -- choosing a version -------------------------------------------------------


def open_manager(cgroup_path: str | None = None) -> CgroupManager:
    """Probe this machine once and open the session's cgroups.

    cgroup2 is used when this process's cgroup (or ``cgroup_path``, the
    ``--nsbox-cgroup`` option) offers memory, cpu and pids; else the v1
    hierarchies, when mounted and writable. Raises CgroupUnavailable otherwise.
    """
    mounts = _cgroup_mounts(_read("/proc/self/mountinfo"))
    memberships = _memberships(_read("/proc/self/cgroup"))
    if cgroup_path is not None:
        base = _checked_option_dir(cgroup_path, mounts)
        _require_delegated(base)
        return CgroupV2Manager(base)
    v2_dir = _own_v2_dir(mounts, memberships)
    v2_missing = list(CONTROLLERS) if v2_dir is None else _v2_missing(v2_dir)
    if v2_dir is not None and not v2_missing:
        _require_delegated(v2_dir)
        return CgroupV2Manager(v2_dir)
    hierarchies, v1_missing = _own_v1_hierarchies(mounts, memberships)
    if not v1_missing:
        _require_writable_v1(hierarchies)
        return CgroupV1Manager(hierarchies)
    v2_text = (
        "no cgroup2 is mounted"
        if v2_dir is None
        else f"cgroup2 {v2_dir} lacks {', '.join(v2_missing)} (cgroup.controllers: "
        f"{_read(f'{v2_dir}/cgroup.controllers').strip() or 'none'})"
    )
    raise CgroupUnavailable(
        f"no cgroup takes memory, cpu and pids limits: {v2_text}, and cgroup v1 has no "
        f"{', '.join(v1_missing)} hierarchy mounted.\nRun pytest in a cgroup2 subtree of its "
        f"own with those controllers: {DELEGATION_FIX}, or pass --nsbox-cgroup=PATH."
    )


def _v2_missing(cgroup_dir: str) -> list[str]:
    """The controllers of CONTROLLERS that the parent of ``cgroup_dir`` does not hand down."""
    available = _read(f"{cgroup_dir}/cgroup.controllers").split()
    return [c for c in CONTROLLERS if c not in available]


def _checked_option_dir(cgroup_path: str, mounts: Sequence[_Mount]) -> str:
    """The --nsbox-cgroup directory, once known to be a cgroup2 directory with the controllers."""
    path = os.path.realpath(cgroup_path)
    on_cgroup2 = bool(_cgroup2_mounts_holding(path, mounts))
    if not on_cgroup2 or not os.path.isfile(f"{path}/cgroup.controllers"):
        raise CgroupUnavailable(
            f"--nsbox-cgroup={cgroup_path} is not a cgroup2 directory.\nPass a directory of "
            f"the cgroup2 tree you may write, e.g. the one of a scope started by {DELEGATION_FIX}"
        )
    missing = _v2_missing(path)
    if missing:
        raise CgroupUnavailable(
            f"--nsbox-cgroup={cgroup_path} lacks the {', '.join(missing)} controller(s).\n"
            "Enable them in its parent's cgroup.subtree_control, or pass a cgroup that has them."
        )
    return path


def _writable(path: str) -> bool:
    """For the effective uid, which the messages name (a read-only mount counts as not)."""
    return os.access(path, os.W_OK, effective_ids=True)


def _require_delegated(base: str) -> None:
    """Usable means we may create children, move processes and enable controllers there."""
    needed = (base, f"{base}/cgroup.procs", f"{base}/cgroup.subtree_control")
    denied = [path for path in needed if not _writable(path)]
    if denied:
        raise CgroupUnavailable(
            f"cgroup v2 {base} is not delegated to uid {os.geteuid()} (cannot write "
            f"{', '.join(denied)}).\nRun pytest in a delegated cgroup: {DELEGATION_FIX}, "
            "or pass --nsbox-cgroup=PATH naming a cgroup2 directory you may write."
        )


def _require_writable_v1(hierarchies: Sequence[V1Hierarchy]) -> None:
    denied = [h.own_dir for h in hierarchies if not _writable(h.own_dir)]
    if not denied:
        return
    if os.geteuid() != 0:
        raise CgroupUnavailable(
            f"cgroup v1 hierarchies need root: {', '.join(denied)} not writable for uid "
            f"{os.geteuid()}.\nRun pytest as root, or on cgroup v2 (boot with "
            f"systemd.unified_cgroup_hierarchy=1) in a delegated cgroup: {DELEGATION_FIX}, "
            "or pass --nsbox-cgroup=PATH."
        )
    raise CgroupUnavailable(
        f"cgroup v1 {', '.join(denied)} not writable even for root (mounted read-only?).\n"
        "Mount /sys/fs/cgroup read-write (docker: --privileged), or use cgroup v2 with "
        "--nsbox-cgroup=PATH."
    )


# -- sessions -----------------------------------------------------------------


@contextmanager
def _locked() -> Iterator[None]:
    """Hold the per-user lock of stale removal and cgroup2 parent preparation.

    A plain ``flock(2)`` on a file in the temp dir, polled until
    ``LOCK_TIMEOUT``: pytest-xdist workers of one run, and other runs, take
    it in turn. Not the filelock package: filelock 4 registers at-fork
    handlers that ran on every fork of the pytest process, about 1 ms per
    sandboxed test on a 2-core VM (measured in the fork-only benchmark row).
    """
    import tempfile  # here: the factory unpickles cgroups but never locks, and starts faster

    path = os.path.join(tempfile.gettempdir(), f"pytest-nsbox-cgroups-{os.geteuid()}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CgroupError(f"lock {path}", exc.errno or errno.EIO) from None
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    detail = f"another pytest held it for {LOCK_TIMEOUT:g} s"
                    raise CgroupError(f"lock {path}", errno.ETIMEDOUT, detail) from None
                time.sleep(0.01)
            except OSError as exc:
                raise CgroupError(f"lock {path}", exc.errno or errno.EIO) from None
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def _alive(pid: int) -> bool:
    """Whether a session's pytest still runs: it exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # cannot tell: leave it
    return state != b"Z"


def remove_stale(parents: Iterable[str]) -> list[str]:
    """Remove the session dirs below ``parents`` whose pytest process is gone.

    ``parents`` are a manager's :attr:`CgroupManager.parents`. A session dir
    ``nsbox-<pid>`` (or ``nsbox-<pid>-<n>``) is stale when that pid no longer
    runs; what is left in it is killed and it is removed depth-first. A dir of
    a live pid is never touched. Returns the removed session dirs.
    """
    with _locked():
        return _remove_stale(parents)


def _remove_stale(parents: Iterable[str]) -> list[str]:
    removed = []
    for parent in parents:
        for name in _subdirs(parent):
            match = _SESSION_NAME.fullmatch(name)
            if match is not None and not _alive(int(match.group(1))):
                path = f"{parent}/{name}"
                if _purge(path):
                    removed.append(path)
    return removed


def _make_session_dirs(parents: Sequence[str]) -> tuple[str, ...]:
    """mkdir ``nsbox-<pid>`` in every parent.

    The name is taken when this process already has an open manager, or a dead
    process with the same pid left one behind (it is stale, but its pid runs:
    us); then ``nsbox-<pid>-1``, ``-2``... is used.
    """
    pid = os.getpid()
    attempt = 0
    while True:
        name = f"{SESSION_PREFIX}{pid}" + (f"-{attempt}" if attempt else "")
        made: list[str] = []
        try:
            for parent in parents:
                _mkdir(f"{parent}/{name}")
                made.append(f"{parent}/{name}")
        except CgroupError as exc:
            for path in made:
                _rmdir(path)
            if exc.errno != errno.EEXIST:
                raise
            attempt += 1
            continue
        return tuple(made)


def _cpu_quota_us(cpu: float) -> int:
    return max(round(cpu * CPU_PERIOD_US), MIN_CPU_QUOTA_US)


class SandboxCgroup(ABC):
    """One test's cgroup: a ``t<N>`` directory in each hierarchy (one for cgroup2)."""

    limits: Limits
    paths: tuple[str, ...]

    def __init__(
        self,
        limits: Limits,
        paths: tuple[str, ...],
        settings: tuple[tuple[str, str], ...],
        kill_file: str | None,
        attach_file: str = "cgroup.procs",
    ) -> None:
        self.limits = limits
        self.paths = paths
        self.settings = settings
        self._procs_files = tuple(f"{path}/cgroup.procs" for path in paths)
        self._attach_file = attach_file
        self._attach_targets = tuple(os.fsencode(f"{path}/{attach_file}") for path in paths)
        self._kill_file = kill_file
        self._counters: dict[str, int] = {}  # counter file -> the descriptor init opened
        self._birth_fd: int | None = None  # init's descriptor of birth_directory()

    def make(self) -> None:
        """mkdir the cgroup in every hierarchy and write its limits; undone if a step fails.

        The sandbox's init calls it while it builds the sandbox, so that the
        pytest process only plans a test's cgroup (:meth:`CgroupManager.plan`).
        """
        made = []
        try:
            for path in self.paths:
                _mkdir(path)
                made.append(path)
            for path, value in self.settings:
                _write(path, value)
        except BaseException:
            for path in made:
                with contextlib.suppress(CgroupError):
                    _rmdir(path)
            raise

    def attach_self(self) -> None:
        """Move the calling process into the cgroup: call it in the forked child.

        Async-signal-safe in spirit: no locks, no logging, only os.open,
        os.write and os.close on paths encoded before the fork.
        """
        for target in self._attach_targets:
            try:
                fd = os.open(target, _ATTACH_FLAGS)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            except OSError as exc:
                where = os.fsdecode(os.path.dirname(target))
                raise CgroupError(
                    f"attach: write {self._attach_file}=0 to {where}", exc.errno or errno.EIO
                ) from None

    @abstractmethod
    def _tasks_file(self) -> str:
        """The file :meth:`task_count` reads (pids.current)."""

    @abstractmethod
    def _usage_files(self) -> tuple[str, ...]:
        """The files :meth:`usage` reads, only those this kernel has; their names are distinct."""

    def counter_files(self) -> tuple[str, ...]:
        """Every file that :meth:`task_count` and :meth:`usage` read."""
        return (self._tasks_file(), *self._usage_files())

    def birth_directory(self) -> str | None:
        """The cgroup2 directory a test process can be cloned into; v1 has none.

        See :func:`pytest_nsbox.kernel.fork_into_cgroup`.
        """
        return None

    def descriptor_paths(self) -> tuple[str, ...]:
        """What init opens for pytest: the counter files, then the birth directory if any."""
        birth = self.birth_directory()
        return self.counter_files() + ((birth,) if birth is not None else ())

    def open_counters(self) -> list[int]:
        """In init, once the cgroup is made: a read-only descriptor of each descriptor path.

        Sent to pytest, which reads the counters through them after the
        test (:meth:`use_counters`) and clones the test into the directory.
        The first open of each file of a cgroup just made costs its lookup
        (a dentry and an inode, about 20 us), which is off the test's path
        in init and on it in pytest.
        """
        fds: list[int] = []
        for path in self.descriptor_paths():
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                raise CgroupError(f"open {path}", exc.errno or errno.EIO) from None
        return fds

    def use_counters(self, fds: Sequence[int]) -> None:
        """In pytest: read the counters through ``fds``, init's :meth:`open_counters`."""
        counters = self.counter_files()
        self._counters = dict(zip(counters, fds[: len(counters)], strict=True))
        birth = fds[len(counters) :]
        self._birth_fd = birth[0] if birth else None

    @property
    def birth_fd(self) -> int | None:
        """Init's descriptor of :meth:`birth_directory`, once pytest has it."""
        return self._birth_fd

    def counter_descriptors(self) -> tuple[int, ...]:
        """Every descriptor of :meth:`use_counters` that pytest holds."""
        own = tuple(self._counters.values())
        return own if self._birth_fd is None else (*own, self._birth_fd)

    def close_counters(self) -> None:
        """Close the descriptors of :meth:`use_counters`; twice is fine."""
        for fd in self.counter_descriptors():
            os.close(fd)
        self._counters, self._birth_fd = {}, None

    def _read(self, path: str) -> str:
        """A counter file: through init's descriptor if there is one, else by its path.

        Once the cgroup is removed, a descriptor reads ENODEV (a path ENOENT).
        """
        fd = self._counters.get(path)
        if fd is None:
            return _read(path)
        text = b""
        try:
            while chunk := os.pread(fd, _COUNTER_READ, len(text)):
                text += chunk
                if len(chunk) < _COUNTER_READ:
                    break
        except OSError as exc:
            raise CgroupError(f"read {path}", exc.errno or errno.EIO) from None
        return text.decode()

    def _usage_texts(self) -> dict[str, str]:
        """Each file of :meth:`_usage_files`, by its name."""
        return {os.path.basename(path): self._read(path) for path in self._usage_files()}

    def task_count(self) -> int:
        """How many tasks the cgroup and the cgroups a test made below it hold (pids.current)."""
        return int(self._read(self._tasks_file()))

    @abstractmethod
    def usage(self) -> Usage:
        """The kernel's counters; read them after kill() and before remove()."""

    def kill(self) -> int:
        """SIGKILL every process still in the cgroup and wait (bounded) until it is empty.

        Returns how many processes were found.
        """
        return _kill_all(self._procs_files, self._kill_file)

    def remove_if_empty(self) -> bool:
        """rmdir the cgroup in every hierarchy if nothing is in it; True if it is gone."""
        for path in self.paths:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError:
                return False
        return True

    def remove(self) -> None:
        """rmdir the cgroup in every hierarchy; removing it twice is fine."""
        for path in self.paths:
            _rmdir(path)


class CgroupManager(ABC):
    """The cgroups of one pytest process: its session dir(s) and the tests' cgroups in them."""

    version: int
    #: Where session dirs are made: this process's cgroup in each hierarchy (cgroup2: one).
    parents: tuple[str, ...]
    session_dirs: tuple[str, ...]

    @abstractmethod
    def describe(self) -> str:
        """One line for the report header."""

    @abstractmethod
    def plan(self, limits: Limits) -> SandboxCgroup:
        """The next test's cgroup with these limits: named and set, not made yet."""

    def create(self, limits: Limits) -> SandboxCgroup:
        """A new cgroup with these limits, made now."""
        cgroup = self.plan(limits)
        cgroup.make()
        return cgroup

    def close(self) -> None:
        """Kill what is left and remove the session dir(s); closing twice is fine."""
        for session in self.session_dirs:
            _purge(session)


# -- cgroup v2 ----------------------------------------------------------------


def _enable_controllers(base: str) -> None:
    """Let ``base`` hand memory, cpu and pids to its children.

    cgroup2's no-internal-processes rule: a cgroup with processes cannot
    enable controllers for its children (the root cgroup excepted: it has no
    ``cgroup.type``). So the processes in ``base`` (this pytest, its xdist
    siblings, the shell of a systemd-run scope) first move to the leaf
    ``nsbox.leaf``. A pid that appears meanwhile makes the kernel answer EBUSY:
    the move is repeated a few times.
    """
    subtree_control = f"{base}/cgroup.subtree_control"
    if set(CONTROLLERS) <= set(_read(subtree_control).split()):
        return
    is_root = not os.path.exists(f"{base}/cgroup.type")
    for attempt in range(_ENABLE_ATTEMPTS):
        if not is_root:
            _evacuate(base)
        try:
            _write(subtree_control, _ENABLE)
            return
        except CgroupError as exc:
            if exc.errno != errno.EBUSY or attempt == _ENABLE_ATTEMPTS - 1:
                raise


def _evacuate(base: str) -> None:
    """Move every process of ``base`` into ``base/nsbox.leaf``."""
    pids = _read(f"{base}/cgroup.procs").split()
    if not pids:
        return
    leaf = f"{base}/{LEAF_NAME}"
    if not os.path.isdir(leaf):
        _mkdir(leaf)
    for pid in pids:
        try:
            _write(f"{leaf}/cgroup.procs", pid)
        except CgroupError as exc:
            if exc.errno != errno.ESRCH:  # ESRCH: it exited meanwhile
                raise


@dataclass(frozen=True)
class _V2Files:
    """Which optional interface files this kernel has, seen once in the session dir."""

    swap_max: bool  # memory.swap.max: needs swap accounting
    memory_peak: bool  # Linux 5.19+
    pids_peak: bool  # Linux 6.1+
    kill: bool  # cgroup.kill, Linux 5.14+


class CgroupV2Manager(CgroupManager):
    """Sessions in one cgroup2 directory, ``base``.

    ``base`` is this process's cgroup, the parent of the ``nsbox.leaf`` it was
    moved to, or ``--nsbox-cgroup``. Nothing else is probed here, so tests may
    pass a directory laid out like a cgroup2 one.
    """

    version = 2

    def __init__(self, base: str) -> None:
        with _locked():
            _enable_controllers(base)
            _remove_stale((base,))
            (session,) = _make_session_dirs((base,))
            try:
                _write(f"{session}/cgroup.subtree_control", _ENABLE)
            except CgroupError:
                _rmdir(session)
                raise
        self.parents = (base,)
        self.session_dirs = (session,)
        self._session = session
        self._files = _V2Files(
            swap_max=os.path.exists(f"{session}/memory.swap.max"),
            memory_peak=os.path.exists(f"{session}/memory.peak"),
            pids_peak=os.path.exists(f"{session}/pids.peak"),
            kill=os.path.exists(f"{session}/cgroup.kill"),
        )
        self._numbers = itertools.count(1)

    def describe(self) -> str:
        return f"cgroup v2 ({', '.join(CONTROLLERS)}) in {self._session}"

    def plan(self, limits: Limits) -> SandboxCgroup:
        path = f"{self._session}/t{next(self._numbers)}"
        settings = tuple((f"{path}/{name}", value) for name, value in self._settings(limits))
        return _SandboxV2(limits, path, settings, self._files)

    def _settings(self, limits: Limits) -> list[tuple[str, str]]:
        # oom.group: an OOM kill takes the whole test, not one process of it,
        # so the outcome never depends on which process the kernel picked.
        settings = [("memory.oom.group", "1")]
        if limits.memory is not None:
            settings.append(("memory.max", str(limits.memory)))
            if self._files.swap_max:  # no swapping instead of OOM: the same outcome every run
                settings.append(("memory.swap.max", "0"))
        if limits.cpu is not None:
            settings.append(("cpu.max", f"{_cpu_quota_us(limits.cpu)} {CPU_PERIOD_US}"))
        if limits.pids is not None:
            settings.append(("pids.max", str(limits.pids)))
        return settings


class _SandboxV2(SandboxCgroup):
    def __init__(
        self, limits: Limits, path: str, settings: tuple[tuple[str, str], ...], files: _V2Files
    ) -> None:
        kill_file = f"{path}/cgroup.kill" if files.kill else None
        super().__init__(limits, (path,), settings, kill_file)
        self._files = files

    def birth_directory(self) -> str:
        return self.paths[0]

    def _tasks_file(self) -> str:
        return f"{self.paths[0]}/pids.current"

    def _usage_files(self) -> tuple[str, ...]:
        (path,) = self.paths
        optional = {"memory.peak": self._files.memory_peak, "pids.peak": self._files.pids_peak}
        names = ["memory.events", "cpu.stat", "pids.events"]
        names += [name for name, present in optional.items() if present]
        return tuple(f"{path}/{name}" for name in names)

    def usage(self) -> Usage:
        text = self._usage_texts()
        memory = _keyed(text["memory.events"])
        cpu = _keyed(text["cpu.stat"])
        pids = _keyed(text["pids.events"])
        usage_usec = cpu.get("usage_usec")
        throttled_usec = cpu.get("throttled_usec")
        return Usage(
            memory_peak=int(text["memory.peak"]) if "memory.peak" in text else None,
            cpu_seconds=None if usage_usec is None else usage_usec / 1e6,
            nr_periods=cpu.get("nr_periods"),
            nr_throttled=cpu.get("nr_throttled"),
            throttled_seconds=None if throttled_usec is None else throttled_usec / 1e6,
            oom_kills=memory.get("oom_kill", 0),
            memory_max_hits=memory.get("max", 0),
            pids_max_hits=pids.get("max", 0),
            pids_peak=int(text["pids.peak"]) if "pids.peak" in text else None,
        )


# -- cgroup v1 ----------------------------------------------------------------


@dataclass(frozen=True)
class _V1Layout:
    """Which hierarchy (index into ``paths``) holds each controller, and the optional files."""

    memory: int
    cpu: int
    cpuacct: int | None
    pids: int
    memsw: bool  # memory.memsw.*: needs swap accounting
    pids_peak: bool


class CgroupV1Manager(CgroupManager):
    """Sessions in each cgroup v1 hierarchy (memory, cpu, cpuacct where mounted, pids)."""

    version = 1

    def __init__(self, hierarchies: Sequence[V1Hierarchy]) -> None:
        self.hierarchies = tuple(hierarchies)
        self.parents = tuple(h.own_dir for h in self.hierarchies)
        with _locked():
            _remove_stale(self.parents)
            self.session_dirs = _make_session_dirs(self.parents)
        index = {c: i for i, h in enumerate(self.hierarchies) for c in h.controllers}
        memory, pids = self.session_dirs[index["memory"]], self.session_dirs[index["pids"]]
        try:
            # Children copy their parent's swappiness: set once here, not per test.
            swappiness = f"{memory}/memory.swappiness"
            if _writable(swappiness):
                _write(swappiness, "0")
        except CgroupError:
            self.close()
            raise
        self._layout = _V1Layout(
            memory=index["memory"],
            cpu=index["cpu"],
            cpuacct=index.get("cpuacct"),
            pids=index["pids"],
            memsw=os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"),
            pids_peak=os.path.exists(f"{pids}/pids.peak"),
        )
        self._numbers = itertools.count(1)

    def describe(self) -> str:
        names = ", ".join(",".join(h.controllers) for h in self.hierarchies)
        return f"cgroup v1 ({names}) in {', '.join(self.session_dirs)}"

    def plan(self, limits: Limits) -> SandboxCgroup:
        name = f"t{next(self._numbers)}"
        paths = tuple(f"{session}/{name}" for session in self.session_dirs)
        return _SandboxV1(limits, paths, tuple(self._settings(paths, limits)), self._layout)

    def _settings(self, paths: tuple[str, ...], limits: Limits) -> list[tuple[str, str]]:
        layout = self._layout
        settings = []
        if limits.memory is not None:
            memory = paths[layout.memory]
            settings.append((f"{memory}/memory.limit_in_bytes", str(limits.memory)))
            if layout.memsw:  # memory+swap equal to memory: no swap, an OOM kill instead
                settings.append((f"{memory}/memory.memsw.limit_in_bytes", str(limits.memory)))
        if limits.cpu is not None:
            cpu = paths[layout.cpu]
            settings.append((f"{cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US)))
            settings.append((f"{cpu}/cpu.cfs_quota_us", str(_cpu_quota_us(limits.cpu))))
        if limits.pids is not None:
            settings.append((f"{paths[layout.pids]}/pids.max", str(limits.pids)))
        return settings


class _SandboxV1(SandboxCgroup):
    def __init__(
        self,
        limits: Limits,
        paths: tuple[str, ...],
        settings: tuple[tuple[str, str], ...],
        layout: _V1Layout,
    ) -> None:
        # v1 "tasks" moves the writing thread, which in a child just forked is
        # the whole process; "cgroup.procs" would take a global lock whose
        # first write often waits ~10 ms for an RCU grace period (0.13 ms here).
        super().__init__(limits, paths, settings, None, attach_file="tasks")
        self._layout = layout

    def _tasks_file(self) -> str:
        return f"{self.paths[self._layout.pids]}/pids.current"

    def _usage_files(self) -> tuple[str, ...]:
        layout = self._layout
        memory, cpu, pids = (self.paths[i] for i in (layout.memory, layout.cpu, layout.pids))
        files = [
            f"{memory}/memory.oom_control",
            f"{cpu}/cpu.stat",
            f"{pids}/pids.events",
            f"{memory}/memory.max_usage_in_bytes",
            f"{memory}/memory.failcnt",
        ]
        if layout.cpuacct is not None:
            files.append(f"{self.paths[layout.cpuacct]}/cpuacct.usage")
        if layout.memsw:
            files.append(f"{memory}/memory.memsw.failcnt")
        if layout.pids_peak:
            files.append(f"{pids}/pids.peak")
        return tuple(files)

    def usage(self) -> Usage:
        text = self._usage_texts()
        oom = _keyed(text["memory.oom_control"])
        stat = _keyed(text["cpu.stat"])
        events = _keyed(text["pids.events"])
        throttled_ns = stat.get("throttled_time")
        cpuacct_ns = int(text["cpuacct.usage"]) if "cpuacct.usage" in text else None
        return Usage(
            memory_peak=int(text["memory.max_usage_in_bytes"]),
            cpu_seconds=None if cpuacct_ns is None else cpuacct_ns / 1e9,
            nr_periods=stat.get("nr_periods"),
            nr_throttled=stat.get("nr_throttled"),
            throttled_seconds=None if throttled_ns is None else throttled_ns / 1e9,
            oom_kills=oom.get("oom_kill", 0),
            memory_max_hits=_memory_max_hits(text),
            pids_max_hits=events.get("max", 0),
            pids_peak=int(text["pids.peak"]) if "pids.peak" in text else None,
        )


def _memory_max_hits(text: dict[str, str]) -> int:
    """cgroup v1's failed charges, each counted once by the counter that refused it.

    With memsw at the memory limit the memory+swap counter refuses first;
    recent kernels (6.18, for one) keep no failcnt for it, so there hits go
    uncounted and only the OOM kill tells.
    """
    return int(text["memory.failcnt"]) + int(text.get("memory.memsw.failcnt", "0"))
