"""What the figures were measured on: they mean little without it."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cgroup_layout() -> str:
    """v1, v2 or hybrid (v1 controllers plus a cgroup2 mount), from this process's mounts."""
    kinds = set()
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                kinds.add(fields[fields.index("-") + 1])
    except (OSError, ValueError):
        return "unknown"
    v1, v2 = "cgroup" in kinds, "cgroup2" in kinds
    return (
        "hybrid (v1 controllers + cgroup2)" if v1 and v2 else "v1" if v1 else "v2" if v2 else "none"
    )


#: Seconds per clock tick, the unit of /proc/stat's counters.
CLOCK_TICK = 1 / os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> tuple[int, int]:
    """Clock ticks the whole machine has spent busy, and in all, since boot, over its cores.

    From ``/proc/stat``'s first line: busy is user, nice, system, irq,
    softirq and steal (idle and iowait left out); all adds those two. It
    counts every process and the kernel's own threads (RCU, the workqueues
    that finish a network namespace's teardown), which a process's rusage
    does not. Whole numbers from the same counters: the busy share of a
    window is exactly at most one, whatever the ticks' rounding.
    """
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def describe() -> dict[str, str]:
    """The machine and the software versions, as labelled in the report."""
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "pytest": _version("pytest"),
        "pytest-nsbox": _version("pytest-nsbox"),
        "pytest-xdist": _version("pytest-xdist"),
        "cgroups": _cgroup_layout(),
        "euid": str(os.geteuid()),
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
