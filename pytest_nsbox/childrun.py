"""What the test process runs: pytest's own protocol, reports sent as they exist.

The child calls :func:`_pytest.runner.runtestprotocol` with ``log=False`` and
``nextitem=None``: every fixture a sandboxed test sets up, of any scope, is
set up and torn down inside its sandbox, where its side effects are thrown
away. Reports are not logged here; a hook wrapper on
``pytest_runtest_makereport`` (see :mod:`pytest_nsbox.plugin`) sends each
one to the parent the moment it exists, through
``pytest_report_to_serializable``, so a crash in ``call`` still leaves the
``setup`` report with the parent. Warnings are recorded here and replayed by
the parent, coverage data is shipped back the same way (:mod:`covdata`).
"""

from __future__ import annotations

import warnings

import pytest
from _pytest.runner import runtestprotocol

from pytest_nsbox import covdata, plainreport, protocol
from pytest_nsbox.config import SandboxSettings

_result_fd: int | None = None
_plain_shape: plainreport.PlainShape | None = None


def in_sandbox() -> bool:
    """True in a sandbox's test process (where reports go to the pipe)."""
    return _result_fd is not None


def send_report(config: pytest.Config, report: pytest.TestReport) -> None:
    """Send one report to the parent; called from the makereport wrapper.

    A plain report goes as four numbers (see :mod:`pytest_nsbox.plainreport`).
    """
    assert _result_fd is not None
    brief = None if _plain_shape is None else plainreport.brief(report, _plain_shape)
    if brief is not None:
        protocol.send(_result_fd, "plain_report", brief)
        return
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    protocol.send(_result_fd, "report", data)


class SandboxedItem:
    """The test process's work for one item (see :class:`pytest_nsbox.sandbox.TestProcess`)."""

    def __init__(self, item: pytest.Item, settings: SandboxSettings, result_fd: int) -> None:
        self.item = item
        self.settings = settings
        self.result_fd = result_fd
        self.plain_shape = plainreport.shape_for(item)  # taken before the fork
        # Looked up before the fork too: even finding that no plugin
        # implements the hook costs the child copied pages.
        hook = item.config.hook.pytest_nsbox_sandbox_ready
        self.sandbox_ready = hook if hook.get_hookimpls() else None

    def prepare(self) -> None:
        if self.sandbox_ready is not None:
            self.sandbox_ready(item=self.item, settings=self.settings)

    def run(self) -> None:
        global _result_fd, _plain_shape
        _result_fd = self.result_fd
        _plain_shape = self.plain_shape
        covdata.detach_in_child()
        with warnings.catch_warnings(record=True) as caught:
            # record=True keeps the filters the parent's warnings plugin set
            # for this item; only where warnings end up changes.
            try:
                runtestprotocol(self.item, log=False, nextitem=None)
            finally:
                _send_warnings(self.result_fd, caught)
                covdata.send(self.result_fd)


def _send_warnings(result_fd: int, caught: list[warnings.WarningMessage]) -> None:
    records = [
        {
            "message": str(w.message),
            "category": f"{w.category.__module__}:{w.category.__qualname__}",
            "filename": w.filename,
            "lineno": w.lineno,
        }
        for w in caught
    ]
    if records:
        protocol.send(result_fd, "warnings", {"records": records})
