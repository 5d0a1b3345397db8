"""Per-test baselines run by the benchmark inside real pytest sessions.

Loaded with ``-p nsbench.steps_plugin``; ``$NSBENCH_STEP`` picks what each test runs in:

``fork``
    The pytest-forked mechanism on this pytest: fork per test, the child runs
    ``_pytest.runner.runtestprotocol(item, log=False)``, serializes each report
    with ``pytest_report_to_serializable`` and writes them as JSON to a pipe;
    the parent reads them back, waits for the child, and logs the reports.
``ns``
    The nsbox engine (``pytest_nsbox.runner.run`` and ``pytest_nsbox.sandbox``,
    with ``pytest_nsbox.childrun.SandboxedItem`` as the test process), every
    namespace the full sandbox uses, lo left down, and ``filesystem.set_up``
    replaced by a stub that only makes the mounts private and mounts the new
    ``/proc`` (the pid namespace's init lists ``/proc`` when the test ends).
``overlay``
    ``ns`` with the real ``filesystem.set_up``: overlay on the rootdir,
    private ``/tmp`` and ``/dev/shm``, pytest's basetemp bound through.
``lo``
    ``overlay`` plus bringing ``lo`` up with the prebuilt netlink request.
``cgroup``
    ``lo`` plus a per-test cgroup from ``pytest_nsbox.cgroups`` with the
    limits memory=256m, cpu=1, pids=64, attached in the child, killed and
    removed after, as the plugin does, but without the plugin's bookkeeping.

The parent side of every step is the same few lines (log start, run, log the
reports, log finish), so the rows differ only in how the test process is made.
A sandbox that fails to set up raises: the session errors, the harness notices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pytest
from _pytest.runner import runtestprotocol

STEPS = ("fork", "ns", "overlay", "lo", "cgroup")
_state: dict[str, Any] = {}


def _step() -> str:
    step = os.environ.get("NSBENCH_STEP", "")
    if step not in STEPS:
        raise pytest.UsageError(f"NSBENCH_STEP must be one of {', '.join(STEPS)}, not {step!r}")
    return step


def pytest_configure(config: pytest.Config) -> None:
    _state["step"] = _step()


def pytest_unconfigure(config: pytest.Config) -> None:
    manager = _state.pop("cgroup_manager", None)
    if manager is not None:
        manager.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    if _state["step"] == "fork":
        reports = _run_forked(item)
    else:
        reports = _run_in_engine(item, _state["step"])
    for report in reports:
        ihook.pytest_runtest_logreport(report=report)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


# -- fork only: the pytest-forked mechanism ----------------------------------


def _run_forked(item: pytest.Item) -> list[pytest.TestReport]:
    config = item.config
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            reports = runtestprotocol(item, log=False, nextitem=None)
            data = [
                config.hook.pytest_report_to_serializable(config=config, report=r) for r in reports
            ]
            _write_all(write_fd, json.dumps(data).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    payload = _read_all(read_fd)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not payload:
        raise RuntimeError(f"forked test process failed (wait status {status})")
    return [
        config.hook.pytest_report_from_serializable(config=config, data=data)
        for data in json.loads(payload)
    ]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


# -- the nsbox engine, one layer at a time -----------------------------------


def _stub_set_up(plan: Any) -> tuple[int, int]:
    """``filesystem.set_up`` reduced to what a pid namespace needs: private mounts, a new /proc."""
    from pytest_nsbox import kernel

    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, None)
    kernel.mount("proc", "/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV, None)
    lower_fd = os.open(plan.rootdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return os.dup(lower_fd), lower_fd


def _engine_spec(config: pytest.Config, step: str) -> Any:
    """The SandboxSpec of this step, built once per session as the plugin builds its own."""
    from pytest_nsbox import filesystem, probe, sandbox

    caps = probe.probe()
    if not caps.usable:
        raise pytest.UsageError(f"nsbox cannot sandbox here: {caps.problem}")
    factory = getattr(config, "_tmp_path_factory", None)
    passthrough = (str(factory.getbasetemp()),) if factory is not None else ()
    spec = sandbox.build_spec(
        rootdir=str(config.rootpath),
        cwd=os.getcwd(),
        privileged=caps.privileged,
        isolate_network=True,
        hostname=None,
        private_tmp=True,
        tmp_size=probe.DEFAULT_TMP_SIZE,
        passthrough=passthrough,
        list_writes=False,
    )
    if step in ("ns", "overlay"):
        spec = dataclasses.replace(spec, loopback_request=None)
    if step == "ns":
        filesystem.set_up = _stub_set_up
    return spec


def _cgroup(config: pytest.Config) -> Any:
    from pytest_nsbox import cgroups

    if "cgroup_manager" not in _state:
        _state["cgroup_manager"] = cgroups.open_manager()
    return _state["cgroup_manager"].create(cgroups.Limits(256 * 1024 * 1024, 1.0, 64))


def _run_in_engine(item: pytest.Item, step: str) -> list[pytest.TestReport]:
    from pytest_nsbox import childrun, runner
    from pytest_nsbox.config import SandboxSettings

    config = item.config
    if "spec" not in _state:
        _state["spec"] = _engine_spec(config, step)
    cgroup = _cgroup(config) if step == "cgroup" else None
    settings = SandboxSettings()
    try:
        run = runner.run(
            _state["spec"],
            lambda fd: childrun.SandboxedItem(item, settings, fd),
            cgroup=cgroup,
            timeout=None,
        )
    finally:
        if cgroup is not None:
            cgroup.kill()
            cgroup.remove()
    problem = run.first("setup_error") or run.protocol_error
    reports = run.bodies("report")
    if problem or not reports:
        raise RuntimeError(f"sandbox step {step!r} failed: {problem or run.frames}")
    return [config.hook.pytest_report_from_serializable(config=config, data=r) for r in reports]
