"""Passed phases with nothing to tell cross the pipe as four numbers.

Most phases of most tests pass with no output, no properties and nothing a
plugin added. Sending such a report through ``pytest_report_to_serializable``
and JSON, and rebuilding it with ``pytest_report_from_serializable``, costs
the test process (whose every page touched is a copy-on-write fault) and the
pytest process about a third of a millisecond per phase. For those, the test
process sends only ``when``, ``duration``, ``start`` and ``stop``, and the
pytest process rebuilds the report with pytest's own
``TestReport.from_item_and_call``, from the item as it was before the fork.

A report is plain only if it is exactly what that rebuild gives: passed, no
longrepr, no sections, no user properties, the item's node id, location and
keywords, and no attribute beyond those pytest itself sets (the set is taken
from a report built here, so it follows the pytest version). Any other
report, and every report when a plugin serializes reports itself, takes the
full way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

#: The plugins whose report serializers pytest itself ships (subtests: pytest 9).
_PYTEST_SERIALIZERS = frozenset({"reports", "subtests"})

_attributes_key = pytest.StashKey["frozenset[str] | None"]()


@dataclass(frozen=True)
class PlainShape:
    """What a plain report of one item looks like, taken in the pytest process before fork."""

    nodeid: str
    location: tuple[str, int | None, str]
    keywords: dict[str, int]
    attributes: frozenset[str]


def shape_for(item: pytest.Item) -> PlainShape | None:
    """The item's plain shape, or None where reports must always take the full way."""
    attributes = _plain_attributes(item)
    if attributes is None:
        return None
    keywords = {name: 1 for name in item.keywords}
    return PlainShape(item.nodeid, item.location, keywords, attributes)


def brief(report: pytest.TestReport, shape: PlainShape) -> dict[str, Any] | None:
    """In the test process: the four numbers of a plain report, or None."""
    if (
        report.outcome != "passed"
        or report.longrepr is not None
        or report.sections
        or report.user_properties
        or vars(report).keys() != shape.attributes
        or report.nodeid != shape.nodeid
        or report.location != shape.location
        or report.keywords != shape.keywords
    ):
        return None
    return {
        "when": report.when,
        "duration": report.duration,
        "start": report.start,
        "stop": report.stop,
    }


def rebuild(item: pytest.Item, body: dict[str, Any]) -> pytest.TestReport:
    """In the pytest process: the plain report that ``body`` stands for."""
    call = pytest.CallInfo.from_call(lambda: None, body["when"])
    report = pytest.TestReport.from_item_and_call(item, call)
    report.duration = float(body["duration"])
    report.start = float(body["start"])
    report.stop = float(body["stop"])
    return report


def _plain_attributes(item: pytest.Item) -> frozenset[str] | None:
    """The attributes pytest gives a passed report; None if a plugin serializes reports.

    Asked once per session.
    """
    config = item.config
    if _attributes_key not in config.stash:
        serializers = {
            impl.plugin_name
            for hook in (
                config.hook.pytest_report_to_serializable,
                config.hook.pytest_report_from_serializable,
            )
            for impl in hook.get_hookimpls()
        }
        attributes = None
        if serializers <= _PYTEST_SERIALIZERS:
            probe = pytest.TestReport.from_item_and_call(
                item, pytest.CallInfo.from_call(lambda: None, "setup")
            )
            attributes = frozenset(vars(probe))
        config.stash[_attributes_key] = attributes
    return config.stash[_attributes_key]
