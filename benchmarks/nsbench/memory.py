"""Section 6: what one sandboxed test in flight costs in memory.

A session runs a single test that sleeps. While it sleeps the harness finds
the pytest process's descendants through ``/proc/<pid>/task/*/children``:
for the full sandbox the session's sandbox factory (a small interpreter of
its own, one per session), the sandbox's init (forked from the factory as
root; a plain user's factory forks an outer process, which forks init) and
the test process (forked from pytest; a plain user's through one more
process); one forked child for the fork-only baseline. It reads
``/proc/<pid>/smaps_rollup`` of each: Rss counts shared copy-on-write pages
in every process, Pss splits them, and Private (Private_Clean +
Private_Dirty) is what exists only because that process exists, the honest
"extra memory" of a sandbox. The figures are given per part (factory, init
with a plain user's outer, test process) and summed. Init is not dumpable:
a plain user may not read its smaps_rollup, and it is counted as unreadable.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Footprint:
    rss: int
    pss: int
    private: int

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.rss + other.rss, self.pss + other.pss, self.private + other.private)


def smaps_rollup(pid: int) -> Footprint:
    """The process's footprint; PermissionError for a process that is not dumpable (init)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if len(fields) == 2 and fields[1] == "kB":
                values[key] = int(fields[0]) * 1024
    return Footprint(
        values.get("Rss", 0),
        values.get("Pss", 0),
        values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    )


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                found.extend(int(child) for child in listing.read().split())
    except OSError:
        pass
    return found


def descendants(pid: int) -> list[int]:
    pending, found = children(pid), []
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children(child))
    return found


#: The parts of a sandbox, in the order the report lists them.
PARTS = ("factory", "init", "test")


def _is_factory(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"pytest_nsbox.factory" in cmdline.read()
    except OSError:
        return False


def parts_of(pid: int) -> dict[str, list[int]]:
    """The descendants of ``pid`` by part: the factory, what it forked, the rest (the test).

    What the factory forked is init, and a plain user's outer above it.
    """
    parts: dict[str, list[int]] = {}
    for top in children(pid):
        below = descendants(top)
        if _is_factory(top):
            parts.setdefault("factory", []).append(top)
            parts.setdefault("init", []).extend(below)
        else:
            parts.setdefault("test", []).extend([top, *below])
    return parts


def sample_in_flight(
    argv: Sequence[str],
    cwd: str,
    env: dict[str, str],
    expected_processes: int,
    settle: float,
    deadline: float = 60.0,
) -> dict[str, object]:
    """Start the session, wait for its sandbox, sample it and the parent, let the session end."""
    process = subprocess.Popen(
        list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        give_up = time.monotonic() + deadline
        while len(descendants(process.pid)) < expected_processes:
            if process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError("the sleeping test's sandbox never appeared")
            time.sleep(0.01)
        time.sleep(settle)  # the test process has imported and set up its fixtures
        parts = parts_of(process.pid)
        parent = smaps_rollup(process.pid)
        sandbox, skipped = Footprint(0, 0, 0), 0
        figures: dict[str, dict[str, int]] = {}
        for part in PARTS:
            if part not in parts:
                continue
            total, unreadable = Footprint(0, 0, 0), 0
            for pid in parts[part]:
                try:
                    total = total + smaps_rollup(pid)
                except PermissionError:  # a plain user's init: not dumpable
                    unreadable += 1
            figures[part] = {"processes": len(parts[part]), **asdict(total)}
            if unreadable:
                figures[part]["unreadable"] = unreadable
            sandbox, skipped = sandbox + total, skipped + unreadable
        output, _ = process.communicate(timeout=deadline)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"session failed ({process.returncode}): {output.decode()[-2000:]}")
    return {
        "processes": sum(len(pids) for pids in parts.values()),
        "parent": asdict(parent),
        "sandbox": asdict(sandbox),
        "unreadable": skipped,  # processes counted but not in the sums
        "parts": figures,
    }
