"""Coverage measured inside a sandbox comes back to the pytest process.

The sandbox's test process runs under the coverage tracer it inherited from
pytest (``pytest --cov`` or ``coverage run -m pytest``), but whatever it
would write is thrown away with the overlay, and ``os._exit`` skips the
atexit save anyway. So the child sends its data on the result pipe and the
parent merges it into its own: no ``.coveragerc`` change, no ``.coverage.*``
file per test.
"""

from __future__ import annotations

import base64
from typing import Any

from pytest_nsbox import protocol


def _current() -> Any:
    try:
        import coverage
    except ImportError:
        return None
    return coverage.Coverage.current()


def send(result_fd: int) -> None:
    """In the test process: ship the measured data, if coverage is running."""
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

    data = CoverageData(no_disk=True)
    data.loads(base64.b64decode(body["data"]))
    cov.get_data().update(data)
