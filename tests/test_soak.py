"""Soak: many sandboxed tests of every kind, under pytest-xdist; nothing leaks.

Kept out of the default run: ``NSBOX_SOAK=1000 pytest tests/test_soak.py``
runs 1,000 tests (CI runs a bounded number). Checked afterwards: every
outcome is the expected one, no cgroup, mount or process of the run remains,
and the pytest workers' own memory and open file descriptors did not grow
with the number of tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import cgroup_session_dirs, pid_alive

COUNT = int(os.environ.get("NSBOX_SOAK", "0"))

pytestmark = pytest.mark.skipif(
    COUNT == 0, reason="soak test: set NSBOX_SOAK=<number of tests> to run it"
)

# kind -> (share of the tests, expected outcome, expected event)
KINDS = {
    "pass": (40, "passed", None),
    "fail": (20, "failed", None),
    "oom": (10, "failed", "oom"),
    "pids": (10, "failed", "pids"),
    "crash": (15, "failed", None),
    "timeout": (5, "failed", "timeout"),
}

BODIES = {
    "pass": "@pytest.mark.nsbox\ndef test_{i}_pass():\n    assert sum(range(100)) == 4950\n",
    "fail": "@pytest.mark.nsbox\ndef test_{i}_fail():\n    assert {i} < 0\n",
    "oom": (
        "@pytest.mark.nsbox(memory='32m')\ndef test_{i}_oom():\n"
        "    hog = bytearray(96 * 1024 * 1024)\n    hog[::4096] = b'x' * len(hog[::4096])\n"
    ),
    "pids": (
        "@pytest.mark.nsbox(pids=8)\ndef test_{i}_pids():\n"
        "    for _ in range(16):\n        if os.fork() == 0:\n            time.sleep(5)\n"
        "            os._exit(0)\n"
    ),
    "crash": "@pytest.mark.nsbox\ndef test_{i}_crash():\n    os.kill(os.getpid(), 11)\n",
    "timeout": "@pytest.mark.nsbox(timeout=0.5)\ndef test_{i}_timeout():\n    time.sleep(30)\n",
}

WATCH = """
import os, json
import pytest

SEEN = {"count": 0}

def _sample():
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"rss": rss, "fds": len(os.listdir("/proc/self/fd"))}

@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid):
    SEEN["count"] += 1
    if SEEN["count"] == 20:
        SEEN["early"] = _sample()

def pytest_sessionfinish(session):
    if "early" in SEEN:
        with open(os.path.join(os.path.dirname(__file__), f"watch-{os.getpid()}.json"), "w") as f:
            json.dump({"early": SEEN["early"], "late": _sample(), "count": SEEN["count"]}, f)
"""


def kind_of(index: int) -> str:
    slot, total = index % 100, 0
    for kind, (share, _, _) in KINDS.items():
        total += share
        if slot < total:
            return kind
    raise AssertionError(index)


def leftovers() -> tuple[set[str], list[str]]:
    """nsbox cgroup dirs whose owner is dead, and mounts mentioning nsbox."""
    dead = {d for d, owner in cgroup_session_dirs().items() if not pid_alive(owner)}
    with open("/proc/self/mountinfo") as f:
        mounts = [m for m in f.read().splitlines() if "nsbox" in m]
    return dead, mounts


def test_soak(pytester: pytest.Pytester) -> None:
    lines = ["import os, time", "import pytest", ""]
    for i in range(COUNT):
        lines.append(BODIES[kind_of(i)].format(i=i))
    pytester.makepyfile(test_many="\n".join(lines))
    pytester.makeconftest(WATCH)
    report = pytester.path / "nsbox.json"
    dead_before, mounts_before = leftovers()
    result = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", "-q", f"--nsbox-report={report}", timeout=3600
    )
    records = {r["nodeid"].split("::")[-1]: r for r in json.loads(report.read_text())["tests"]}
    assert len(records) == COUNT, result.stdout.str()[-2000:]
    wrong = []
    for i in range(COUNT):
        kind = kind_of(i)
        _, outcome, event = KINDS[kind]
        record = records[f"test_{i}_{kind}"]
        if record["outcome"] != outcome or (event and event not in record["events"]):
            wrong.append((i, kind, record["outcome"], record["events"], record["messages"]))
        if kind == "crash" and "SIGSEGV" not in " ".join(record["messages"]):
            wrong.append((i, kind, record["messages"]))
    assert wrong == []
    dead_after, mounts_after = leftovers()
    assert dead_after - dead_before == set()
    assert mounts_after == mounts_before
    assert not [
        p for p in os.listdir("/proc") if p.isdigit() and _is_test_process(p, pytester.path)
    ]

    for watch in pytester.path.glob("watch-*.json"):
        data = json.loads(watch.read_text())
        grew_rss = data["late"]["rss"] - data["early"]["rss"]
        grew_fds = data["late"]["fds"] - data["early"]["fds"]
        print(
            f"worker {watch.name}: {data['count']} tests, RSS +{grew_rss / 2**20:.1f} MiB, fds {grew_fds:+d}"
        )
        assert grew_fds <= 2, data
        # A bound, measured: the records kept for the summary and the JSON
        # report grow by about 1 KiB a test; anything per-test beyond that
        # (a leaked frame buffer, report, or fd) would show here.
        assert grew_rss < 8 * 2**20 + 4096 * data["count"], data


def _is_test_process(pid: str, project: Path) -> bool:
    try:
        return str(project) in os.readlink(f"/proc/{pid}/cwd") and pid != str(os.getpid())
    except OSError:
        return False
