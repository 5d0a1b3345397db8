"""Per-test baselines run by the benchmark inside real pytest sessions.

Loaded with ``-p nsbench.steps_plugin``; ``$NSBENCH_STEP`` picks what each test runs in:

``fork``
    The pytest-forked mechanism on this pytest: fork per test, the child runs
    ``_pytest.runner.runtestprotocol(item, log=False)``, serializes each report
    with ``pytest_report_to_serializable`` and writes them as JSON to a pipe;
    the parent reads them back, waits for the child, and logs the reports.
``ns``
    The nsbox engine as the plugin drives it, without the plugin: one
    ``pytest_nsbox.factory.SandboxFactory`` per session (closed in
    ``pytest_unconfigure``); the sandbox of the *next* test asked for with
    ``prepare()`` before the current test is forked, so it is built while that
    test runs; ``pending.wait()``, then ``pytest_nsbox.runner.run(prepared,
    ...)`` forks the test process once into it, with
    ``pytest_nsbox.childrun.SandboxedItem`` as its work, and
    ``prepared.close()`` after (``pytest_nsbox.plugin._run_sandboxed`` and
    ``pytest_nsbox.session``'s ``sandbox_for`` / ``prepare_next`` /
    ``release``, a sandbox whose init died meanwhile built anew, without the
    settings, usage and records; reports are rebuilt as the plugin does,
    ``pytest_nsbox.outcomes.phase_reports``). The SandboxSpec is ``--nsbox``'s
    (mnt/pid/net/uts/ipc, the test process's own cgroup namespace, the lock namespace), with
    lo left down and no hostname. The
    factory is :class:`NamespacesOnlyFactory`: its interpreter imports
    :mod:`nsbench.ns_stub` before ``serve``, which replaces
    ``filesystem.set_up`` there with a stub that only makes the mounts private
    and mounts the new ``/proc`` (the pid namespace's init lists ``/proc``
    when the test ends). Without a cgroup, ``runner.run`` waits for init's
    check for processes left running before it returns.
``overlay``
    ``ns`` with the plain ``SandboxFactory``, so the real ``filesystem.set_up``:
    overlay on the rootdir, private ``/tmp`` and ``/dev/shm``, pytest's basetemp
    bound through.
``lo``
    ``overlay`` plus bringing ``lo`` up with the prebuilt netlink request.
``cgroup``
    ``lo`` plus a per-test cgroup: ``manager.plan(Limits(256 MiB, 1 cpu, 64
    pids))`` per test (``pytest_nsbox.cgroups.open_manager()`` once), passed to
    ``prepare()``: the sandbox's init makes it (and stays outside it), the test
    process joins it (under v2 it is born there); the factory removes it once
    init has exited, as in the plugin (rmdir, and ``kill()`` + ``remove()``
    only if something is still in it). Also the
    hostname the plugin gives each test (``nsbox-<test name>``, so a spec per
    test). With a cgroup, ``runner.run`` counts the cgroup's tasks instead of
    waiting for init.

The parent side of every step is the same few lines (log start, run, log the
reports, log finish), so the rows differ only in how the test process is made.
A sandbox that fails to set up raises: the session errors, the harness notices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from _pytest.runner import runtestprotocol

import pytest_nsbox
from pytest_nsbox import childrun, outcomes, runner
from pytest_nsbox.cgroups import CgroupManager, Limits, SandboxCgroup
from pytest_nsbox.config import SandboxSettings
from pytest_nsbox.factory import PreparedSandbox, SandboxFactory, SandboxPipeline
from pytest_nsbox.sandbox import SandboxSpec

STEPS = ("fork", "ns", "overlay", "lo", "cgroup")
LIMITS = Limits(256 * 1024 * 1024, 1.0, 64)
BENCH_DIR = str(Path(__file__).resolve().parent.parent)
_state: dict[str, Any] = {}


def _step() -> str:
    step = os.environ.get("NSBENCH_STEP", "")
    if step not in STEPS:
        raise pytest.UsageError(f"NSBENCH_STEP must be one of {', '.join(STEPS)}, not {step!r}")
    return step


def pytest_configure(config: pytest.Config) -> None:
    _state["step"] = _step()


def pytest_unconfigure(config: pytest.Config) -> None:
    engine = _state.pop("engine", None)
    if engine is not None:
        engine.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    step = _state["step"]
    reports = _run_forked(item) if step == "fork" else _run_in_engine(item, nextitem)
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


class NamespacesOnlyFactory(SandboxFactory):
    """The factory of the "ns" row: its interpreter stubs ``filesystem.set_up`` out first.

    The same interpreter and flags as :meth:`SandboxFactory.command` (``-I -S``:
    no site-packages, so both this package's and the benchmarks' directories
    go on ``sys.path`` explicitly); :mod:`nsbench.ns_stub` is imported before
    ``serve``, so every init it forks runs the stub.
    """

    def command(self, sock_fd: int) -> list[str]:
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(pytest_nsbox.__file__)))
        code = (
            f"import sys; sys.path[:0] = [{package_parent!r}, {BENCH_DIR!r}]; "
            "import nsbench.ns_stub; "
            f"from pytest_nsbox.factory import serve; serve({sock_fd}, {os.getpid()})"
        )
        return [sys.executable, "-I", "-S", "-c", code]


def _engine_spec(
    config: pytest.Config, step: str, settings: SandboxSettings, factory: SandboxFactory
) -> SandboxSpec:
    """The SandboxSpec of this step, built once per session as the plugin builds its own.

    The machine is probed through the session's factory, as the plugin's
    session does (one factory interpreter per session).
    """
    from pytest_nsbox import probe, sandbox

    caps = probe.verdict(factory)
    if not caps.usable:
        raise pytest.UsageError(f"nsbox cannot sandbox here: {caps.problem}")
    tmp_path_factory = getattr(config, "_tmp_path_factory", None)
    passthrough = () if tmp_path_factory is None else (str(tmp_path_factory.getbasetemp()),)
    spec = sandbox.build_spec(
        rootdir=str(config.rootpath),
        cwd=os.getcwd(),
        privileged=caps.privileged,
        isolate_network=True,
        hostname=None,
        private_tmp=settings.tmp == "private",
        tmp_size=settings.tmp_size,
        passthrough=passthrough,
        list_writes=False,
    )
    if step in ("ns", "overlay"):
        spec = dataclasses.replace(spec, loopback_request=None)
    return spec


class _Engine:
    """One session's engine state, kept as ``pytest_nsbox.session.NsboxSession`` keeps it.

    The factory and the plugin's own :class:`SandboxPipeline` (the sandbox
    built ahead for the next test; the cgroup row's cgroups, planned per test
    and removed by the factory), without the plugin's settings and records.
    """

    def __init__(self, config: pytest.Config, step: str) -> None:
        from pytest_nsbox import cgroups

        self.step = step
        self.settings = SandboxSettings()
        self.factory = NamespacesOnlyFactory() if step == "ns" else SandboxFactory()
        self.manager: CgroupManager | None = None
        self.pipeline = SandboxPipeline(self.factory, self._plan_cgroup)
        try:
            self.spec = _engine_spec(config, step, self.settings, self.factory)
            if step == "cgroup":
                self.manager = cgroups.open_manager()
        except BaseException:
            self.factory.close()
            raise

    def _plan_cgroup(self, limits: Limits | None) -> SandboxCgroup | None:
        return self.manager.plan(limits) if self.manager is not None and limits else None

    def _limits(self) -> Limits | None:
        return LIMITS if self.manager is not None else None

    def spec_for(self, item: pytest.Item) -> SandboxSpec:
        if self.step != "cgroup":
            return self.spec
        return dataclasses.replace(self.spec, hostname=self.settings.hostname_for(item.nodeid))

    def sandbox_for(self, item: pytest.Item) -> PreparedSandbox:
        """The sandbox built while the previous test ran, if it fits; else one now."""
        return self.pipeline.take(self.spec_for(item), self._limits())

    def prepare_next(self, nextitem: pytest.Item | None) -> None:
        if nextitem is not None:
            self.pipeline.prepare_next(self.spec_for(nextitem), self._limits())

    def release(self, prepared: PreparedSandbox) -> None:
        self.pipeline.release(prepared)

    def close(self) -> None:
        try:
            self.pipeline.close()
        finally:
            self.factory.close()
            if self.manager is not None:
                self.manager.close()


def _run_in_engine(item: pytest.Item, nextitem: pytest.Item | None) -> list[pytest.TestReport]:
    engine = _state.get("engine")
    if engine is None:
        engine = _state["engine"] = _Engine(item.config, _state["step"])
    prepared = engine.sandbox_for(item)
    # Asked for now, the next test's sandbox is built while this one runs.
    engine.prepare_next(nextitem)
    try:
        run = runner.run(
            prepared,
            lambda fd: childrun.SandboxedItem(item, engine.settings, fd),
            factory=engine.factory,
            timeout=None,
        )
    finally:
        engine.release(prepared)
    problem = run.first("setup_error") or run.protocol_error
    reports = outcomes.phase_reports(item, run)
    if problem or not reports:
        raise RuntimeError(f"sandbox step {engine.step!r} failed: {problem or run.frames}")
    return reports
