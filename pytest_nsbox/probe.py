"""Can this machine sandbox a test, and how? Asked once per session.

The probe runs the real sandbox sequence (the same code as a test, through a
sandbox factory of its own) around a no-op in a temporary directory, so its
verdict cannot drift from what the tests will meet. When it fails,
:func:`explain` turns the failed step and the machine's settings into what
is missing and how to fix it.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache

from pytest_nsbox import kernel, runner, sandbox
from pytest_nsbox.factory import SandboxFactory

DEFAULT_TMP_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class Capabilities:
    """The verdict: usable or not, in which mode, and if not, why and the fix."""

    usable: bool
    privileged: bool
    namespaces: str
    problem: str = ""
    fix: str = ""

    def describe(self, rootdir: str) -> str:
        if not self.usable:
            return f"unavailable: {self.problem}"
        mode = "as root, mounts locked by a user namespace" if self.privileged else "rootless"
        return f"{self.namespaces} namespaces, overlay on {rootdir} ({mode})"


class _NoOp:
    def prepare(self) -> None:
        return None

    def run(self) -> None:
        return None


def try_sandbox(privileged: bool, factory: SandboxFactory | None = None) -> str | None:
    """Run one no-op sandbox; None when it worked, else what failed.

    ``factory``: the session's, so that a session starts one factory; by
    default one of the probe's own.
    """
    top = tempfile.mkdtemp(prefix="pytest-nsbox-probe-")
    try:
        repo = os.path.join(top, "repo")
        os.mkdir(repo)
        spec = sandbox.build_spec(
            rootdir=repo,
            cwd=repo,
            privileged=privileged,
            isolate_network=True,
            hostname="nsbox-probe",
            private_tmp=True,
            tmp_size=DEFAULT_TMP_SIZE,
            passthrough=(),
            list_writes=False,
        )
        own = factory is None
        used = SandboxFactory() if factory is None else factory
        try:
            prepared = used.prepare(spec, None).wait()
            try:
                result = runner.run(prepared, lambda fd: _NoOp(), factory=used, timeout=30)
            finally:
                prepared.close()
        finally:
            if own:
                used.close()
    except kernel.SandboxSetupError as exc:
        return str(exc)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    error = result.first("setup_error")
    if error is not None:
        return str(error["message"])
    if result.test_status != 0:
        return f"the probe sandbox did not finish (status {result.test_status})"
    return None


@lru_cache(maxsize=1)
def probe() -> Capabilities:
    """:func:`verdict` once per process, through a factory of the probe's own."""
    return verdict()


def verdict(factory: SandboxFactory | None = None) -> Capabilities:
    """Try the privileged sequence as root, else the rootless one."""
    failures = []
    for privileged in [True, False] if os.geteuid() == 0 else [False]:
        problem = try_sandbox(privileged, factory)
        if problem is None:
            # Init adds the cgroup namespace, the lock namespace a user namespace.
            flags = (
                sandbox.base_namespaces(True, privileged)
                | kernel.CLONE_NEWCGROUP
                | kernel.CLONE_NEWUSER
            )
            return Capabilities(True, privileged, kernel.describe_clone_flags(flags))
        failures.append(problem)
    return Capabilities(False, False, "", problem=failures[-1], fix=explain(failures[-1]))


def read_setting(path: str) -> str | None:
    """A sysctl or other one-line kernel setting, None where it does not exist."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def explain(problem: str) -> str:
    """How to fix a failed probe, from the machine's own settings."""
    if read_setting("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are disabled: sysctl -w user.max_user_namespaces=15000"
    if read_setting("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return (
            "unprivileged user namespaces are disabled: "
            "sysctl -w kernel.unprivileged_userns_clone=1"
        )
    if read_setting("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+): "
            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor "
            "profile for the Python interpreter that allows userns"
        )
    if "overlay" in problem:
        return (
            f"overlayfs refused the mount on Linux {platform.release()}: modprobe overlay; "
            "rootless needs a kernel >= 5.11 (and >= 6.6 for user xattrs on tmpfs)"
        )
    in_container = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
    if in_container and ("unshare" in problem or "mount" in problem):
        return (
            "this looks like a container that forbids namespaces (seccomp or missing "
            "CAP_SYS_ADMIN): run it with --privileged, or with a seccomp profile that allows "
            "unshare/mount/clone with namespace flags"
        )
    return "see `python -m pytest_nsbox doctor` for each capability"
