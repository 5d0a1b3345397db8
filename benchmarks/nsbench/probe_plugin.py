"""Loaded into every measured pytest session: when each test finished, and the parent's footprint.

``pytest_runtest_logfinish`` runs in the pytest process once per test, whether
the test ran inline, in a fork or in a sandbox (forked children run the
protocol with ``log=False``), so its timestamps give the time per test end
to end. The process's RSS and open fds are sampled from ``/proc/self`` at
session start, after collection, after the first test, every
``$NSBENCH_SAMPLE_EVERY`` tests when set, and at session end.
Everything is written as JSON to ``$NSBENCH_PROBE_OUT`` at session finish,
with the CPU time pytest itself spent so far and that of the children it
reaped so far (``getrusage``): its test processes, but not the sandbox factory
and the inits it reaped, which end at unconfigure.

Only the standard library and pytest's hook names: the pytest-forked
reference venv loads it too.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

_stamps: list[float] = []
_samples: dict[str, dict[str, int]] = {}


def footprint(pid: int | str = "self") -> dict[str, int]:
    """VmRSS (bytes) and the number of open fds of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def pytest_sessionstart(session: Any) -> None:
    _samples["session_start"] = footprint()


def pytest_collection_finish(session: Any) -> None:
    _samples["collected"] = footprint()


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _stamps.append(time.perf_counter())
    if len(_stamps) == 1:
        _samples["after_first_test"] = footprint()
    every = int(os.environ.get("NSBENCH_SAMPLE_EVERY", "0"))
    if every and len(_stamps) % every == 0:
        _samples[f"after_{len(_stamps)}_tests"] = footprint()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    _samples["session_end"] = footprint()
    path = os.environ.get("NSBENCH_PROBE_OUT")
    if not path or hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller writes the file
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {
        "pytest": own.ru_utime + own.ru_stime,
        "reaped": reaped.ru_utime + reaped.ru_stime,
    }
    with open(path, "w") as out:
        json.dump(
            {
                "stamps": _stamps,
                "samples": _samples,
                "pid": os.getpid(),
                "uid": os.getuid(),
                "cpu": cpu,
            },
            out,
        )
