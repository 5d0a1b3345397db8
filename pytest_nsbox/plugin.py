"""The pytest hooks of pytest-nsbox: thin, in the order a session meets them.

Configuration is read once (:mod:`pytest_nsbox.config`), each test's settings
are validated at collection, a sandboxed test runs through
:mod:`pytest_nsbox.runner`, and :mod:`pytest_nsbox.outcomes` turns what came
back into the reports logged here, as if the test had run inline.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import pytest

from pytest_nsbox import childrun, covdata, hookspecs, network, outcomes, runner
from pytest_nsbox.config import (
    NsboxConfigError,
    SandboxSettings,
    SessionOptions,
    add_options,
    marker_help,
    settings_for_item,
)
from pytest_nsbox.session import NsboxSession, is_xdist_controller

settings_key = pytest.StashKey[SandboxSettings]()
session_key = pytest.StashKey[NsboxSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", marker_help())
    options = SessionOptions.from_config(config)
    nsbox = NsboxSession(config, options)
    config.stash[session_key] = nsbox
    # Its own hooks (logreport, summary, session finish) need the session state.
    config.pluginmanager.register(nsbox, "nsbox-session")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if config.getoption("nsbox_doctor", False):
        from pytest_nsbox import doctor

        return doctor.run(print, str(config.rootpath), config.getoption("nsbox_cgroup", None))
    return None


def pytest_report_header(config: pytest.Config) -> str | None:
    nsbox = config.stash.get(session_key, None)
    if nsbox is None or not sys.platform.startswith("linux"):
        return None
    header = "nsbox: " + nsbox.describe()
    if is_xdist_controller(config):
        # A pytest-xdist controller runs no test: its workers have factories of their own.
        nsbox.factory.close()
        network.discard_loopback_request()
    return header


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    nsbox = config.stash[session_key]
    errors = []
    sandboxed = 0
    loopback = False
    for item in items:
        try:
            settings = settings_for_item(item, nsbox.options)
        except NsboxConfigError as exc:
            errors.append(str(exc))
            continue
        if settings is None:
            continue
        adjusted = config.hook.pytest_nsbox_settings(item=item, settings=settings)
        item.stash[settings_key] = adjusted = adjusted if adjusted is not None else settings
        sandboxed += 1
        loopback = loopback or adjusted.network == "loopback"
    if errors:
        raise pytest.UsageError("nsbox: invalid sandbox settings:\n  " + "\n  ".join(errors))
    if loopback:
        network.start_loopback_request()
    if not sandboxed:
        # The header's probe started the factory; a session that sandboxes nothing
        # does not keep it (idle, it is a process of ~14 MB for the whole session).
        nsbox.factory.close()
    if sandboxed and (config.getoption("usepdb", False) or config.getoption("trace", False)):
        raise pytest.UsageError(
            "nsbox: --pdb and --trace need the test in this terminal's process, but "
            f"{sandboxed} selected test(s) would run in a forked sandbox. Debug without "
            "--nsbox (or with -p no:nsbox), or mark the test nsbox(enabled=False)."
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    settings = item.stash.get(settings_key, None)
    if settings is None or childrun.in_sandbox():
        return None
    nsbox = item.config.stash[session_key]
    refusal = nsbox.refusal(settings)
    if refusal is not None and nsbox.options.unavailable == "run":
        warnings.warn(
            pytest.PytestWarning(f"nsbox: ran without the sandbox: {refusal}"), stacklevel=1
        )
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    if refusal is not None:
        reports = nsbox.unavailable_reports(item, refusal)
    else:
        reports = _run_sandboxed(item, nextitem, settings, nsbox)
    _teardown_parent_state(item, nextitem, reports)
    for report in reports:
        ihook.pytest_runtest_logreport(report=report)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _run_sandboxed(
    item: pytest.Item, nextitem: pytest.Item | None, settings: SandboxSettings, nsbox: NsboxSession
) -> list[pytest.TestReport]:
    prepared = nsbox.sandbox_for(item, settings)
    timeout = nsbox.timeout_for(item, settings)
    # Asked for now, the next test's sandbox is built while this test runs.
    _prepare_next(nextitem, nsbox)
    try:
        run = runner.run(
            prepared,
            lambda fd: childrun.SandboxedItem(item, settings, fd),
            factory=nsbox.factory,
            timeout=timeout,
        )
        usage = nsbox.usage_of(run, prepared.cgroup)
    finally:
        nsbox.release(prepared)
    for body in run.bodies("warnings"):
        _replay_warnings(body["records"])
    for body in run.bodies("coverage"):
        covdata.merge(body)
    outcome = outcomes.build(
        item, settings, run, usage, nsbox.process_name, _read_leftover_capture(item.config)
    )
    nsbox.apply_writes_policy(item, settings, outcome)
    record = outcomes.attach_record(item, settings, outcome)
    finished = item.config.hook.pytest_nsbox_test_finished
    if finished.get_hookimpls():  # pluggy's call itself costs ~20 page faults per test
        finished(item=item, record=record)
    return outcome.reports


def _prepare_next(nextitem: pytest.Item | None, nsbox: NsboxSession) -> None:
    """While a sandboxed test runs, have the next one's sandbox built, if it gets one."""
    settings = nextitem.stash.get(settings_key, None) if nextitem is not None else None
    if nextitem is not None and settings is not None and nsbox.refusal(settings) is None:
        nsbox.prepare_next(nextitem, settings)


