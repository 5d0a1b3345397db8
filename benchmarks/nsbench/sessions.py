"""Whole pytest sessions in subprocesses: the projects they run, how, and what came back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsbench import machine
from nsbench.probe_plugin import reaped_cpu_seconds

BENCH_DIR = Path(__file__).resolve().parent.parent
FULL_SANDBOX = ("--nsbox", "--nsbox-memory=256m", "--nsbox-cpu=1", "--nsbox-pids=64")
FORKED_REQUIREMENTS = ("pytest==8.4.*", "pytest-forked==1.7.5")
_PASSED = re.compile(r"(\d+) passed")
# Settings that would change what the measured sessions do, inherited from whoever runs us.
_DROPPED_ENV_PREFIXES = (
    "PYTEST_ADDOPTS",
    "PYTEST_NSBOX",
    "PYTEST_PLUGINS",
    "COV_CORE_",
    "NSBENCH_",
)


class SessionFailed(RuntimeError):
    """A measured session did not pass all its tests; the message ends with its output."""


def make_project(root: Path, tests: int, per_file: int = 50, body: str = "pass") -> Path:
    """``tests`` trivial tests in files of ``per_file``, and a pytest.ini that anchors the rootdir.

    Without the ini file pytest would walk up and pick this repository's
    pyproject.toml (its addopts and rootdir) for the generated project.
    """
    root.mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    for first in range(0, tests, per_file):
        functions = [
            f"def test_{i}():\n    {body}\n" for i in range(first, min(first + per_file, tests))
        ]
        (root / f"test_gen_{first // per_file:04d}.py").write_text("\n\n".join(functions))
    return root


def session_env(**extra: str) -> dict[str, str]:
    """The caller's environment without pytest/nsbox/coverage settings; our plugins importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the sessions share the tests' bytecode cache
    env.update(extra)
    return env


def pytest_argv(python: str, project: Path, extra: Sequence[str] = ()) -> list[str]:
    """The same command line for every row, but for ``extra``."""
    return [
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "nsbench.probe_plugin",
        *extra,
        str(project.absolute()),
    ]


#: Whose CPU time a session's is split into (SessionResult.cpu), in the report's order.
CPU_PARTS = ("pytest", "tests", "helpers", "rest")
#: The steps of a test's way between the probe plugin's four timestamps, in the report's order.
TIMELINE_STEPS = ("before", "protocol", "after", "between")


@dataclass
class SessionResult:
    wall: float
    stamps: list[float] = field(default_factory=list)
    samples: dict[str, dict[str, int]] = field(default_factory=dict)
    pid: int = 0
    uid: int = -1  # whom the session's pytest ran as
    busy_cpu: float = 0.0  # CPU seconds the whole machine was busy meanwhile, all cores
    busy_share: float = 0.0  # the share of the machine's CPU time that was busy meanwhile
    #: CPU seconds by whom: "pytest" itself (its process tree's, less every child it
    #: reaped), "tests" (the children it reaped by session finish), "helpers" (those it
    #: reaped later: the sandbox factory and the inits the factory reaped), "rest" (the
    #: machine's busy time beyond the tree: kernel threads).
    cpu: dict[str, float] = field(default_factory=dict)
    #: When the session was spawned, on the clock of ``stamps`` (perf_counter, the
    #: system-wide CLOCK_MONOTONIC): its start is ``stamps[0] - spawned``.
    spawned: float = 0.0
    #: With a timeline (run_session's ``timeline_out``), per test in order: pytest's
    #: logstart, the test process's setup, its teardown report, pytest's logfinish.
    timeline: list[tuple[float, float, float, float]] = field(default_factory=list)


