"""``python -m pytest_nsbox doctor``: what this machine and user can sandbox.

One line per capability with a verdict and, where it fails, the fix. Every
check runs the real thing in a forked child (an unshare, a mount, a netlink
request, a cgroup with limits), through the same functions the sandbox uses,
so the doctor cannot disagree with what the tests will meet.

Exit status 0 when everything the defaults need works (namespaces, overlay,
loopback); missing cgroups only warn, since only tests that ask for limits
need them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pytest_nsbox import cgroups, kernel, network, probe

OK, WARN, FAIL = "ok", "warn", "FAIL"
_UNMAPPED_SCAN_LIMIT = 20_000


@dataclass(frozen=True)
class Check:
    """One capability: its verdict, what was seen, and how to fix it."""

    name: str
    verdict: str
    detail: str
    fix: str = ""


def _in_child(action: Callable[[], None]) -> str | None:
    """Run ``action`` in a forked child; None if it worked, else the error text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            action()
            os._exit(0)
        except BaseException as exc:  # report whatever failed
            os.write(write_end, str(exc).encode()[:4000] or repr(exc).encode())
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as err:
        message = err.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return message or f"the check's child ended with status {status}"


def check_user_namespaces() -> Check:
    limit = probe.read_setting("/proc/sys/user/max_user_namespaces")
    error = _in_child(lambda: kernel.unshare(kernel.CLONE_NEWUSER))
    if error is None:
        return Check("user namespaces", OK, f"unshare(user) works (max_user_namespaces={limit})")
    return Check("user namespaces", FAIL, error, probe.explain(error))


def check_namespace(flag: int) -> Check:
    name = kernel.describe_clone_flags(flag)
    extra = 0 if os.geteuid() == 0 else kernel.CLONE_NEWUSER
    error = _in_child(lambda: kernel.unshare(flag | extra))
    if error is None:
        how = "as root" if not extra else "inside a new user namespace"
        return Check(f"{name} namespace", OK, f"unshare({name}) works {how}")
    return Check(f"{name} namespace", FAIL, error, probe.explain(error))


def check_sandbox(privileged: bool) -> Check:
    name = "overlay as root (mount rights)" if privileged else "overlay in a user namespace"
    problem = probe.try_sandbox(privileged)
    if problem is None:
        detail = (
            "overlay with redirect_dir=on, mounts locked by a user namespace"
            if privileged
            else "overlay with userxattr on a tmpfs upper layer"
        )
        return Check(name, OK, f"a full no-op sandbox ran: {detail}")
    return Check(name, FAIL, problem, probe.explain(problem))


def check_loopback() -> Check:
    request = network.loopback_up_request()
    extra = 0 if os.geteuid() == 0 else kernel.CLONE_NEWUSER

    def bring_up() -> None:
        kernel.unshare(kernel.CLONE_NEWNET | extra)
        network.bring_loopback_up(request)

    error = _in_child(bring_up)
    if error is None:
        return Check("pyroute2 netlink", OK, "lo brought up in a new network namespace")
    return Check("pyroute2 netlink", FAIL, error, "the kernel refused RTM_NEWLINK in a new netns")


def check_cgroups(cgroup_path: str | None) -> list[Check]:
    try:
        manager = cgroups.open_manager(cgroup_path)
    except cgroups.CgroupUnavailable as exc:
        text = str(exc)
        return [
            Check(
                "cgroups",
                WARN,
                text.splitlines()[0],
                " ".join(text.splitlines()[1:]) or "limits need cgroups",
            )
        ]
    try:
        checks = [Check("cgroups", OK, manager.describe())]
        limits = cgroups.Limits(memory=64 * 1024 * 1024, cpu=0.5, pids=16)
        cgroup = manager.create(limits)
        try:
            usage = cgroup.usage()
            files = {name for path in cgroup.paths for name in os.listdir(path)}
        finally:
            cgroup.kill()
            cgroup.remove()
        checks.append(
            Check("cgroup limits", OK, "memory, cpu and pids limits set on a test cgroup")
        )
        peak = "memory.peak" if manager.version == 2 else "memory.max_usage_in_bytes"
        checks.append(
            Check(
                "peak memory counter",
                OK if usage.memory_peak is not None else WARN,
                f"{peak} {'present' if usage.memory_peak is not None else 'missing'}",
                "" if usage.memory_peak is not None else "peak memory needs Linux >= 5.19 on v2",
            )
        )
        kill_ok = manager.version == 1 or "cgroup.kill" in files
        checks.append(
            Check(
                "cgroup.kill",
                OK if kill_ok else WARN,
                "present"
                if "cgroup.kill" in files
                else "v1: processes are killed one by one"
                if manager.version == 1
                else "missing: processes are killed one by one",
                "" if kill_ok else "cgroup.kill needs Linux >= 5.14",
            )
        )
        checks.append(check_cgroup_moves(manager))
        return checks
    except Exception as exc:  # a doctor reports, it does not crash
        return [Check("cgroup limits", WARN, str(exc), "see the cgroup step named above")]
    finally:
        manager.close()


