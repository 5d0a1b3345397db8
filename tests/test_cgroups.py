"""The per-test cgroups on the real kernel: limits bite, counters count, nothing is left behind.

The behaviour tests run on whatever cgroup version this machine has: cgroup v1 on our
hybrid hosts, cgroup v2 in the QEMU guest of ``scripts/cgroup2-vm`` (as root and as a
delegated user). The v2-only tests skip on a v1 host; the guest sets
NSBOX_EXPECT_CGROUP_V2=1, which turns that skip into a failure. A fake cgroup2-shaped
directory covers the v2 logic a v1 host cannot reach: the exact values written and the
parsing of the counters.

The init process of some machines reaps no orphans, so the tests make pytest a child
subreaper while they run and reap the grandchildren they killed themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from conftest import PlainUser, project_spec, run_in_fork_as, run_one_test_process

from pytest_nsbox import cgroups, doctor, kernel
from pytest_nsbox.cgroups import CgroupError, CgroupUnavailable, Limits, Usage
from pytest_nsbox.sandbox import reap_exited

if TYPE_CHECKING:
    from pytest_nsbox.factory import PreparedSandbox

MiB = 1024 * 1024
EXPECT_V2 = os.environ.get("NSBOX_EXPECT_CGROUP_V2") == "1"
V2_SKIP = (
    "cgroup2 here offers no memory/cpu/pids controllers (a cgroup v1 host); the v2 tests run "
    "for real in the guest of scripts/cgroup2-vm"
)
PR_SET_CHILD_SUBREAPER = 36
_SESSION = re.compile(r"nsbox-(\d+)(?:-\d+)?")
#: This pytest and the processes the tests start whose pids name session dirs.
OUR_PIDS = {os.getpid()}

T = TypeVar("T")

ALLOCATE_200MB = "chunks = [b'x' * (1 << 20) for _ in range(200)]"
SPIN_ONE_SECOND = """
import sys, time
# Join the cgroup only now: interpreter start-up at 0.1 CPU takes a minute
# or more in the QEMU guest, where Python is ~20x slower.
for procs in sys.argv[1:]:
    with open(procs, "w") as f:
        f.write("0")
wall, cpu = time.monotonic(), time.process_time()
while time.monotonic() - wall < 1.0:
    pass
print(time.process_time() - cpu)
"""
FORK_64 = """
import os, time
refused = 0
for _ in range(64):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(120)
        os._exit(0)
