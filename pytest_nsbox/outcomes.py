"""From what the kernel did to a sandbox to the test's reports.

The inputs are facts: the reports the test process sent, the frames its init
sent (exit status, processes left running), the wait status and the cgroup's
counters read by the parent. Nothing is guessed from an exit code: an OOM
kill is the cgroup's ``oom_kill`` counter, a pid-limit hit its ``pids``
event count. Each event becomes one line a user can read at a glance, the
first line of the failure and of the short summary, and a status letter of
its own in the progress line (see :func:`teststatus`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_nsbox import plainreport
from pytest_nsbox.config import SandboxSettings, format_size
from pytest_nsbox.runner import SandboxRun
from pytest_nsbox.sandbox import EXIT_TEST_RUNNER_FAILED, killed_by_sigkill

PHASES = ("setup", "call", "teardown")

# event -> (status letter, verbose word); the category stays "failed" so the
# failure is listed, counted and turns the exit status like any other.
EVENT_STATUS = {
    "oom": ("M", "OOM-KILLED"),
    "timeout": ("T", "TIMEOUT"),
    "crash": ("C", "CRASHED"),
    "pids": ("P", "PIDS-LIMIT"),
    "throttle": ("H", "THROTTLED"),
    "writes": ("W", "WROTE-REPO"),
    "full": ("F", "TMP-FULL"),
    "sandbox": ("E", "SANDBOX-ERROR"),
}


@dataclass
class Usage:
    """What one sandbox used, as recorded in reports, junit and the JSON report."""

    wall_seconds: float
    cpu_seconds: float | None = None
    memory_peak: int | None = None
    nr_periods: int | None = None
    nr_throttled: int | None = None
    throttled_seconds: float | None = None
    pids_peak: int | None = None
    oom_kills: int = 0
    pids_max_hits: int = 0


@dataclass
class Outcome:
    """The reports of one sandboxed test plus the facts behind them."""

    reports: list[pytest.TestReport]
    usage: Usage
    events: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    left_running: list[list[Any]] = field(default_factory=list)
    writes: dict[str, list[str]] | None = None

    @property
    def body(self) -> pytest.TestReport:
        """The report that carries the test's own result: call, else the last phase."""
        return next((r for r in self.reports if r.when == "call"), self.reports[-1])

    def note(self, event: str, title: str, line: str) -> None:
        """Record an event the test lived through: a section, and the lead of its failure.

        The first failed report (if the test failed) is tagged with the event and
        its crash line starts with ``line``, so the short summary says it first.
        """
        self.events.append(event)
        self.messages.append(line)
        self.body.sections.append((title, line))
        for rep in self.reports:
            if rep.failed and not hasattr(rep, "nsbox_event"):
                rep.nsbox_event = event  # type: ignore[attr-defined]
                crash = getattr(rep.longrepr, "reprcrash", None)
                if crash is not None:
                    crash.message = f"{line}; {crash.message}"
                return

    def fail_body(self, item: pytest.Item, event: str, message: str) -> None:
        """Turn a passing body report into a failure for ``event``, keeping its output."""
        body = self.body
        failed = failure(item, body.when, message)
        failed.sections = list(body.sections)
        failed.duration = body.duration
        failed.nsbox_event = event  # type: ignore[attr-defined]
        self.reports[self.reports.index(body)] = failed
        self.events.append(event)
        self.messages.append(message)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def failure(item: pytest.Item, when: str, message: str) -> pytest.TestReport:
    """A failed report for ``when`` whose crash line is exactly ``message``'s first line."""

    def fail() -> None:
        pytest.fail(message, pytrace=False)

    report = pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(fail, when))  # type: ignore[arg-type]
    _set_crash_line(item, report, message.splitlines()[0])
    return report


def _set_crash_line(item: pytest.Item, report: pytest.TestReport, line: str) -> None:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        crash.message = line
        crash.path = str(item.path)
        crash.lineno = (item.location[1] or 0) + 1


def _passed(item: pytest.Item, when: str) -> pytest.TestReport:
    return pytest.TestReport.from_item_and_call(item, pytest.CallInfo.from_call(lambda: None, when))  # type: ignore[arg-type]


def _missing_phase(reports: dict[str, pytest.TestReport]) -> str | None:
    """The phase the test process was in when it stopped sending reports."""
    if "setup" not in reports:
        return "setup"
    if reports["setup"].passed and "call" not in reports:
        return "call"
    if "teardown" not in reports:
        return "teardown"
    return None


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"was killed by {signal_name(number)} (signal {number})"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _oom_line(settings: SandboxSettings, usage: Usage, victim: str) -> str:
    limit = format_size(settings.memory) if settings.memory else "the memory limit"
    peak = f"peak {format_size(usage.memory_peak)}, " if usage.memory_peak else ""
    if usage.oom_kills == 1:
        killed = f"1 process killed: {victim}"
    else:
        killed = f"{usage.oom_kills} processes killed, {victim} among them"
    return f"OOM-killed: memory limit {limit} exceeded ({peak}{killed})"