def _read_leftover_capture(config: pytest.Config) -> tuple[str, str]:
    """What a dead test process wrote to pytest's fd capture and never reported."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None or not capman.is_globally_capturing():
        return "", ""
    out, err = capman.read_global_capture()
    return str(out), str(err)


def _teardown_parent_state(
    item: pytest.Item, nextitem: pytest.Item | None, reports: list[pytest.TestReport]
) -> None:
    """Keep the parent's fixture stack as if the test had run inline.

    The test's own fixtures lived and died in the sandbox, but fixtures that
    earlier inline tests set up here must be torn down when ``nextitem`` no
    longer needs them, exactly as pytest's runner would. A failure there is
    the teardown's failure, as inline.
    """
    setupstate = getattr(item.session, "_setupstate", None)
    if setupstate is None or not getattr(setupstate, "stack", None):
        return
    call = pytest.CallInfo.from_call(lambda: setupstate.teardown_exact(nextitem), "teardown")
    if call.excinfo is not None:
        failed = pytest.TestReport.from_item_and_call(item, call)
        reports[:] = [r for r in reports if r.when != "teardown"] + [failed]


def _replay_warnings(records: list[dict[str, Any]]) -> None:
    """Warn again in the parent, inside pytest's per-test warning capture."""
    for record in records:
        module, _, name = record["category"].partition(":")
        try:
            category = getattr(importlib.import_module(module), name)
            if not (isinstance(category, type) and issubclass(category, Warning)):
                raise TypeError(name)
        except (ImportError, AttributeError, TypeError):
            category = UserWarning
        warnings.warn_explicit(record["message"], category, record["filename"], record["lineno"])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if childrun.in_sandbox():
        childrun.send_report(item.config, report)
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    return outcomes.teststatus(report)


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout: a sandboxed test's ``--timeout`` kills its whole sandbox."""
    if item.stash.get(settings_key, None) is None or childrun.in_sandbox():
        return None
    item.config.stash[session_key].plugin_timeouts[item.nodeid] = float(settings.timeout)
    return True


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    if item.stash.get(settings_key, None) is None or childrun.in_sandbox():
        return None
    item.config.stash[session_key].plugin_timeouts.pop(item.nodeid, None)
    return True


def pytest_unconfigure(config: pytest.Config) -> None:
    nsbox = config.stash.get(session_key, None)
    if nsbox is not None:
        nsbox.close()
        config.pluginmanager.unregister(nsbox)