def run_session(
    argv: Sequence[str],
    env: dict[str, str],
    expected: int,
    probe_out: Path,
    timeout: float,
    preexec: Callable[[], None] | None = None,
    timeline_out: Path | None = None,
) -> SessionResult:
    """Run one session, timed from spawn to exit; it must pass exactly ``expected`` tests.

    ``preexec`` runs in the child before the exec (a plain user's rows drop
    their ids there: :func:`nsbench.plainuser.becoming`). ``timeline_out``:
    where the probe plugin's test processes write their timestamps (see
    :mod:`nsbench.probe_plugin`), for :attr:`SessionResult.timeline`.
    """
    probe_out = probe_out.absolute()  # the session runs in the project's directory
    env = dict(env, NSBENCH_PROBE_OUT=str(probe_out))
    if timeline_out is not None:
        env["NSBENCH_TIMELINE_OUT"] = str(timeline_out.absolute())
    busy_before, all_before = machine.cpu_ticks()
    tree_before = reaped_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(
        list(argv),
        cwd=str(argv[-1]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )
    wall = time.perf_counter() - started
    busy_after, all_after = machine.cpu_ticks()
    busy_ticks, all_ticks = busy_after - busy_before, all_after - all_before
    busy = busy_ticks * machine.CLOCK_TICK
    share = busy_ticks / all_ticks if all_ticks else 0.0
    tree = reaped_cpu_seconds() - tree_before
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    passed = _PASSED.search(tail[0])
    if done.returncode != 0 or passed is None or int(passed.group(1)) != expected:
        raise SessionFailed(
            f"exit {done.returncode}, expected {expected} passed; output:\n{done.stdout[-3000:]}"
        )
    probe: dict[str, Any] = json.loads(probe_out.read_text())
    probe_out.unlink()
    reaped, reaped_at_exit = probe["cpu"]["reaped"], probe["cpu"]["reaped_at_exit"]
    cpu = {
        "pytest": tree - reaped_at_exit,
        "tests": reaped,
        "helpers": reaped_at_exit - reaped,
        "rest": busy - tree,
    }
    result = SessionResult(
        wall,
        probe["stamps"],
        probe["samples"],
        probe["pid"],
        probe["uid"],
        busy,
        share,
        cpu,
        spawned=started,
    )
    if timeline_out is not None:
        result.timeline = _timeline(probe["edges"], timeline_out)
    return result


def _timeline(
    edges: dict[str, list[float]], written: Path
) -> list[tuple[float, float, float, float]]:
    """Join pytest's two timestamps of each test with the two its test process wrote."""
    inside: dict[str, tuple[float, float]] = {}
    for line in written.read_text().splitlines():
        nodeid, setup, teardown = line.split("\t")
        inside[nodeid] = (float(setup), float(teardown))
    written.unlink()
    missing = sorted(set(edges) ^ set(inside))
    if missing:
        raise SessionFailed(f"timeline: tests timed only on one side: {missing[:5]}")
    return sorted((start, *inside[nodeid], finish) for nodeid, (start, finish) in edges.items())


def ensure_forked_venv(cache: Path) -> tuple[str | None, str]:
    """The pytest-forked reference venv, made on first use: (its python, versions) or (None, why).

    pytest-forked 1.7.5 does not run on pytest 9, so it gets pytest 8.4 in a
    venv of its own under benchmarks/.cache (gitignored), reused by later runs.
    """
    return _ensure_venv(cache / "pytest-forked-venv", FORKED_REQUIREMENTS, "pytest-forked")


def ensure_nsbox_on_pytest8_venv(cache: Path) -> tuple[str | None, str]:
    """This plugin on the reference venv's pytest, in a venv of its own: (its python, versions).

    pytest-forked's row runs on pytest 8.4 and the plugin's on this
    interpreter's pytest: the plugin's full sandbox on pytest 8.4 tells how
    much of the gap between the two is pytest's own. The project is
    installed editable, so that venv runs this tree's code; pytest-forked's
    venv stays as its users have it.
    """
    requirements = (FORKED_REQUIREMENTS[0], "-e", str(BENCH_DIR.parent))
    return _ensure_venv(cache / "nsbox-pytest8-venv", requirements, "pytest-nsbox")


def _ensure_venv(venv: Path, requirements: Sequence[str], package: str) -> tuple[str | None, str]:
    """A venv with ``requirements``, made once (a marker says it is complete), and its versions."""
    python = venv / "bin" / "python"
    marker = venv / ".nsbench-ready"
    if not marker.exists():
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "-q", *requirements],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"{' '.join(step[:4])}: {exc}"
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                return None, f"{' '.join(step[:4])} failed: {lines[-1] if lines else '?'}"
        marker.write_text("ok\n")
    versions = subprocess.run(
        [str(python), "-c", _VERSIONS.format(package=package)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if versions.returncode != 0:
        return None, f"the venv at {venv} is broken: {versions.stderr.strip()[-200:]}"
    return str(python), versions.stdout.strip()


_VERSIONS = (
    "from importlib.metadata import version as v; "
    "print(f\"pytest {{v('pytest')}}, {package} {{v('{package}')}}\")"
)
