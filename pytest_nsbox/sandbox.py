"""The sandbox, from the forked child's side: one readable sequence of steps.

Three processes make one sandbox::

    pytest ── outer ── init (pid 1) ── test (pid 2) ── whatever the test starts
              (A)      (B)             (C)

* **outer** joins the test's cgroup, enters the new namespaces (pid, mount,
  net, uts, ipc, cgroup; plus user when pytest is not root) and forks;
* **init** is pid 1 of the new pid namespace: it builds the file system view
  and the network, forks the test, reaps orphans while it runs, then lists
  and kills whatever the test left running, and reports to the parent;
* **test** enters one more user and mount namespace, whose id maps init
  writes. Every mount it sees came from a more privileged mount namespace,
  so the kernel locks them: even as root the test cannot unmount the overlay
  or the private ``/proc`` to reach what is beneath, nor clear a read-only
  flag. As a plain user the test then drops the capabilities that namespace
  granted, and runs with none, as on the host.

Each step raises :class:`~pytest_nsbox.kernel.SandboxSetupError`; it reaches
the parent as a ``setup_error`` frame naming the step.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn, Protocol

from pytest_nsbox import filesystem, kernel, network, protocol, writes
from pytest_nsbox.cgroups import SandboxCgroup

EXIT_SETUP_FAILED = 120
EXIT_TEST_RUNNER_FAILED = 121

_MAP_ALL_IDS = "0 0 4294967295"
_FULL_MARGIN = 64 * 1024  # a tmpfs with less free space than this counts as full


class TestProcess(Protocol):
    """What the sandbox's test process runs, in two steps."""

    def prepare(self) -> None:
        """Runs with the capabilities of the test's own namespaces, before they are dropped."""

    def run(self) -> None:
        """Runs the test."""


@dataclass(frozen=True)
class SandboxSpec:
    """Everything the child needs, computed in the parent before fork."""

    namespaces: int
    privileged: bool
    uid: int
    gid: int
    hostname: str | None
    cwd: str
    filesystem: filesystem.FilesystemPlan
    loopback_request: bytes | None
    list_writes: bool


def base_namespaces(network_isolated: bool, privileged: bool) -> int:
    """The CLONE_NEW* flags the outer process unshares."""
    flags = (
        kernel.CLONE_NEWNS
        | kernel.CLONE_NEWPID
        | kernel.CLONE_NEWUTS
        | kernel.CLONE_NEWIPC
        | kernel.CLONE_NEWCGROUP
    )
    if network_isolated:
        flags |= kernel.CLONE_NEWNET
    if not privileged:
        flags |= kernel.CLONE_NEWUSER
    return flags