def _cpu_line(usage: Usage) -> str:
    used = f"{usage.cpu_seconds:.2f} s used" if usage.cpu_seconds is not None else "usage unknown"
    throttled = (
        f", throttled {usage.nr_throttled} of {usage.nr_periods} periods"
        f" ({usage.throttled_seconds or 0.0:.1f} s)"
        if usage.nr_throttled is not None
        else ""
    )
    return f"cpu: {used}{throttled}"


def _throttle_exceeded(settings: SandboxSettings, usage: Usage) -> str | None:
    limit = settings.max_throttle
    if limit is None or usage.throttled_seconds is None:
        return None
    throttled = usage.throttled_seconds
    share = throttled / usage.wall_seconds if usage.wall_seconds > 0 else 0.0
    if limit.fraction is not None and share > limit.fraction:
        allowed = f"max_throttle={limit.fraction:g} ({limit.fraction:.0%} of wall time)"
    elif limit.seconds is not None and throttled > limit.seconds:
        allowed = f"max_throttle={limit.seconds:g} s"
    else:
        return None
    return (
        f"CPU-throttled: throttled {throttled:.2f} s of {usage.wall_seconds:.2f} s wall time "
        f"({share:.0%}) under cpu={settings.cpu:g}, above {allowed}"
    )


def build(
    item: pytest.Item,
    settings: SandboxSettings,
    run: SandboxRun,
    usage: Usage,
    process_name: str,
    captured: tuple[str, str] = ("", ""),
) -> Outcome:
    """Turn one finished sandbox into the reports pytest will log.

    ``captured`` is what the test process wrote to its captured stdout and
    stderr after its last report: with fd capture, pytest's capture file is
    shared across the fork, so when the test dies the parent can still read
    what it printed before.
    """
    reports: dict[str, pytest.TestReport] = {rep.when: rep for rep in phase_reports(item, run)}
    outcome = Outcome(reports=[], usage=usage, left_running=[list(p) for p in _left(run)])
    test_status = run.test_status
    missing = _missing_phase(reports)
    setup_error = run.first("setup_error")
    test_killed = test_status is None or killed_by_sigkill(test_status)

    death: tuple[str, str] | None = None
    if setup_error is not None:
        death = ("sandbox", f"nsbox: sandbox set-up failed: {setup_error['message']}")
    elif run.timed_out:
        death = (
            "timeout",
            f"Timeout: sandbox killed after {run.timeout or 0:.1f} s "
            f"({run.killed_at_timeout} process{'es' if run.killed_at_timeout != 1 else ''})",
        )
    elif usage.oom_kills and test_killed and missing is not None:
        death = ("oom", _oom_line(settings, usage, f"the test process ({process_name})"))
    elif run.init_lost is not None and missing is not None:
        death = (
            "sandbox",
            f"nsbox: the sandbox ended under the test ({run.init_lost}); "
            f"the test process was killed during {missing}",
        )
    elif run.protocol_error is not None and missing is not None:
        death = (
            "sandbox",
            f"nsbox: protocol error on the result pipe: {run.protocol_error} "
            "(did the test write to or close the sandbox's result pipe?)",
        )
    elif (
        missing is not None
        and test_status is not None
        and os.WIFEXITED(test_status)
        and os.WEXITSTATUS(test_status) == EXIT_TEST_RUNNER_FAILED
    ):
        death = (
            "sandbox",
            f"nsbox: the test process could not send its {missing} report "
            "(did the test close or break the sandbox's result pipe?)",
        )
    elif missing is not None and test_status is not None:
        death = (
            "crash",
            f"Crashed: the test process {_describe_status(test_status)} during {missing}",
        )
    elif missing is not None:
        outer = _describe_status(run.child_status) if run.child_status is not None else "vanished"
        death = (
            "crash",
            f"Crashed: the sandbox ended ({outer}) before the test's {missing} report",
        )

    if death is not None:
        event, message = death
        phase = missing or "teardown"
        failed = failure(item, phase, message)
        failed.nsbox_event = event  # type: ignore[attr-defined]
        # Output the test wrote before it died (see the ``captured`` argument).
        for stream, text in zip(("stdout", "stderr"), captured, strict=True):
            if text:
                failed.sections.append((f"Captured {stream} {phase}", text))
        if phase == "teardown" and "teardown" in reports:
            failed.sections = list(reports["teardown"].sections)
        reports[phase] = failed
        outcome.events.append(event)
        outcome.messages.append(message)
        if phase == "setup":
            reports.pop("call", None)
        if phase != "teardown" and "teardown" not in reports:
            reports["teardown"] = _passed(item, "teardown")

    outcome.reports = [reports[when] for when in PHASES if when in reports]

    if usage.oom_kills and "oom" not in outcome.events:
        line = _oom_line(settings, usage, "a process the test started; the test itself survived")
        outcome.note("oom", "nsbox: OOM kill", line)

    if usage.pids_max_hits:
        line = (
            f"pids limit {settings.pids} reached {usage.pids_max_hits} "
            f"time{'s' if usage.pids_max_hits != 1 else ''} (fork failed with EAGAIN)"
        )
        outcome.note("pids", "nsbox: pids limit", line)

    for full in (run.first("full") or {}).get("filesystems", []):
        line = (
            f"{full['path']} is full: its {format_size(int(full['size']))} tmpfs "
            "(tmp_size) ran out, so writes failed with ENOSPC"
        )
        outcome.note("full", "nsbox: file system full", line)

    if settings.cpu is not None:
        outcome.body.sections.append(("nsbox: cpu", _cpu_line(usage)))
        exceeded = _throttle_exceeded(settings, usage)
        if exceeded is not None and outcome.body.passed:
            outcome.fail_body(item, "throttle", exceeded)

    if outcome.left_running:
        lines = [f"pid {pid}: {name} ({cmd or name})" for pid, name, cmd in outcome.left_running]
        outcome.body.sections.append(
            ("nsbox: processes left running, killed at the end of the test", "\n".join(lines))
        )

    writes = run.first("writes")
    if writes is not None:
        outcome.writes = {k: list(v) for k, v in writes.items()}
    return outcome


