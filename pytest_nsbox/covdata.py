"""Coverage measured inside a sandbox comes back to the pytest process.

The sandbox's test process runs under the coverage tracer it inherited from
pytest (``pytest --cov`` or ``coverage run -m pytest``), but whatever it
would write is thrown away with the overlay, and ``os._exit`` skips the
atexit save anyway. So the child sends its data on the result pipe and the
parent merges it into its own: no ``.coveragerc`` change, no ``.coverage.*``
file per test.

One trap: the parent's ``CoverageData`` holds an open SQLite connection to
its data file, and the fork copies it. If the child used that object,
coverage would notice the new pid and close and reset it, through the
inherited descriptor of the parent's file (SQLite's "no connection across
fork" rule). So the child first points the collector at a fresh in-memory
``CoverageData`` and never touches the inherited one.
Coverage has no public call for that; ``_collector`` and ``_data`` are the
private attributes used, each guarded, like ``_hasher`` in :func:`merge`.
"""

from __future__ import annotations

import base64
import sys
from typing import Any

from pytest_nsbox import protocol


def _current() -> Any:
    """The running measurement, if any.

    A running coverage is already imported; importing it here only to find
    nothing would cost every sandboxed test ~90 ms.
    """
    coverage = sys.modules.get("coverage")
    return None if coverage is None else coverage.Coverage.current()


def detach_in_child() -> None:
    """In the test process, before the test: record into a fresh in-memory data object."""
    cov = _current()
    collector = getattr(cov, "_collector", None)
    if cov is None or collector is None or not hasattr(collector, "use_data"):
        return
    from coverage import CoverageData

    fresh = CoverageData(no_disk=True)
    collector.use_data(fresh, getattr(collector, "static_context", None))
    cov._data = fresh


def send(result_fd: int) -> None:
    """In the test process, after the test: ship the measured data."""
    cov = _current()
    if cov is None:
        return
    cov.stop()
    data = cov.get_data()
    protocol.send(result_fd, "coverage", {"data": base64.b64encode(data.dumps()).decode()})


def merge(body: dict[str, Any]) -> None:
    """In the pytest process: add one sandbox's data to the running measurement."""
    cov = _current()
    if cov is None:
        return
    from coverage import CoverageData

    payload = base64.b64decode(body["data"])
    data = CoverageData(no_disk=True)
    data.loads(payload)
    mine = cov.get_data()
    mine.update(data)
    # Parallel data files are named after a hash of their content, and
    # ``coverage combine`` skips files whose hashes match. update() does not
    # feed that hash, so two pytest-xdist workers whose own measurements are
    # equal would get one name and one would be dropped. Feed it here.
    hasher = getattr(mine, "_hasher", None)
    if hasher is not None:
        hasher.update(payload)
