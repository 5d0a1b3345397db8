"""One pytest session's sandbox state: options, machine verdicts, cgroups, sandboxes, records.

Built once in ``pytest_configure`` and registered as a plugin, so the hooks
that need the whole session (logreport, terminal summary, session finish)
are its methods. It owns the session's sandbox factory and the sandbox
being built for the next test. What the machine can do is asked once, by
the report header or the first test that needs it; a session that
sandboxes nothing closes the factory after collection.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from pytest_nsbox import cgroups, network, outcomes, probe, sandbox, writes
from pytest_nsbox.config import SandboxSettings, SessionOptions, format_size
from pytest_nsbox.factory import PreparedSandbox, SandboxFactory, SandboxPipeline
from pytest_nsbox.runner import SandboxRun

TOP_N = 5
#: The usage figures ranked in the terminal summary: (usage key, label, format).
TOP_METRICS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("memory_peak", "peak memory", format_size),
    ("cpu_seconds", "CPU time", lambda v: f"{v:.2f} s"),
)


def _process_name() -> str:
    try:
        with open("/proc/self/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "python"


def is_xdist_controller(config: pytest.Config) -> bool:
    """A pytest-xdist controller (``-n N``, N > 0): its workers run the tests.

    pytest-xdist's own condition for registering its ``dsession`` plugin,
    read from the options, so that it holds from configure on (xdist sets
    ``dist`` and ``tx`` from ``-n`` before configure, and registers the
    plugin in a configure hook that runs last). Its workers run with
    ``dist`` set back to "no".
    """
    return (
        config.getoption("dist", "no") != "no"
        and bool(config.getoption("tx", None))
        and not config.getoption("collectonly")
    )


def counted_usage(run: SandboxRun, cgroup: cgroups.SandboxCgroup | None) -> cgroups.Usage | None:
    """The cgroup's counters of a finished sandbox; None where there are none to read.

    Init makes the cgroup, so a set-up that failed before never made it;
    and the factory removes it once init has exited, which a sandbox
    killed at its timeout may have done before pytest reads it (its
    counter files then read ENODEV through init's descriptors).
    """
    if cgroup is None:
        return None
    try:
        return cgroup.usage()
    except cgroups.CgroupError as exc:
        gone = exc.errno in (errno.ENOENT, errno.ENODEV)
        if not gone or not (run.timed_out or run.first("setup_error")):
            raise
    return None


class NsboxSession:
    """Per-session state; see the module docstring."""

    def __init__(self, config: pytest.Config, options: SessionOptions) -> None:
        self.config = config
        self.options = options
        self.process_name = _process_name()
        self.plugin_timeouts: dict[str, float] = {}
        self.records: list[dict[str, Any]] = []  # every test's, for --nsbox-report
        self.eventful: list[dict[str, Any]] = []  # those with events or processes left
        self._top: dict[str, list[tuple[float, int, str]]] = {key: [] for key, _, _ in TOP_METRICS}
        self._order = itertools.count()
        self._manager: cgroups.CgroupManager | None = None
        self._cgroup_problem: str | None = None
        self._cgroups_asked = False
        self.factory = SandboxFactory()
        self.pipeline = SandboxPipeline(self.factory, self._plan_cgroup)
        self._capabilities: probe.Capabilities | None = None
        if options.sandbox_all:
            # Both start while pytest collects: the factory's interpreter, and
            # the helper that builds the lo-up request (see network).
            if options.defaults.network == "loopback":
                network.start_loopback_request()
            if not is_xdist_controller(config):
                self.factory.start()

    # -- what this machine can do --------------------------------------------

    @property
    def rootdir(self) -> str:
        return str(self.config.rootpath)

    def capabilities(self) -> probe.Capabilities:
        """What this machine can do, asked once per session through the session's factory."""
        if self._capabilities is None:
            self._capabilities = probe.verdict(self.factory)
        return self._capabilities

    def cgroup_manager(self) -> cgroups.CgroupManager | None:
        """Opened on first use; None (with the reason kept) where cgroups can't be used."""
        if not self._cgroups_asked:
            self._cgroups_asked = True
            try:
                self._manager = cgroups.open_manager(self.options.cgroup_path)
            except cgroups.CgroupUnavailable as exc:
                self._cgroup_problem = str(exc)
        return self._manager

    def describe(self) -> str:
        """The report header: what a sandboxed test gets on this machine."""
        text = self.capabilities().describe(self.rootdir)
        if self.options.sandbox_all:
            manager = self.cgroup_manager()
            text += "; " + (
                manager.describe() if manager else f"no cgroup limits: {self._cgroup_problem}"
            )
        return text

    def refusal(self, settings: SandboxSettings) -> str | None:
        """Why this test cannot get the sandbox it asked for, or None."""
        if not sys.platform.startswith("linux"):
            return f"nsbox needs Linux namespaces; this is {sys.platform}"
        caps = self.capabilities()
        if not caps.usable:
            return f"this machine cannot sandbox: {caps.problem}; fix: {caps.fix}"
        if settings.limits_requested and self.cgroup_manager() is None:
            return f"{settings.describe()} needs cgroups: {self._cgroup_problem}"
        return None

    def unavailable_reports(self, item: pytest.Item, reason: str) -> list[pytest.TestReport]:
        """--nsbox-unavailable=fail or skip, for a test that cannot be sandboxed."""
        if self.options.unavailable == "skip":

            def setup() -> None:
                pytest.skip(f"nsbox: {reason}")

        else:

            def setup() -> None:
                pytest.fail(f"nsbox: cannot sandbox this test: {reason}", pytrace=False)

        return [
            pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(setup, "setup")),
            pytest.TestReport.from_item_and_call(
                item, pytest.CallInfo.from_call(lambda: None, "teardown")
            ),
        ]

    # -- one test ------------------------------------------------------------

    def spec_for(self, item: pytest.Item, settings: SandboxSettings) -> sandbox.SandboxSpec:
        passthrough = list(settings.writable)
        factory = getattr(self.config, "_tmp_path_factory", None)
        if factory is not None:
            # Created here, before fork, so tmp_path works inside and its
            # directories stay for inspection like any pytest basetemp.
            passthrough.append(str(factory.getbasetemp()))
        return sandbox.build_spec(
            rootdir=self.rootdir,
            cwd=os.getcwd(),
            privileged=self.capabilities().privileged,
            isolate_network=settings.network == "loopback",
            hostname=settings.hostname_for(item.nodeid),
            private_tmp=settings.tmp == "private",
            tmp_size=settings.tmp_size,
            passthrough=tuple(dict.fromkeys(passthrough)),
            list_writes=settings.writes != "ignore",
        )

    def _limits(self, settings: SandboxSettings) -> cgroups.Limits | None:
        """The test's cgroup limits; None where there are no cgroups."""
        if self.cgroup_manager() is None:
            return None
        return cgroups.Limits(settings.memory, settings.cpu, settings.pids)

    def _plan_cgroup(self, limits: cgroups.Limits | None) -> cgroups.SandboxCgroup | None:
        """The test's cgroup, only planned here: the sandbox's init makes it."""
        manager = self.cgroup_manager()
        return manager.plan(limits) if manager is not None and limits is not None else None

    def sandbox_for(self, item: pytest.Item, settings: SandboxSettings) -> PreparedSandbox:
        """The test's sandbox: the one built while the previous test ran, if it fits."""
        return self.pipeline.take(self.spec_for(item, settings), self._limits(settings))

    def prepare_next(self, item: pytest.Item, settings: SandboxSettings) -> None:
        """Ask for the sandbox of the test that runs next, to be built while this one runs."""
        self.pipeline.prepare_next(self.spec_for(item, settings), self._limits(settings))

    def release(self, prepared: PreparedSandbox) -> None:
        self.pipeline.release(prepared)

    def timeout_for(self, item: pytest.Item, settings: SandboxSettings) -> float | None:
        candidates = [t for t in (settings.timeout, self.plugin_timeouts.get(item.nodeid)) if t]
        return min(candidates) if candidates else None

    def usage_of(self, run: SandboxRun, cgroup: cgroups.SandboxCgroup | None) -> outcomes.Usage:
        counted = counted_usage(run, cgroup)
        if counted is None:
            # No cgroup: the kernel's rusage of the reaped sandbox still counts
            # CPU time; the peak is the largest single process's RSS.
            return outcomes.Usage(run.wall_seconds, run.cpu_seconds, run.max_rss)
        return outcomes.Usage(
            wall_seconds=run.wall_seconds,
            cpu_seconds=counted.cpu_seconds if counted.cpu_seconds is not None else run.cpu_seconds,
            memory_peak=counted.memory_peak,
            nr_periods=counted.nr_periods,
            nr_throttled=counted.nr_throttled,
            throttled_seconds=counted.throttled_seconds,
            pids_peak=counted.pids_peak,
            oom_kills=counted.oom_kills,
            pids_max_hits=counted.pids_max_hits,
        )

    def apply_writes_policy(
        self, item: pytest.Item, settings: SandboxSettings, outcome: outcomes.Outcome
    ) -> None:
        """--nsbox-writes=report lists what the test wrote to the repo; =fail fails on it."""
        if outcome.writes is None:
            return
        kept = {
            kind: [p for p in paths if not writes.ignored(p, settings.writes_ignore)]
            for kind, paths in outcome.writes.items()
        }
        outcome.writes = kept
        lines = [
            f"{kind} {path}" for kind in ("created", "modified", "deleted") for path in kept[kind]
        ]
        if not lines:
            return
        body = outcome.body
        body.sections.append(("nsbox: files written to the repo (thrown away)", "\n".join(lines)))
        if settings.writes == "fail" and body.passed:
            message = f"Wrote to the repo (writes='fail'): {', '.join(lines)}"
            outcome.fail_body(item, "writes", message)

    # -- hooks of the session ------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep what the summary and the JSON report need of each test's record.

        The record rides on the teardown report (from a pytest-xdist worker
        to the controller, too); pytest keeps every report to the end, so
        outside a worker it is taken off the report here, and only the JSON
        report keeps them all: a long session does not grow by a record per
        test (a larger pytest process costs more at every fork).
        """
        record = getattr(report, "nsbox", None)
        if report.when != "teardown" or not isinstance(record, dict):
            return
        if not hasattr(self.config, "workerinput"):
            del report.nsbox
        if self.options.report_path:
            self.records.append(record)
        if record["events"] or record["left_running"]:
            self.eventful.append(record)
        order = next(self._order)
        for key, _, _ in TOP_METRICS:
            value = record["usage"].get(key)
            if value is not None:
                # A min-heap of the TOP_N largest; on a tie the earlier test stays.
                heapq.heappush(self._top[key], (value, -order, record["nodeid"]))
                if len(self._top[key]) > TOP_N:
                    heapq.heappop(self._top[key])

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.eventful and not self.options.report_path:
            return
        terminalreporter.section("nsbox")
        for record in self.eventful:
            for message in record["messages"]:
                terminalreporter.line(f"{record['nodeid']}: {message}")
            if record["left_running"]:
                names = ", ".join(f"{name} (pid {pid})" for pid, name, _ in record["left_running"])
                terminalreporter.line(f"{record['nodeid']}: left running, killed: {names}")
        for key, label, fmt in TOP_METRICS:
            ranked = sorted(self._top[key], reverse=True)
            if ranked:
                terminalreporter.line(f"top {len(ranked)} by {label}:")
                for value, _, nodeid in ranked:
                    terminalreporter.line(f"  {fmt(value):>12}  {nodeid}")
        if self.options.report_path:
            terminalreporter.line(f"nsbox report: {self.options.report_path}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.options.report_path and not hasattr(self.config, "workerinput"):
            path = self.options.report_path
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as out:
                json.dump({"version": 1, "tests": self.records}, out, indent=2)

    def close(self) -> None:
        """End the session's sandboxes, factory and cgroups; each step runs even if one fails."""
        try:
            self.pipeline.close()
        finally:
            network.discard_loopback_request()
            self.factory.close()
            if self._manager is not None:
                manager, self._manager = self._manager, None
                manager.close()