def phase_reports(item: pytest.Item, run: SandboxRun) -> list[pytest.TestReport]:
    """The phase reports the test process sent, in order, plain or in full."""
    found = []
    for frame in run.frames:
        if frame.kind == "plain_report":
            found.append(plainreport.rebuild(item, frame.body))
        elif frame.kind == "report":
            found.append(_deserialize(item, frame.body))
    return found


def _deserialize(item: pytest.Item, data: dict[str, Any]) -> pytest.TestReport:
    """A report from the pipe, as it would have been made inline.

    JSON turned tuples into lists (a skip's longrepr, sections, user
    properties); pytest wants tuples. Its strings are all
    new objects, and pytest keeps every report to the end of the session: the
    node id and location are the item's own objects again, keyword names are
    interned, as inline reports share them.
    """
    report: pytest.TestReport = item.config.hook.pytest_report_from_serializable(
        config=item.config, data=data
    )
    longrepr: Any = report.longrepr
    if isinstance(longrepr, list):  # a skip's (path, lineno, reason)
        report.longrepr = tuple(longrepr)
    location = tuple(report.location)
    report.location = item.location if location == item.location else location  # type: ignore[assignment]
    if report.nodeid == item.nodeid:
        report.nodeid = item.nodeid
    report.keywords = {sys.intern(name): value for name, value in report.keywords.items()}
    report.user_properties = [tuple(p) for p in report.user_properties]  # type: ignore[misc]
    report.sections = [(str(key), str(content)) for key, content in report.sections]
    vars(report).pop("$report_type", None)  # the serializer's tag, which inline reports lack
    return report


def _left(run: SandboxRun) -> list[list[Any]]:
    body = run.first("left_running")
    return list(body["processes"]) if body else []


def overall(reports: Sequence[pytest.TestReport]) -> str:
    """One word for a test from its phase reports, as pytest's summary counts it."""
    if any(r.failed for r in reports):
        return "failed"
    if any(r.skipped for r in reports):
        return "skipped"
    return "passed"


def attach_record(item: pytest.Item, settings: SandboxSettings, outcome: Outcome) -> dict[str, Any]:
    """The test's record: as user_properties (junit ``<property>``) and as ``report.nsbox``.

    Both live on the teardown report, which junitxml reads properties from and
    which pytest-xdist carries to its controller unchanged.
    """
    usage = outcome.usage
    report = outcome.reports[-1]
    props: list[tuple[str, object]] = [("nsbox_wall_seconds", round(usage.wall_seconds, 4))]
    for name in ("memory_peak", "cpu_seconds", "throttled_seconds", "nr_throttled", "pids_peak"):
        value = getattr(usage, name)
        if value is not None:
            props.append((f"nsbox_{name}", round(value, 4) if isinstance(value, float) else value))
    props.extend(("nsbox_event", event) for event in outcome.events)
    report.user_properties = [*report.user_properties, *props]
    test_seconds = sum(r.duration for r in outcome.reports)
    record = {
        "nodeid": item.nodeid,
        "outcome": overall(outcome.reports),
        "limits": {
            "memory": settings.memory,
            "cpu": settings.cpu,
            "pids": settings.pids,
            "timeout": settings.timeout,
        },
        "usage": dict(vars(usage)),  # flat: what asdict gives, without its deep copy
        "events": outcome.events,
        "messages": outcome.messages,
        "left_running": outcome.left_running,
        "writes": outcome.writes,
        "sandbox_seconds": round(max(usage.wall_seconds - test_seconds, 0.0), 6),
        "test_seconds": round(test_seconds, 6),
    }
    report.nsbox = record  # type: ignore[attr-defined]
    return record


def teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    """The progress letter and verbose word of a report that a sandbox event failed.

    A plain word, not (word, markup): pytest colours failed reports red
    itself, and pytest 8.0 printed a tuple's repr in the short summary.
    """
    event = getattr(report, "nsbox_event", None)
    if event is None or not report.failed:
        return None
    letter, word = EVENT_STATUS[event]
    return "failed", letter, word