print(refused, flush=True)
time.sleep(120)
"""
# A parent with two children, each with a grandchild: five processes.
PROCESS_TREE = """
import subprocess, sys, time
child = "import subprocess, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"
kids = [subprocess.Popen([sys.executable, "-c", child]) for _ in range(2)]
time.sleep(120)
"""


# -- helpers ------------------------------------------------------------------


def read(path: str | Path) -> str:
    with open(path) as file:
        return file.read().strip()


def write(path: str | Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while (result := condition()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return result


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None when the process is gone."""
    try:
        stat = read(f"/proc/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()


def process_state(pid: int) -> str | None:
    """The state letter of a process (Z: a zombie), None when it is gone."""
    fields = proc_stat(pid)
    return None if fields is None else fields[0]


def pid_running(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def parent_of(pid: int) -> int | None:
    fields = proc_stat(pid)
    return None if fields is None else int(fields[1])


def set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(int(on)), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def cgroup_mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            left, _, right = line.partition(" - ")
            if right.split()[0] in ("cgroup", "cgroup2"):
                points.append(left.split()[4])
    return points


def own_cgroup2_dir() -> str:
    """This process's cgroup2 directory, worked out without the module under test."""
    with open("/proc/self/cgroup") as membership:
        path = next(line.strip()[3:] for line in membership if line.startswith("0::"))
    with open("/proc/self/mountinfo") as mountinfo:
        point = next(
            line.split()[4] for line in mountinfo if line.partition(" - ")[2].startswith("cgroup2")
        )
    return os.path.normpath(point + path)


def not_ours(path: str) -> bool:
    """Other pytest processes' sessions (other people run tests on this machine too), and a
    leaf that holds processes (pytest itself, moved there), are not this module's leftovers."""
    for part in path.split("/"):
        match = _SESSION.fullmatch(part)
        if match and int(match.group(1)) not in OUR_PIDS:
            return True
    return os.path.basename(path) == cgroups.LEAF_NAME and bool(read(f"{path}/cgroup.procs"))


def nsbox_cgroups() -> set[str]:
    """Every cgroup directory with 'nsbox' in its path, in every cgroup hierarchy."""
    found = set()
    for point in cgroup_mount_points():
        for dirpath, dirnames, _ in os.walk(point):
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if "nsbox" in path[len(point) :] and not not_ours(path):
                    found.add(path)
    return found


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the module, no cgroup it made may remain, in any hierarchy."""
    before = nsbox_cgroups()
    yield
    left = nsbox_cgroups() - before
    assert not left, f"cgroups left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def manager(nothing_left_behind: None) -> Iterator[cgroups.CgroupManager]:
    try:
        opened = cgroups.open_manager()
    except CgroupUnavailable as exc:
        if EXPECT_V2 or os.geteuid() == 0:
            pytest.fail(f"no usable cgroup: {exc}")
        pytest.skip(f"no usable cgroup: {exc}")
    yield opened
    opened.close()


@pytest.fixture
def v2_manager(manager: cgroups.CgroupManager) -> cgroups.CgroupManager:
    if manager.version != 2:
        if EXPECT_V2:
            pytest.fail(f"NSBOX_EXPECT_CGROUP_V2=1 but open_manager() chose {manager.describe()}")
        pytest.skip(V2_SKIP)
    return manager


@pytest.fixture
def v1_manager(manager: cgroups.CgroupManager) -> cgroups.CgroupManager:
    if manager.version != 1:
        pytest.skip(f"cgroup v1 only; this machine has {manager.describe()}")
    return manager


class Sandboxes:
    """The test's cgroups, and the processes seen in them (to reap once killed)."""

    def __init__(self, manager: cgroups.CgroupManager) -> None:
        self.manager = manager
        self.made: list[cgroups.SandboxCgroup] = []
        self.seen: set[int] = set()

    def create(self, limits: Limits) -> cgroups.SandboxCgroup:
        cgroup = self.manager.create(limits)
        self.made.append(cgroup)
        return cgroup

    def procs(self, cgroup: cgroups.SandboxCgroup) -> set[int]:
        pids = {int(pid) for path in cgroup.paths for pid in read(f"{path}/cgroup.procs").split()}
        self.seen |= pids
        return pids


@pytest.fixture
def sandboxes(manager: cgroups.CgroupManager) -> Iterator[Sandboxes]:
    set_subreaper(True)
    made = Sandboxes(manager)
    try:
        yield made
    finally:
        for cgroup in made.made:
            if os.path.isdir(cgroup.paths[0]):
                cgroup.kill()
                cgroup.remove()
        set_subreaper(False)
        for pid in made.seen:
            if parent_of(pid) == os.getpid() and pid_running(pid):
                os.kill(pid, signal.SIGKILL)  # only when a failed test left it running
            with contextlib.suppress(ChildProcessError):  # reaped by its Popen, or not ours
                os.waitpid(pid, 0)
        reap_exited()  # orphans adopted unseen (they exited before a listing)


def start(
    cgroup: cgroups.SandboxCgroup, code: str, stdout: int | None = None
) -> subprocess.Popen[str]:
    """A Python process that joins the cgroup between fork and exec, as the sandbox does."""
    return subprocess.Popen(
        [sys.executable, "-c", code], preexec_fn=cgroup.attach_self, stdout=stdout, text=True
    )


# -- the limits, on the real kernel (v1 here, v2 in the guest) ------------------


def test_memory_limit_ends_in_an_oom_kill(sandboxes: Sandboxes) -> None:
    limit = 64 * MiB
    cgroup = sandboxes.create(Limits(memory=limit))
    proc = start(cgroup, ALLOCATE_200MB)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    usage = cgroup.usage()
    assert usage.oom_kills >= 1
    assert usage.memory_peak is not None
    assert 0.8 * limit <= usage.memory_peak <= limit


def test_cpu_limit_throttles(sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits(cpu=0.1))
    procs_files = [f"{path}/cgroup.procs" for path in cgroup.paths]
    proc = subprocess.Popen(
        [sys.executable, "-c", SPIN_ONE_SECOND, *procs_files], stdout=subprocess.PIPE, text=True
    )
    sandboxes.seen.add(proc.pid)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    spun = float(out)
    usage = cgroup.usage()
    assert spun < 0.5, f"one second of spinning at 0.1 CPUs got {spun:.2f} s of CPU"
    assert usage.nr_periods is not None and usage.nr_periods >= 5
    assert usage.nr_throttled is not None and usage.nr_throttled > 0
    assert usage.throttled_seconds is not None and usage.throttled_seconds > 0
    assert usage.cpu_seconds is not None and usage.cpu_seconds >= 0.9 * spun


def test_pids_limit_refuses_forks(sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits(pids=16))
    proc = start(cgroup, FORK_64, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    refused = int(proc.stdout.readline())
    assert refused > 0
    assert len(sandboxes.procs(cgroup)) == 16
    usage = cgroup.usage()
    assert usage.pids_max_hits > 0
    assert usage.pids_peak in (None, 16)
    assert cgroup.kill() == 16
    assert sandboxes.procs(cgroup) == set()
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_counters_read_the_same_through_inits_descriptors(
    sandboxes: Sandboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Init opens the counter files; pytest reads them through those fds, no path opened."""
    cgroup = sandboxes.create(Limits(memory=64 * MiB, cpu=0.5, pids=16))
    proc = start(cgroup, FORK_64, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert int(proc.stdout.readline()) > 0  # forks refused: pids.events counts them
    cgroup.kill()
    proc.wait(timeout=30)
    by_path = cgroup.usage(), cgroup.task_count()
    cgroup.use_counters(cgroup.open_counters())
    descriptors = cgroup.counter_descriptors()
    assert len(descriptors) == len(cgroup.descriptor_paths()) >= 6
    birth = cgroup.birth_directory()
    assert (cgroup.birth_fd is None) == (birth is None)  # v2's directory, for the clone
    if cgroup.birth_fd is not None:
        assert os.path.samestat(os.fstat(cgroup.birth_fd), os.stat(cgroup.paths[0]))
    try:

        def no_path(path: str) -> str:
            raise AssertionError(f"opened {path} by its path")

        with monkeypatch.context() as patch:
            patch.setattr(cgroups, "_read", no_path)
            assert (cgroup.usage(), cgroup.task_count()) == by_path
        assert by_path[0].pids_max_hits > 0
        reap_exited()  # the killed forks, adopted here: then the cgroup can go
        cgroup.remove()
        with pytest.raises(cgroups.CgroupError, match="ENODEV"):
            cgroup.usage()
    finally:
        cgroup.close_counters()
    assert cgroup.counter_descriptors() == ()
    for fd in descriptors:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_kill_takes_the_whole_process_tree(sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits())
    proc = start(cgroup, PROCESS_TREE)
    pids = wait_for(
        lambda: pids if len(pids := sandboxes.procs(cgroup)) == 5 else None, "five processes"
    )
    assert cgroup.kill() == 5
    assert sandboxes.procs(cgroup) == set()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not [pid for pid in pids if pid_running(pid)]


def test_remove_leaves_no_directory(manager: cgroups.CgroupManager, sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits(memory=64 * MiB, cpu=0.5, pids=16))
    assert len(cgroup.paths) == len(manager.session_dirs)
    assert all(os.path.isdir(path) for path in cgroup.paths)
    cgroup.remove()
    assert not [path for path in cgroup.paths if os.path.exists(path)]
    cgroup.remove()


def test_remove_takes_the_cgroups_a_test_made_inside(sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits(pids=16))
    inner = [f"{path}/inner" for path in cgroup.paths]
    for path in inner:
        os.mkdir(path)

    def join_inner() -> None:
        for path in inner:
            write(f"{path}/cgroup.procs", "0")

    sleeper = subprocess.Popen(["sleep", "120"], preexec_fn=join_inner)
    cgroup.remove()
    assert not [path for path in cgroup.paths if os.path.exists(path)]
    assert sleeper.wait(timeout=30) == -signal.SIGKILL


def test_failed_create_names_the_step_and_cleans_up(manager: cgroups.CgroupManager) -> None:
    with pytest.raises(CgroupError) as info:
        manager.create(Limits(pids=-5))
    assert re.fullmatch(
        r"write pids\.max=-5 to \S+/t\d+ failed: EINVAL \(Invalid argument\)", str(info.value)
    )
    assert info.value.errno == errno.EINVAL
    for session in manager.session_dirs:
        assert not [entry for entry in os.scandir(session) if entry.is_dir()]


def test_attach_failure_names_the_path(
    manager: cgroups.CgroupManager, sandboxes: Sandboxes
) -> None:
    cgroup = sandboxes.create(Limits())
    cgroup.remove()
    with pytest.raises(CgroupError) as info:
        cgroup.attach_self()  # the first write fails, so this process stays where it is
    attach_file = "tasks" if manager.version == 1 else "cgroup.procs"
    assert str(info.value) == (
        f"attach: write {attach_file}=0 to {cgroup.paths[0]} failed: "
        "ENOENT (No such file or directory)"
    )


def test_close_kills_and_removes_the_session(
    manager: cgroups.CgroupManager, sandboxes: Sandboxes
) -> None:
    second = cgroups.open_manager()
    try:
        assert set(second.session_dirs).isdisjoint(manager.session_dirs)
        for session in second.session_dirs:
            assert re.fullmatch(rf"nsbox-{os.getpid()}-\d+", os.path.basename(session))
        busy = second.create(Limits(pids=8))
        second.create(Limits())
        sleeper = subprocess.Popen(["sleep", "120"], preexec_fn=busy.attach_self)
        sandboxes.seen.add(sleeper.pid)
    finally:
        second.close()
    assert not [session for session in second.session_dirs if os.path.exists(session)]
    assert sleeper.wait(timeout=30) == -signal.SIGKILL
    second.close()
    assert all(os.path.isdir(session) for session in manager.session_dirs)


def _open_and_abandon(write_end: int) -> None:
    """In a forked child: open a session, start a process in it, exit without cleaning up."""
    try:
        abandoned = cgroups.open_manager()
        cgroup = abandoned.create(Limits(pids=8))
        sleeper = subprocess.Popen(["sleep", "120"], preexec_fn=cgroup.attach_self)
        report = {"sessions": abandoned.session_dirs, "sleeper": sleeper.pid}
        status = 0
    except BaseException:
        report = {"error": traceback.format_exc()}
        status = 1
    os.write(write_end, json.dumps(report).encode())
    os._exit(status)


def test_remove_stale_removes_a_dead_session(
    manager: cgroups.CgroupManager, sandboxes: Sandboxes
) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _open_and_abandon(write_end)
    OUR_PIDS.add(pid)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert "error" not in report, report.get("error")
    sandboxes.seen.add(report["sleeper"])
    stale = report["sessions"]
    assert all(os.path.isdir(session) for session in stale)

    cgroups.remove_stale(manager.parents)

    assert not [session for session in stale if os.path.exists(session)]
    assert all(os.path.isdir(session) for session in manager.session_dirs)
    _, status = os.waitpid(report["sleeper"], 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_remove_stale_spares_live_pids_only(manager: cgroups.CgroupManager) -> None:
    sleeper = subprocess.Popen(["sleep", "120"])
    OUR_PIDS.add(sleeper.pid)
    owned = [f"{parent}/nsbox-{sleeper.pid}" for parent in manager.parents]
    try:
        for path in owned:
            os.mkdir(path)
        assert not set(owned) & set(cgroups.remove_stale(manager.parents))
        assert all(os.path.isdir(path) for path in owned)
        sleeper.kill()
        wait_for(lambda: process_state(sleeper.pid) == "Z" or None, "the zombie")
        cgroups.remove_stale(manager.parents)
        # A zombie is dead. (Another pytest's remove_stale may have been first: only
        # assert that the dirs are gone, not who removed them.)
        assert not [path for path in owned if os.path.exists(path)]
    finally:
        sleeper.wait()
        for path in owned:
            if os.path.isdir(path):
                os.rmdir(path)


def test_per_test_work_is_only_mkdir_writes_rmdir(
    manager: cgroups.CgroupManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is probed per test: the files opened are the limits written in the new cgroup.

    (Timing is not asserted: in the emulated v2 guest it varies tenfold from run to run.)
    """
    opened: list[str] = []
    real_open = os.open

    def watched_open(path: str, flags: int, mode: int = 0o777, **kwargs: int | None) -> int:
        opened.append(os.fsdecode(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", watched_open)
    cgroup = manager.create(Limits(memory=64 * MiB, cpu=0.5, pids=16))
    cgroup.remove()
    monkeypatch.undo()
    assert opened
    assert all(os.path.dirname(path) in cgroup.paths for path in opened), opened
    names = [os.path.basename(path) for path in opened]
    assert len(names) == len(set(names)), "a file written twice"
    assert set(names) <= {
        "memory.max",
        "memory.swap.max",
        "memory.oom.group",
        "cpu.max",
        "pids.max",
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "cpu.cfs_period_us",
        "cpu.cfs_quota_us",
    }, names


def test_rootless_without_a_delegated_cgroup_names_the_fix(
    manager: cgroups.CgroupManager, request: pytest.FixtureRequest
) -> None:
    if os.geteuid() != 0:
        pytest.skip("becoming the plain user takes root; this run is itself the rootless one")
    plain_user: PlainUser = request.getfixturevalue("plain_user")

    def probe() -> str:
        try:
            opened = cgroups.open_manager()
        except CgroupUnavailable as exc:
            return str(exc)
        opened.close()
        return f"opened {opened.describe()}"

    message = run_in_fork_as(plain_user, probe)
    assert "systemd-run --user --scope -p Delegate=yes" in message
    assert "--nsbox-cgroup=PATH" in message
    assert len(message.splitlines()) == 2
    if manager.version == 1:
        assert message.startswith("cgroup v1 hierarchies need root: ")
    else:
        assert f"is not delegated to uid {plain_user.uid}" in message


# -- cgroup v1 only -----------------------------------------------------------


def test_v1_describe_names_the_hierarchies(v1_manager: cgroups.CgroupManager) -> None:
    text = v1_manager.describe()
    mounted = set()
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fs = line.partition(" - ")[2].split()
            if fs[0] == "cgroup":
                mounted |= set(fs[2].split(",")) & {"memory", "cpu", "cpuacct", "pids"}
    assert mounted >= {"memory", "cpu", "pids"}
    listed = re.fullmatch(r"cgroup v1 \(([a-z, ]+)\) in (.+)", text)
    assert listed, text
    assert set(re.split(r"[, ]+", listed.group(1))) == mounted
    assert listed.group(2).split(", ") == list(v1_manager.session_dirs)


def test_v1_limit_files(v1_manager: cgroups.CgroupManager, sandboxes: Sandboxes) -> None:
    limited = sandboxes.create(Limits(memory=64 * MiB, cpu=0.5, pids=16))
    unlimited = sandboxes.create(Limits())
    values = {}
    defaults = {}
    for name in (
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "memory.swappiness",
        "cpu.cfs_period_us",
        "cpu.cfs_quota_us",
        "pids.max",
    ):
        for path, other in zip(limited.paths, unlimited.paths, strict=True):
            if os.path.exists(f"{path}/{name}"):
                values[name] = read(f"{path}/{name}")
                defaults[name] = read(f"{other}/{name}")
    assert values.pop("memory.memsw.limit_in_bytes", "67108864") == "67108864"
    assert values == {
        "memory.limit_in_bytes": "67108864",
        "memory.swappiness": "0",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "50000",
        "pids.max": "16",
    }
    assert defaults["cpu.cfs_quota_us"] == "-1"
    assert defaults["pids.max"] == "max"
    assert int(defaults["memory.limit_in_bytes"]) > 2**60


# -- cgroup v2 only: skipped on a v1 host, run in the scripts/cgroup2-vm guest ---


def test_v2_describe(v2_manager: cgroups.CgroupManager) -> None:
    (session,) = v2_manager.session_dirs
    assert v2_manager.describe() == f"cgroup v2 (memory, cpu, pids) in {session}"


def test_v2_limit_files(v2_manager: cgroups.CgroupManager, sandboxes: Sandboxes) -> None:
    (limited,) = sandboxes.create(Limits(memory=64 * MiB, cpu=0.5, pids=16)).paths
    (unlimited,) = sandboxes.create(Limits()).paths
    assert read(f"{limited}/memory.max") == "67108864"
    if os.path.exists(f"{limited}/memory.swap.max"):
        assert read(f"{limited}/memory.swap.max") == "0"
        assert read(f"{unlimited}/memory.swap.max") == "max"
    assert read(f"{limited}/memory.oom.group") == "1"
    assert read(f"{limited}/cpu.max") == "50000 100000"
    assert read(f"{limited}/pids.max") == "16"
    assert read(f"{unlimited}/memory.max") == "max"
    assert read(f"{unlimited}/cpu.max") == "max 100000"
    assert read(f"{unlimited}/pids.max") == "max"


def test_v2_oom_kill_takes_the_whole_test(
    v2_manager: cgroups.CgroupManager, sandboxes: Sandboxes
) -> None:
    limit = 64 * MiB
    cgroup = sandboxes.create(Limits(memory=limit))
    parent = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {ALLOCATE_200MB!r}])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = start(cgroup, parent, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    sandboxes.seen.add(int(proc.stdout.readline()))
    # memory.oom.group=1: the sleeping parent goes with the child that ran out.
    assert proc.wait(timeout=120) == -signal.SIGKILL
    usage = cgroup.usage()
    assert usage.oom_kills >= 2
    assert usage.memory_max_hits >= 1
    assert usage.memory_peak is not None and 0.8 * limit <= usage.memory_peak <= limit


def test_v2_kill_uses_cgroup_kill(
    v2_manager: cgroups.CgroupManager, sandboxes: Sandboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    cgroup = sandboxes.create(Limits())
    assert os.path.exists(f"{cgroup.paths[0]}/cgroup.kill")
    proc = start(cgroup, PROCESS_TREE)
    wait_for(lambda: len(sandboxes.procs(cgroup)) == 5 or None, "five processes")

    def one_by_one(pid: int) -> None:
        raise AssertionError(f"signalled {pid} by itself although cgroup.kill exists")

    monkeypatch.setattr(cgroups, "_signal_kill", one_by_one)
    assert cgroup.kill() == 5
    assert sandboxes.procs(cgroup) == set()
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_v2_own_cgroup_can_have_children(v2_manager: cgroups.CgroupManager) -> None:
    """The no-internal-processes rule is met: base has no processes beside its children."""
    (base,) = v2_manager.parents
    own = own_cgroup2_dir()
    assert own in (base, f"{base}/{cgroups.LEAF_NAME}")
    assert {"memory", "cpu", "pids"} <= set(read(f"{base}/cgroup.subtree_control").split())
    if own == base:
        assert not os.path.exists(f"{base}/cgroup.type"), "only the root cgroup may keep processes"
    else:
        assert read(f"{base}/cgroup.procs") == ""


def test_v2_processes_move_to_a_leaf(v2_manager: cgroups.CgroupManager) -> None:
    """--nsbox-cgroup naming a cgroup that holds a process: it moves to nsbox.leaf first."""
    (base,) = v2_manager.parents
    scratch = f"{base}/nsbox-test-{os.getpid()}"
    leaf = f"{scratch}/{cgroups.LEAF_NAME}"
    os.mkdir(scratch)
    sleeper = subprocess.Popen(["sleep", "120"])
    opened = None
    try:
        write(f"{scratch}/cgroup.procs", str(sleeper.pid))
        opened = cgroups.open_manager(cgroup_path=scratch)
        assert opened.parents == (scratch,)
        assert read(f"{leaf}/cgroup.procs").split() == [str(sleeper.pid)]
        assert read(f"{scratch}/cgroup.procs") == ""
        assert {"memory", "cpu", "pids"} <= set(read(f"{scratch}/cgroup.subtree_control").split())
        (path,) = opened.create(Limits(pids=8)).paths
        assert read(f"{path}/pids.max") == "8"
    finally:
        if opened is not None:
            opened.close()
        sleeper.kill()
        sleeper.wait()
        if os.path.isdir(leaf):
            os.rmdir(leaf)
        os.rmdir(scratch)


# -- cloned straight into a cgroup2 cgroup: the host's controller-less cgroup2 too ----

CLONE_CHECK = """
import errno, json, os, signal, sys, threading
from pytest_nsbox import kernel

ran = []
os.register_at_fork(
    before=lambda: ran.append("before"),
    after_in_parent=lambda: ran.append("parent"),
    after_in_child=lambda: ran.append("child"),
)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
target = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
read_end, write_end = os.pipe()
pid = kernel.fork_into_cgroup(target)
if pid == 0:
    with open("/proc/self/cgroup") as membership:
        born_in = next(line.strip()[3:] for line in membership if line.startswith("0::"))
    thread = threading.Thread(target=ran.append, args=("thread",))
    thread.start()
    thread.join()
    mask = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, ()))
    os.write(write_end, json.dumps({"cgroup": born_in, "ran": ran, "mask": mask}).encode())
    os._exit(3)
os.close(write_end)
with os.fdopen(read_end) as reader:
    child = json.loads(reader.read())
_, status = os.waitpid(pid, 0)
try:
    kernel.fork_into_cgroup(os.open("/", os.O_RDONLY | os.O_DIRECTORY))
except OSError as exc:
    refused = errno.errorcode[exc.errno]
forked = os.fork()  # the import lock and the fork hooks are as os.fork left them
if forked == 0:
    os._exit(0)
os.waitpid(forked, 0)
print(json.dumps({
    "child": child,
    "status": os.waitstatus_to_exitcode(status),
    "refused": refused,
    "ran": ran,
    "mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, ())),
}))
"""


@pytest.fixture
def cgroup2_child() -> Iterator[str]:
    """A new cgroup2 directory below this process's own: the host's controller-less
    cgroup2 hierarchy (as root), or the guest's cgroup; removed after the test."""
    try:
        path = os.path.join(own_cgroup2_dir(), f"clone-test-{os.getpid()}")
        os.mkdir(path)
    except (StopIteration, PermissionError) as exc:
        if EXPECT_V2:
            raise
        pytest.skip(f"no cgroup2 directory this user may make one in: {exc!r}")
    yield path
    os.rmdir(path)


def test_fork_into_cgroup_gives_a_child_born_there_as_os_fork_would(cgroup2_child: str) -> None:
    """clone3(CLONE_INTO_CGROUP) from Python: the child is in the cgroup before its first line.

    Otherwise it is os.fork's child: the interpreter's fork hooks ran on each
    side (also when the kernel refused, as os.fork runs them), the child
    can start threads, the signal mask is restored in both, the child's
    exit status comes back, and the parent forks normally after a refusal.
    """
    done = subprocess.run(
        [sys.executable, "-c", CLONE_CHECK, cgroup2_child],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(cgroups.__file__).parents[1])),
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    with open("/proc/self/cgroup") as membership:
        own = next(line.strip()[3:] for line in membership if line.startswith("0::"))
    assert seen["child"]["cgroup"] == os.path.join(own, os.path.basename(cgroup2_child)), seen
    assert seen["child"]["ran"] == ["before", "child", "thread"]
    assert seen["child"]["mask"] == [int(signal.SIGUSR1)]
    assert seen["status"] == 3
    assert seen["refused"] == "EBADF"  # "/" is no cgroup
    assert seen["ran"] == ["before", "parent", "before", "parent", "before", "parent"]
    assert seen["mask"] == [int(signal.SIGUSR1)]
    assert read(f"{cgroup2_child}/cgroup.procs") == ""


class _ReportsCgroup:
    """A test process that writes its cgroup2 membership (/proc/self/cgroup's 0:: line)."""

    def __init__(self, out: int) -> None:
        self.out = out

    def prepare(self) -> None:
        pass

    def run(self) -> None:
        with open("/proc/self/cgroup") as membership:
            line = next(line for line in membership if line.startswith("0::"))
        os.write(self.out, line.strip().encode())


@pytest.mark.parametrize("case", ["one-thread", "two-threads", "refused"])
def test_v2_test_process_is_cloned_into_its_cgroup_while_pytest_has_one_thread(
    v2_manager: cgroups.CgroupManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Under v2 the test process is born in its cgroup; beside another thread, it joins it.

    So it does when the kernel refuses the clone (here: a descriptor of "/"
    given as the cgroup's, EBADF). Either way it runs at the root of its
    cgroup namespace, the test's cgroup. The clones are counted around the
    real call.
    """
    import threading

    from pytest_nsbox import kernel

    clones: list[int] = []
    clone = kernel.fork_into_cgroup

    def counted(cgroup_fd: int) -> int:
        pid = clone(cgroup_fd)
        if pid:
            clones.append(pid)
        return pid

    monkeypatch.setattr(kernel, "fork_into_cgroup", counted)
    spec = project_spec(
        tmp_path, privileged=os.geteuid() == 0, isolate_network=True, list_writes=False
    )

    @contextlib.contextmanager
    def as_the_case_says(prepared: PreparedSandbox) -> Iterator[None]:
        assert prepared.cgroup is not None and prepared.cgroup.birth_fd is not None
        if case == "refused":
            root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.dup2(root, prepared.cgroup.birth_fd, inheritable=False)
            os.close(root)
        stop = threading.Event()
        waiter = threading.Thread(target=stop.wait)
        if case == "two-threads":
            waiter.start()
        try:
            yield
        finally:
            stop.set()
            if waiter.is_alive():
                waiter.join()

    cgroup = v2_manager.plan(Limits(memory=64 * MiB))
    result, reported = run_one_test_process(
        spec, cgroup, _ReportsCgroup, timeout=120, beside=as_the_case_says
    )
    assert result.test_status == 0, result
    assert reported == "0::/"
    assert len(clones) == (1 if case == "one-thread" else 0)


# -- a fake cgroup2 tree: the v2 logic a v1 host cannot reach --------------------

V2_FILES = (
    "cgroup.controllers",
    "cgroup.subtree_control",
    "cgroup.procs",
    "cgroup.type",
    "cgroup.kill",
    "memory.max",
    "memory.swap.max",
    "memory.oom.group",
    "memory.events",
    "memory.peak",
    "cpu.max",
    "cpu.stat",
    "pids.max",
    "pids.events",
    "pids.peak",
)


class FakeCgroup2:
    """A directory laid out like a cgroup2 one; mkdir/rmdir below it act like the kernel's.

    New cgroups get every file of V2_FILES but those in ``missing``, empty, so a
    file holds exactly what was written to it. ``writes`` logs every write.
    """

    def __init__(self, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.base = base
        self.missing: set[str] = set()
        self.writes: list[tuple[str, str]] = []
        real_mkdir, real_write = cgroups._mkdir, cgroups._write

        def mkdir(path: str) -> None:
            real_mkdir(path)
            for name in V2_FILES:
                if name not in self.missing:
                    Path(path, name).touch()

        def rmdir(path: str) -> bool:
            if not os.path.isdir(path):
                return False
            shutil.rmtree(path)
            return True

        def logged_write(path: str, value: str) -> None:
            self.writes.append((os.path.relpath(path, base), value))
            real_write(path, value)

        monkeypatch.setattr(cgroups, "_mkdir", mkdir)
        monkeypatch.setattr(cgroups, "_rmdir", rmdir)
        monkeypatch.setattr(cgroups, "_write", logged_write)
        base.mkdir()
        for name in V2_FILES:
            Path(base, name).touch()
        write(base / "cgroup.controllers", "cpuset cpu io memory hugetlb pids\n")
        write(base / "cgroup.type", "domain\n")


@pytest.fixture
def fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroup2:
    return FakeCgroup2(tmp_path / "cg", monkeypatch)


def test_fake_v2_writes_the_limits_exactly(fake_v2: FakeCgroup2) -> None:
    opened = cgroups.CgroupV2Manager(str(fake_v2.base))
    (session,) = opened.session_dirs
    assert session == f"{fake_v2.base}/nsbox-{os.getpid()}"
    assert read(fake_v2.base / "cgroup.subtree_control") == "+memory +cpu +pids"
    assert read(f"{session}/cgroup.subtree_control") == "+memory +cpu +pids"

    (limited,) = opened.create(Limits(memory=64 * MiB, cpu=0.5, pids=16)).paths
    assert limited == f"{session}/t1"
    assert {
        name: read(f"{limited}/{name}") for name in V2_FILES if name.endswith((".max", ".group"))
    } == {
        "memory.max": "67108864",
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "cpu.max": "50000 100000",
        "pids.max": "16",
    }
    (unlimited,) = opened.create(Limits()).paths
    assert [read(f"{unlimited}/{name}") for name in ("memory.max", "cpu.max", "pids.max")] == [
        "",
        "",
        "",
    ]
    assert read(f"{unlimited}/memory.oom.group") == "1"
    (two,) = opened.create(Limits(cpu=2)).paths
    assert read(f"{two}/cpu.max") == "200000 100000"
    (tiny,) = opened.create(Limits(cpu=0.001)).paths
    assert read(f"{tiny}/cpu.max") == "1000 100000"  # the kernel's smallest quota
    assert opened.describe() == f"cgroup v2 (memory, cpu, pids) in {session}"

    opened.close()
    assert not os.path.exists(session)
    opened.close()


def test_fake_v2_usage_is_parsed(fake_v2: FakeCgroup2) -> None:
    opened = cgroups.CgroupV2Manager(str(fake_v2.base))
    cgroup = opened.create(Limits(memory=64 * MiB))
    (path,) = cgroup.paths
    write(f"{path}/memory.events", "low 0\nhigh 0\nmax 7\noom 2\noom_kill 3\noom_group_kill 1\n")
    write(f"{path}/memory.peak", "67100672\n")
    write(
        f"{path}/cpu.stat",
        "usage_usec 1500000\nuser_usec 1400000\nsystem_usec 100000\n"
        "nr_periods 40\nnr_throttled 12\nthrottled_usec 250000\nnr_bursts 0\nburst_usec 0\n",
    )
    write(f"{path}/pids.events", "max 49\n")
    write(f"{path}/pids.peak", "16\n")
    assert cgroup.usage() == Usage(
        memory_peak=67100672,
        cpu_seconds=1.5,
        nr_periods=40,
        nr_throttled=12,
        throttled_seconds=0.25,
        oom_kills=3,
        memory_max_hits=7,
        pids_max_hits=49,
        pids_peak=16,
    )
    opened.close()


def test_fake_v2_on_no_cgroup2_mount_the_doctor_has_nothing_to_tell(fake_v2: FakeCgroup2) -> None:
    """A cgroup2-shaped directory that no cgroup2 mount shows (``--nsbox-cgroup`` may name one):
    the doctor cannot tell about favordynmods, and says so instead of guessing."""
    opened = cgroups.CgroupV2Manager(str(fake_v2.base))
    try:
        (session,) = opened.session_dirs
        assert cgroups.cgroup2_mount_of(session) is None
        check = doctor.check_cgroup_moves(opened)
    finally:
        opened.close()
    assert (check.verdict, check.detail) == (
        doctor.OK,
        f"{session} is on no cgroup2 mount: nothing to tell",
    )


def test_fake_v2_older_kernel_without_optional_files(fake_v2: FakeCgroup2) -> None:
    fake_v2.missing |= {"memory.swap.max", "memory.peak", "pids.peak", "cgroup.kill"}
    opened = cgroups.CgroupV2Manager(str(fake_v2.base))
    cgroup = opened.create(Limits(memory=64 * MiB))  # no memory.swap.max: not written
    (path,) = cgroup.paths
    write(f"{path}/memory.events", "max 0\noom 0\noom_kill 0\n")
    write(f"{path}/cpu.stat", "usage_usec 10\nuser_usec 5\nsystem_usec 5\n")
    write(f"{path}/pids.events", "max 0\n")
    assert cgroup.usage() == Usage(
        memory_peak=None,
        cpu_seconds=0.00001,
        nr_periods=None,
        nr_throttled=None,
        throttled_seconds=None,
        oom_kills=0,
        memory_max_hits=0,
        pids_max_hits=0,
        pids_peak=None,
    )
    assert cgroup.kill() == 0
    assert [
        name for name, _ in fake_v2.writes if name.startswith(os.path.relpath(path, fake_v2.base))
    ] == [
        f"{os.path.relpath(path, fake_v2.base)}/memory.oom.group",
        f"{os.path.relpath(path, fake_v2.base)}/memory.max",
    ]
    opened.close()


def test_fake_v2_processes_move_to_a_leaf_first(fake_v2: FakeCgroup2) -> None:
    write(fake_v2.base / "cgroup.procs", "4242\n4243\n")
    opened = cgroups.CgroupV2Manager(str(fake_v2.base))
    assert fake_v2.writes[:3] == [
        ("nsbox.leaf/cgroup.procs", "4242"),
        ("nsbox.leaf/cgroup.procs", "4243"),
        ("cgroup.subtree_control", "+memory +cpu +pids"),
    ]
    assert os.path.isdir(fake_v2.base / "nsbox.leaf")
    opened.close()


def test_fake_v2_root_cgroup_keeps_its_processes(fake_v2: FakeCgroup2) -> None:
    (fake_v2.base / "cgroup.type").unlink()  # only the root cgroup has none
    write(fake_v2.base / "cgroup.procs", "1\n")
    opened = cgroups.CgroupV2Manager(str(fake_v2.base))
    assert fake_v2.writes[0] == ("cgroup.subtree_control", "+memory +cpu +pids")
    assert not os.path.exists(fake_v2.base / "nsbox.leaf")
    opened.close()


def test_fake_v2_enabled_parent_is_left_alone(fake_v2: FakeCgroup2) -> None:
    write(fake_v2.base / "cgroup.subtree_control", "cpu io memory pids\n")
    opened = cgroups.CgroupV2Manager(str(fake_v2.base))
    (session,) = opened.session_dirs
    assert fake_v2.writes == [
        (f"{os.path.basename(session)}/cgroup.subtree_control", "+memory +cpu +pids")
    ]
    opened.close()


def test_fake_v2_second_manager_gets_its_own_session(fake_v2: FakeCgroup2) -> None:
    first = cgroups.CgroupV2Manager(str(fake_v2.base))
    second = cgroups.CgroupV2Manager(str(fake_v2.base))
    assert [os.path.basename(s) for s in first.session_dirs + second.session_dirs] == [
        f"nsbox-{os.getpid()}",
        f"nsbox-{os.getpid()}-1",
    ]
    second.close()
    first.close()


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_fake_remove_stale(fake_v2: FakeCgroup2) -> None:
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        names = {
            "dead": f"nsbox-{dead_pid()}",
            "dead_second": f"nsbox-{dead_pid()}-2",
            "live": f"nsbox-{sleeper.pid}",
            "ours": f"nsbox-{os.getpid()}-7",
            "leaf": "nsbox.leaf",
            "other": "nsbox-test-1",
        }
        for name in names.values():
            cgroups._mkdir(f"{fake_v2.base}/{name}")
        cgroups._mkdir(f"{fake_v2.base}/{names['dead']}/t1")
        removed = cgroups.remove_stale([str(fake_v2.base)])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert removed == sorted(f"{fake_v2.base}/{names[k]}" for k in ("dead", "dead_second"))
    assert sorted(os.listdir(fake_v2.base)) == sorted(
        [names[k] for k in ("live", "ours", "leaf", "other")] + list(V2_FILES)
    )


# -- probing, from the text of /proc files ---------------------------------------

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
HYBRID_CGROUP = """\
9:name=systemd:/user.slice
8:pids:/user.slice/u.scope
4:memory:/user.slice
2:cpu,cpuacct:/
0::/user.slice/u.scope
"""


def test_v1_hierarchies_co_mounted() -> None:
    mounts = cgroups._cgroup_mounts(HYBRID_MOUNTINFO)
    hierarchies, missing = cgroups._own_v1_hierarchies(mounts, cgroups._memberships(HYBRID_CGROUP))
    assert missing == []
    assert hierarchies == [
        cgroups.V1Hierarchy(("memory",), "/sys/fs/cgroup/memory/user.slice"),
        cgroups.V1Hierarchy(("cpu", "cpuacct"), "/sys/fs/cgroup/cpu,cpuacct"),
        cgroups.V1Hierarchy(("pids",), "/sys/fs/cgroup/pids/user.slice/u.scope"),
    ]


def test_v1_hierarchies_missing_pids() -> None:
    mounts = [m for m in cgroups._cgroup_mounts(HYBRID_MOUNTINFO) if "pids" not in m.options]
    _, missing = cgroups._own_v1_hierarchies(mounts, cgroups._memberships(HYBRID_CGROUP))
    assert missing == ["pids"]


def test_v2_dir_of_a_later_worker_is_the_leaf_parent() -> None:
    mountinfo = "29 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    mounts = cgroups._cgroup_mounts(mountinfo)
    own = cgroups._own_v2_dir(mounts, {"": "/user.slice/u.scope/nsbox.leaf"})
    assert own == "/sys/fs/cgroup/user.slice/u.scope"
    assert cgroups._own_v2_dir(mounts, {"": "/"}) == "/sys/fs/cgroup"


def test_v2_dir_below_a_mount_of_a_subtree() -> None:
    """A container's cgroup mount shows only its part of the tree; escapes are decoded."""
    mountinfo = "29 23 0:26 /docker/ab /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n"
    mounts = cgroups._cgroup_mounts(mountinfo)
    assert cgroups._own_v2_dir(mounts, {"": "/docker/ab/x"}) == "/sys/fs/my cgroup/x"
    assert cgroups._own_v2_dir(mounts, {"": "/docker/abc"}) is None


def test_option_must_name_a_cgroup2_directory(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnavailable) as info:
        cgroups.open_manager(cgroup_path=str(tmp_path))
    assert str(info.value).startswith(f"--nsbox-cgroup={tmp_path} is not a cgroup2 directory.\n")


def test_cgroup_error_names_step_and_errno_and_pickles() -> None:
    error = CgroupError("write memory.max=1 to /x/t3", errno.EBUSY, "try later")
    assert (
        str(error)
        == "write memory.max=1 to /x/t3 failed: EBUSY (Device or resource busy); try later"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.errno, copy.step) == (str(error), errno.EBUSY, error.step)


def cgroup2_mount() -> tuple[str, set[str]]:
    """(mount point, super options) of the cgroup2 mount, read without the module under test."""
    with open("/proc/self/mountinfo") as mountinfo:
        fields = next(
            line.split() for line in mountinfo if line.partition(" - ")[2].startswith("cgroup2")
        )
    return fields[4], set(fields[fields.index("-") + 3].split(","))


def doctor_line(name: str) -> tuple[str, str]:
    """(the doctor's line for check ``name``, the fix line after it or "")."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line[8:].startswith(name))
    after = lines[at + 1] if at + 1 < len(lines) else ""
    return lines[at], after.strip() if after.strip().startswith("fix:") else ""


def test_doctor_says_whether_joining_a_cgroup_can_wait_for_a_grace_period() -> None:
    """v1 joins through tasks, which never waits; cgroup2 through cgroup.procs, which waits for
    an RCU grace period after a quiet moment unless the hierarchy is mounted with favordynmods.
    In the guest, as root, a remount with favordynmods turns the doctor's warning to ok."""
    point, options = cgroup2_mount()
    assert cgroups.cgroup2_mount_of(own_cgroup2_dir()) == (point, "favordynmods" in options)
    assert cgroups.cgroup2_mount_of("/proc") is None
    manager = cgroups.open_manager()
    version = manager.version
    manager.close()
    line, fix = doctor_line("cgroup moves")
    if version == 1:
        assert line.startswith("  ok    ") and "join through tasks" in line, line
        return
    if "favordynmods" in options:
        assert line.startswith("  ok    ") and "with favordynmods" in line, line
    else:
        assert line.startswith("  warn  ") and "without favordynmods" in line, line
        assert f"mount -o remount,favordynmods {point} " in fix, fix
    if os.geteuid() != 0 or "favordynmods" in options:
        return
    original = ",".join(sorted(options - {"rw"}))
    kernel.mount(None, point, None, kernel.MS_REMOUNT, original + ",favordynmods")
    try:
        assert "favordynmods" in cgroup2_mount()[1]
        line, fix = doctor_line("cgroup moves")
        assert line.startswith("  ok    ") and "with favordynmods" in line, line
        assert fix == ""
    finally:
        kernel.mount(None, point, None, kernel.MS_REMOUNT, original)
    assert cgroup2_mount()[1] == options