def run_outer(
    spec: SandboxSpec,
    result_fd: int,
    cgroup: SandboxCgroup | None,
    run_test: TestProcess,
    parent_pid: int,
) -> NoReturn:
    """Process A, right after fork in the pytest process. Never returns."""
    try:
        # The outer process and init allocate little and live milliseconds: a
        # collection there would only touch (and so copy) the parent's pages.
        gc.disable()
        _die_with_parent(parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if cgroup is not None:
            cgroup.attach_self()
        if spec.privileged:
            _set_oom_score_adj(-1000)
        kernel.unshare(spec.namespaces)
        if spec.namespaces & kernel.CLONE_NEWUSER:
            _write_id_maps(
                "self", f"{spec.uid} {spec.uid} 1", f"{spec.gid} {spec.gid} 1", deny_setgroups=True
            )
        # init waits until "started" is on the pipe: frames from two processes
        # must not interleave, and only small writes are atomic.
        started_r, started_w = os.pipe2(os.O_CLOEXEC)
        init_pid = os.fork()
        if init_pid == 0:
            os.close(started_w)
            os.read(started_r, 1)
            os.close(started_r)
            _run_init(spec, result_fd, run_test, os.getppid())
        os.close(started_r)
        protocol.send(result_fd, "started", {"init_pid": init_pid})
        os.close(started_w)
        os.close(result_fd)
        status = _wait_for(init_pid)
    except BaseException as exc:
        _report_setup_error(result_fd, exc)
        os._exit(EXIT_SETUP_FAILED)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _run_init(spec: SandboxSpec, result_fd: int, run_test: TestProcess, outer_pid: int) -> NoReturn:
    """Process B: pid 1 of the sandbox."""
    try:
        _die_with_parent(outer_pid)
        scratch_fd, lower_fd = filesystem.set_up(spec.filesystem)
        if spec.hostname is not None:
            kernel.sethostname(spec.hostname)
        if spec.loopback_request is not None:
            network.bring_loopback_up(spec.loopback_request)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        test_pid = _fork_test(spec, result_fd, scratch_fd, lower_fd, run_test)
    except BaseException as exc:
        _report_setup_error(result_fd, exc)
        os._exit(EXIT_SETUP_FAILED)
    try:
        status = _reap_until(test_pid)
        protocol.send(result_fd, "exit", {"status": status})
        full = _full_filesystems(spec, scratch_fd)
        if full:
            protocol.send(result_fd, "full", {"filesystems": full})
        left = _kill_leftovers()
        if left:
            protocol.send(result_fd, "left_running", {"processes": left})
        if spec.list_writes:
            protocol.send(result_fd, "writes", writes.list_changes(scratch_fd, lower_fd))
    except BaseException:
        traceback.print_exc()
    os._exit(0)


def _fork_test(
    spec: SandboxSpec,
    result_fd: int,
    scratch_fd: int,
    lower_fd: int,
    run_test: TestProcess,
) -> int:
    """Fork process C; write its id maps once it has its own user namespace."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    test_pid = os.fork()
    if test_pid == 0:
        os.close(ready_r)
        os.close(go_w)
        os.close(scratch_fd)
        os.close(lower_fd)
        _run_test_process(spec, result_fd, ready_w, go_r, run_test)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise kernel.SandboxSetupError("test process: unshare(user+mnt)", 1, "it exited first")
        if spec.privileged:
            _write_id_maps(str(test_pid), _MAP_ALL_IDS, _MAP_ALL_IDS, deny_setgroups=False)
        else:
            _write_id_maps(
                str(test_pid),
                f"{spec.uid} {spec.uid} 1",
                f"{spec.gid} {spec.gid} 1",
                deny_setgroups=False,
            )
        os.write(go_w, b"g")
    finally:
        os.close(ready_r)
        os.close(go_w)
    return test_pid


def _run_test_process(
    spec: SandboxSpec, result_fd: int, ready_w: int, go_r: int, run_test: TestProcess
) -> NoReturn:
    """Process C: lock the mounts, drop what the user namespace granted, run the test."""
    try:
        kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        kernel.unshare(kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS)
        os.write(ready_w, b"u")
        if os.read(go_r, 1) != b"g":
            os._exit(EXIT_SETUP_FAILED)
        os.close(ready_w)
        os.close(go_r)
        os.chdir(spec.cwd)  # re-enter the cwd through the overlay, not the host dentry
        gc.enable()  # the test gets automatic collection back (outer and init went without)
        run_test.prepare()
        if not spec.privileged:
            kernel.drop_capabilities()
        _set_oom_score_adj(1000)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except BaseException as exc:
        _report_setup_error(result_fd, exc)
        os._exit(EXIT_SETUP_FAILED)
    try:
        run_test.run()
    except BaseException:
        traceback.print_exc()
        _flush_std()
        os._exit(EXIT_TEST_RUNNER_FAILED)
    _flush_std()
    os._exit(0)


def _full_filesystems(spec: SandboxSpec, scratch_fd: int) -> list[dict[str, object]]:
    """The sandbox's size-limited tmpfs mounts that the test filled up."""
    candidates = [(f"{spec.filesystem.rootdir} (writes to the repo)", os.fstatvfs(scratch_fd))]
    if spec.filesystem.private_tmp:
        candidates.append(("/tmp", os.statvfs("/tmp")))
    return [
        {"path": path, "size": st.f_blocks * st.f_frsize}
        for path, st in candidates
        if st.f_bavail * st.f_frsize < _FULL_MARGIN
    ]


def _reap_until(test_pid: int) -> int:
    """As pid 1: reap every child (orphans are re-parented here) until the test exits."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        if pid == test_pid:
            return status


def _kill_leftovers() -> list[list[object]]:
    """List the processes still running besides pid 1, kill them all, reap everything."""
    left: list[list[object]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == "1":
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    continue  # exited, only not reaped yet: not left running
            with open(f"/proc/{entry}/comm") as comm:
                name = comm.read().strip()
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # it exited meanwhile
        left.append([int(entry), name, cmdline])
    if left:
        # From pid 1, -1 means every other process of the namespace.
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    return sorted(left)


def _wait_for(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (and if it already has)."""
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(EXIT_SETUP_FAILED)


def _write_id_maps(pid: str, uid_map: str, gid_map: str, *, deny_setgroups: bool) -> None:
    if deny_setgroups:
        kernel.write_file(f"/proc/{pid}/setgroups", "deny")
    kernel.write_file(f"/proc/{pid}/uid_map", uid_map)
    kernel.write_file(f"/proc/{pid}/gid_map", gid_map)


def _set_oom_score_adj(value: int) -> None:
    """Make the test, not the sandbox's own processes, the OOM killer's choice."""
    # Lowering it needs CAP_SYS_RESOURCE; a plain user keeps the default.
    with contextlib.suppress(kernel.SandboxSetupError):
        kernel.write_file("/proc/self/oom_score_adj", str(value))


def _report_setup_error(result_fd: int, exc: BaseException) -> None:
    step = getattr(exc, "step", type(exc).__name__)
    with contextlib.suppress(OSError):
        protocol.send(result_fd, "setup_error", {"step": step, "message": str(exc) or repr(exc)})


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def interpreter_paths() -> tuple[str, ...]:
    """What the test's Python needs to keep working: its prefixes and import path."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.update(p for p in sys.path if p)
    return tuple(sorted(os.path.realpath(p) for p in paths if os.path.exists(p)))


def build_spec(
    *,
    rootdir: str,
    cwd: str,
    privileged: bool,
    isolate_network: bool,
    hostname: str | None,
    private_tmp: bool,
    tmp_size: int,
    passthrough: tuple[str, ...],
    list_writes: bool,
) -> SandboxSpec:
    """The sandbox for one test, from settings already validated."""
    return SandboxSpec(
        namespaces=base_namespaces(isolate_network, privileged),
        privileged=privileged,
        uid=os.getuid(),
        gid=os.getgid(),
        hostname=hostname,
        cwd=cwd,
        filesystem=filesystem.FilesystemPlan(
            rootdir=rootdir,
            privileged=privileged,
            private_tmp=private_tmp,
            tmp_size=tmp_size,
            upper_size=tmp_size,
            passthrough=passthrough,
            readonly=interpreter_paths(),
        ),
        loopback_request=network.loopback_up_request() if isolate_network else None,
        list_writes=list_writes,
    )
