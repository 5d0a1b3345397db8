"""Hooks other plugins and conftest files implement to extend the sandbox.

Declared through ``pytest_addhooks``; implement them in a ``conftest.py`` or
a plugin like any pytest hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_nsbox.config import SandboxSettings


@pytest.hookspec(firstresult=True)
def pytest_nsbox_settings(item: pytest.Item, settings: SandboxSettings) -> SandboxSettings | None:
    """Adjust a test's sandbox settings at collection time.

    Called once per sandboxed test after the marker, command line, ini file
    and environment were merged and validated. Return a new settings object
    (``dataclasses.replace(settings, memory=...)``) to change it, or None to
    keep it; the first non-None result wins. Not called for tests that run
    outside the sandbox.
    """


@pytest.hookspec
def pytest_nsbox_sandbox_ready(item: pytest.Item, settings: SandboxSettings) -> None:
    """Called in the sandbox's test process before any fixture runs.

    The sandbox is complete (namespaces, overlay, private ``/tmp``, network)
    and the process still holds the capabilities of its own user and mount
    namespace, so an implementation may add mounts (a tmpfs, a bind of a
    path it can see), files, or environment variables. The capabilities are
    dropped right after, for a test run by a plain user.
    """


@pytest.hookspec
def pytest_nsbox_test_finished(item: pytest.Item, record: dict[str, Any]) -> None:
    """Receive a finished sandboxed test's record, in the pytest process.

    ``record`` is the same dictionary the ``--nsbox-report`` JSON holds for
    the test: node id, outcome, limits asked for, usage (peak memory, CPU
    seconds, throttling, pids), events (``oom``, ``timeout``, ``pids``,
    ``crash``, ``throttle``, ``writes``), processes left running and files
    written. Use it for custom reporting.
    """
