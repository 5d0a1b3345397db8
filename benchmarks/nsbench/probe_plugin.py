"""Loaded into every measured pytest session: when each test finished, and the parent's footprint.

``pytest_runtest_logfinish`` runs in the pytest process once per test, whether
the test ran inline, in a fork or in a sandbox (forked children run the
protocol with ``log=False``), so its timestamps give the time per test end
to end. The process's RSS and open fds are sampled from ``/proc/self`` at
session start, after collection, after the first test, every
``$NSBENCH_SAMPLE_EVERY`` tests when set, and at session end.
Everything is written as JSON to ``$NSBENCH_PROBE_OUT`` as the process exits
(``atexit``), with the CPU time of the children pytest reaped (``getrusage``)
by session finish, its test processes, and by its exit, which adds the
sandbox factory and the inits the factory reaped: they end at unconfigure.
pytest's own CPU time is the rest of its tree's (see
:func:`nsbench.sessions.run_session`), its exit included: taken from the
process itself at session finish, it left pytest's later work to count as
the factory's, and that varied by a hundred milliseconds a session.

With ``$NSBENCH_TIMELINE_OUT`` set (sessions of their own: the timestamps
cost the test process copied pages), each test's way is timed at four
points on the one monotonic clock: pytest's ``logstart`` and ``logfinish``,
kept in pytest, and, in whichever process runs the test, the start of its
``setup`` and the moment its teardown report is asked for, appended to that
file through a descriptor opened here (a forked test process or sandbox
inherits it) as ``nodeid<TAB>setup<TAB>teardown`` lines.

Only the standard library and pytest's hook names: the pytest-forked
reference venv loads it too.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import time
from typing import Any

_stamps: list[float] = []
_samples: dict[str, dict[str, int]] = {}
_edges: dict[str, list[float]] = {}  # with a Timeline, in pytest: nodeid -> [logstart, logfinish]


def footprint(pid: int | str = "self") -> dict[str, int]:
    """VmRSS (bytes) and the number of open fds of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def pytest_configure(config: Any) -> None:
    path = os.environ.get("NSBENCH_TIMELINE_OUT")
    if path:  # registered only then: its hooks would cost every other session's tests
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        config.pluginmanager.register(Timeline(fd), "nsbench-timeline")


class Timeline:
    """The four timestamps of each test (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.setup_started = 0.0  # in the test's process

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        _edges[nodeid] = [time.perf_counter()]

    def pytest_runtest_setup(self, item: Any) -> None:
        self.setup_started = time.perf_counter()

    def pytest_runtest_makereport(self, item: Any, call: Any) -> None:
        """Before the report is built (a firstresult hook: None passes it on to pytest's)."""
        if call.when == "teardown":
            line = f"{item.nodeid}\t{self.setup_started!r}\t{time.perf_counter()!r}\n"
            os.write(self.fd, line.encode())

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        _edges[nodeid].append(time.perf_counter())


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
    atexit.register(_write_probe, path, reaped_cpu_seconds())


def reaped_cpu_seconds() -> float:
    """The CPU time of this process's reaped children, with every descendant they reaped.

    The kernel adds a child's children's times to it as it reaps them: in the
    harness, around one session, that is the pytest process and its whole tree.
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _write_probe(path: str, reaped: float) -> None:
    cpu = {"reaped": reaped, "reaped_at_exit": reaped_cpu_seconds()}
    with open(path, "w") as out:
        json.dump(
            {
                "stamps": _stamps,
                "samples": _samples,
                "pid": os.getpid(),
                "uid": os.getuid(),
                "cpu": cpu,
                "edges": _edges,
            },
            out,
        )