def check_cgroup_moves(manager: cgroups.CgroupManager) -> Check:
    """Whether a process that joins its cgroup may wait for an RCU grace period.

    Under cgroup2 a test process is born in its cgroup (init stays outside
    it), but one forked by a pytest process with threads (a pytest-xdist
    worker) joins it, on the test's path.
    """
    name = "cgroup moves"
    if manager.version == 1:
        return Check(name, OK, "v1: processes join through tasks, which waits for no grace period")
    (session,) = manager.session_dirs
    mount = cgroups.cgroup2_mount_of(session)
    if mount is None:
        return Check(name, OK, f"{session} is on no cgroup2 mount: nothing to tell")
    if mount[1]:
        return Check(name, OK, "cgroup2 mounted with favordynmods: joining a cgroup never waits")
    return Check(
        name,
        WARN,
        "cgroup2 mounted without favordynmods: a process that joins a cgroup may first wait "
        "for an RCU grace period, several ms (under pytest-xdist each test process joins "
        "its cgroup)",
        f"as root, mount -o remount,favordynmods {mount[0]} (Linux 6.0+; forks and exits "
        "then cost a little more)",
    )


def check_repo_owners(rootdir: str) -> Check:
    """Rootless, files owned by uids outside the user namespace cannot be written."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        return Check("repo file owners", OK, "root maps every uid into the sandbox")
    foreign: list[str] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(rootdir):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".tox", ".venv", "node_modules")]
        for name in dirnames + filenames:
            seen += 1
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_uid != uid or st.st_gid != gid:
                foreign.append(os.path.relpath(path, rootdir))
        if seen > _UNMAPPED_SCAN_LIMIT:
            break
    if not foreign:
        return Check("repo file owners", OK, f"every file in {rootdir} is yours")
    sample = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return Check(
        "repo file owners",
        WARN,
        f"{len(foreign)} path(s) in {rootdir} owned by another user or group: {sample}",
        "rootless, a test cannot write them (EOVERFLOW): chown them to yourself, or run as root",
    )


def run_checks(rootdir: str, cgroup_path: str | None = None) -> list[Check]:
    if not sys.platform.startswith("linux"):
        return [Check("platform", FAIL, sys.platform, "pytest-nsbox needs Linux")]
    checks = [check_user_namespaces()]
    for flag in (
        kernel.CLONE_NEWNS,
        kernel.CLONE_NEWPID,
        kernel.CLONE_NEWNET,
        kernel.CLONE_NEWUTS,
        kernel.CLONE_NEWIPC,
        kernel.CLONE_NEWCGROUP,
    ):
        checks.append(check_namespace(flag))
    if os.geteuid() == 0:
        checks.append(check_sandbox(privileged=True))
    checks.append(check_sandbox(privileged=False))
    checks.append(check_loopback())
    checks.extend(check_cgroups(cgroup_path))
    checks.append(check_repo_owners(rootdir))
    return checks


def ready(checks: list[Check]) -> bool:
    """The defaults work when no check failed; warnings are about limits only."""
    if os.geteuid() == 0:
        # Root sandboxes with the privileged sequence; the rootless one is informative.
        checks = [c for c in checks if c.name != "overlay in a user namespace"]
    return all(c.verdict != FAIL for c in checks)


def run(
    write: Callable[[str], object], rootdir: str | None = None, cgroup_path: str | None = None
) -> int:
    """Print the report; return the exit status."""
    rootdir = rootdir or os.getcwd()
    checks = run_checks(rootdir, cgroup_path)
    write(
        f"pytest-nsbox doctor: uid {os.getuid()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    width = max(len(c.name) for c in checks)
    for c in checks:
        write(f"  {c.verdict:<4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.verdict != OK:
            write(f"        {'':<{width}}  fix: {c.fix}")
    verdict = ready(checks)
    write(
        "ready: sandboxed tests will run here"
        if verdict
        else "not ready: sandboxed tests would fail here (--nsbox-unavailable decides how)"
    )
    return 0 if verdict else 1
