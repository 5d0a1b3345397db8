#!/usr/bin/env python3
"""Benchmark of pytest-nsbox: what a sandbox costs per test, against pytest-forked and the kernel.

Usage (as root on Linux, from the project's venv)::

    .venv/bin/python benchmarks/run.py            # the full run, a few minutes
    .venv/bin/python benchmarks/run.py --quick    # a smoke run
    .venv/bin/python benchmarks/run.py --json out.json

Sections, all measured in one run and compared only within it:

1. per-test overhead of N trivial tests, as whole pytest sessions, for plain
   pytest, a fork-only baseline, the nsbox engine layer by layer, the full
   plugin, and pytest-forked 1.7.5 in a venv of its own (pytest 8.4), with
   the full plugin on that pytest too (a venv of its own); and,
   run as root, the plain user ``nsbox-tester``'s inline, fork-only and
   ``--nsbox`` sessions (the rootless path); and, in one more session per
   row for a few of them, each test's way step by step (before its test
   process runs its setup, the protocol, after, between tests);
2. the raw floor: the same system calls from a minimal Python process;
3. overlay set-up time against the size of the rootdir, and copytree's;
4. sustained throughput and the parent's RSS/fds over a long session, and
   the same over a fork-only session of as many tests, the reference;
5. ``-n 2`` against ``-n 0`` for the full sandbox;
6. the memory of one sandboxed test in flight;
7. how long a new process takes to get into a test's cgroup, by the way it
   gets there (v1's ``tasks``, ``cgroup.procs``, born there by clone3).

Sessions of section 1 (with the raw floor and section 5) run in rounds, in a
new random order each round; a row's overhead per test in a round is
``(wall - wall of the inline row of the same round) / N``, and its CPU per
test is the whole machine's busy time (``/proc/stat``, every core, kernel
threads included) over the inline row's, per test, split by whom: pytest
itself, its test processes, the rest of its process tree (the factory and
the inits) and the rest of the machine (kernel threads). Figures are the
median over rounds with the p10-p90 band. Progress goes to stderr, the
report to stdout, and ``--json`` saves every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nsbench import cgroupmove, machine, memory, overlay, plainuser, sessions
from nsbench.report import render
from nsbench.rows import ROWS, Row
from nsbench.stats import intervals, quantile, summarize

#: The reference venvs, one set per interpreter: they are made with the one running
#: the harness, so that every row of a run is on the same Python.
CACHE = sessions.BENCH_DIR / ".cache" / f"py{sys.version_info[0]}.{sys.version_info[1]}"
RAWFLOOR = sessions.BENCH_DIR / "nsbench" / "rawfloor.py"
ALL_SECTIONS = (1, 2, 3, 4, 5, 6, 7)


@dataclass(frozen=True)
class Mode:
    """How big each section is."""

    n: int
    reps: int
    sustained: int
    window: int
    tree_sizes: tuple[int, ...]
    set_up_reps: int
    copy_reps: int
    floor_iterations: int  # per round
    sleep: float
    moves: int  # section 7: of each way, at each pace


DEFAULT = Mode(500, 3, 5000, 500, (10, 1_000, 50_000), 40, 3, 60, 3.0, 100)
QUICK = Mode(60, 2, 300, 100, (10, 1_000, 5_000), 25, 1, 10, 1.5, 20)

_started = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- what this machine offers ------------------------------------------------


def nsbox_status() -> tuple[str | None, Any]:
    """Why nsbox cannot sandbox here (or None); an open cgroup manager, or why there is none."""
    from pytest_nsbox import cgroups, probe

    caps = probe.probe()
    problem = None if caps.usable else f"{caps.problem} (fix: {caps.fix})"
    try:
        manager: Any = cgroups.open_manager()
    except cgroups.CgroupUnavailable as exc:
        manager = str(exc).splitlines()[0]
    return problem, manager


# -- section 1 and 5: sessions in rounds, with the raw floor among them ------


@dataclass
class RowRuns:
    row: Row
    results: dict[int, sessions.SessionResult]
    problem: str | None = None


@dataclass(frozen=True)
class Projects:
    """Where the rows' sessions run: root's project, and the plain user's copy, which it owns."""

    root: Path
    scratch: Path  # root's, for the probe's output
    user: Path | None = None  # the plain user's directory: its project and probe output
    uid: int = -1
    gid: int = -1

    def for_row(self, row: Row) -> tuple[Path, Path, Callable[[], None] | None]:
        """(project, probe output, preexec) of a row's session."""
        if not row.user:
            return self.root, self.scratch / "probe.json", None
        assert self.user is not None
        project = self.user / "project"
        reachable = [*plainuser.interpreter_paths(), str(self.user)]
        become = plainuser.becoming(self.uid, self.gid, reachable)
        return project, self.user / "probe.json", become


def plain_user_projects(root: Path, scratch: Path, n: int) -> Projects | str:
    """``root`` and a copy of its project that the plain user owns; or why there is none."""
    if os.geteuid() != 0:
        return "the harness runs as a plain user: its other rows are the rootless path already"
    try:
        entry = pwd.getpwnam(plainuser.PLAIN_USER)
    except KeyError:
        return (
            f"no user {plainuser.PLAIN_USER!r} (the test suite creates it: "
            f"useradd --system --no-create-home {plainuser.PLAIN_USER})"
        )
    home = scratch / "plain-user"
    sessions.make_project(home / "project", n)
    for path in (home, *home.rglob("*")):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return Projects(root, scratch, home, entry.pw_uid, entry.pw_gid)


def run_rounds(
    rows: Sequence[Row],
    projects: Projects,
    n: int,
    pythons: dict[str, str],
    mode: Mode,
    floor_job: Callable[[int], None] | None,
    seed: int,
) -> dict[str, RowRuns]:
    """Every row once per round, rows (and the floor job) in a new random order each round."""
    runs = {row.key: RowRuns(row, {}) for row in rows}
    for venv, user in sorted({(row.venv, row.user) for row in rows}):
        who = " as the plain user" if user else ""
        log(f"warm-up: inline session on the {venv} venv{who} (bytecode caches)")
        _one_session(Row("warmup", "", "", venv, user=user), projects, n, pythons)
    rng = random.Random(seed)
    for round_number in range(mode.reps):
        jobs: list[Any] = [row for row in rows]
        if floor_job is not None:
            jobs.append("floor")
        rng.shuffle(jobs)
        for job in jobs:
            if job == "floor":
                assert floor_job is not None
                log(f"round {round_number + 1}/{mode.reps}: raw floor")
                floor_job(round_number)
                continue
            entry = runs[job.key]
            if entry.problem is not None:
                continue
            log(f"round {round_number + 1}/{mode.reps}: {job.label}")
            try:
                entry.results[round_number] = _one_session(job, projects, n, pythons)
            except (sessions.SessionFailed, subprocess.TimeoutExpired) as exc:
                entry.problem = f"session failed: {str(exc)[-1500:]}"
                log(f"  {job.key} failed: {str(exc)[-400:]}")
    return runs


def _row(key: str) -> Row:
    """The row of section 1 or 5 with this key."""
    return next(r for r in ROWS if r.key == key)


def _one_session(
    row: Row, projects: Projects, n: int, pythons: dict[str, str], *, timeline: bool = False
) -> sessions.SessionResult:
    project, probe_out, preexec = projects.for_row(row)
    argv = sessions.pytest_argv(pythons[row.venv], project, row.args)
    env = sessions.session_env(**row.env)
    if row.user:
        env["HOME"] = str(project.parent)
    timeout = 120 + 2.0 * n
    timeline_out = probe_out.with_name("timeline.txt") if timeline else None
    return sessions.run_session(argv, env, n, probe_out, timeout, preexec, timeline_out)


#: The venvs beside this interpreter's: what each is, how it is made, its report key.
REFERENCE_VENVS: dict[str, tuple[str, Callable[[Path], tuple[str | None, str]], str]] = {
    "forked": ("pytest-forked reference venv", sessions.ensure_forked_venv, "pytest_forked"),
    "nsbox8": (
        "the plugin's venv on pytest 8.4",
        sessions.ensure_nsbox_on_pytest8_venv,
        "nsbox_pytest8",
    ),
}
#: The rows whose tests are also timed step by step, in sessions of their own.
TIMELINE_ROWS = ("inline", "fork", "full", "forked_inline", "forked")


def measure_timelines(
    runs: dict[str, RowRuns], projects: Projects, n: int, pythons: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Each of TIMELINE_ROWS that ran: one more session, timestamped, and its steps in ms.

    Per test, the median over the session's tests but its first: before
    (pytest's logstart to the test process's setup: pytest's own steps, the
    fork, a sandbox's set-up), protocol (setup to the teardown report),
    after (the reports' way back, the test process's exit, pytest's own
    steps to logfinish), between (logfinish to the next test's logstart).
    """
    figures: dict[str, dict[str, Any]] = {}
    for key in TIMELINE_ROWS:
        entry = runs.get(key)
        if entry is None or entry.problem is not None or not entry.results:
            continue
        log(f"timeline: {entry.row.label}")
        try:
            result = _one_session(entry.row, projects, n, pythons, timeline=True)
        except (sessions.SessionFailed, subprocess.TimeoutExpired) as exc:
            figures[key] = {"label": entry.row.label, "problem": str(exc)[-600:]}
            continue
        tests = result.timeline[1:]
        steps = {
            "before": [setup - start for start, setup, _, _ in tests],
            "protocol": [teardown - setup for _, setup, teardown, _ in tests],
            "after": [finish - teardown for _, _, teardown, finish in tests],
            "between": [b[0] - a[3] for a, b in itertools.pairwise(tests)],
        }
        figures[key] = {"label": entry.row.label, "problem": None}
        figures[key].update(
            {
                f"{step}_ms": summarize(steps[step]).scaled(1000).as_dict()
                for step in sessions.TIMELINE_STEPS
            }
        )
    return figures


def summarize_rows(runs: dict[str, RowRuns], n: int) -> dict[str, dict[str, Any]]:
    """Per row: wall time, overhead per test and busy CPU per test (paired by round), interval.

    The busy CPU is the whole machine's, every core's, over the inline
    session's of the same round: what a sandboxed test costs the machine,
    in whichever process or kernel thread it was spent; ``cpu_split_ms``
    splits it by whom (:data:`nsbench.sessions.CPU_PARTS`), each part over
    the inline session's same part. ``start_ms`` and ``end_ms``, over the
    inline session's of the round as well: the session's time from its
    spawn to its first test's logfinish, and from its last test's to its
    exit, which the overhead per test holds divided by N.
    """
    table: dict[str, dict[str, Any]] = {}
    for key, entry in runs.items():
        row = entry.row
        figures: dict[str, Any] = {"label": row.label, "how": row.how, "problem": entry.problem}
        table[key] = figures
        if entry.problem is not None or not entry.results:
            figures["problem"] = entry.problem or "not run"
            continue
        walls = [r.wall for r in entry.results.values()]
        figures["wall_s"] = summarize(walls).as_dict()
        figures["uids"] = sorted({r.uid for r in entry.results.values()})
        pooled = [i for r in entry.results.values() for i in intervals(r.stamps)]
        figures["interval_ms"] = summarize(pooled).scaled(1000).as_dict()
        cores = os.cpu_count() or 1
        figures["cores_busy"] = summarize(
            [r.busy_share * cores for r in entry.results.values()]
        ).as_dict()
        base = runs.get(row.baseline)
        if base is not None and key != row.baseline:
            rounds = [k for k in entry.results if k in base.results]
            if rounds:
                pairs = [(entry.results[k], base.results[k]) for k in rounds]
                overheads = [(r.wall - b.wall) / n * 1000 for r, b in pairs]
                cpu = [(r.busy_cpu - b.busy_cpu) / n * 1000 for r, b in pairs]
                figures["overhead_ms"] = summarize(overheads).as_dict()
                figures["start_ms"] = summarize(
                    [(_start(r) - _start(b)) * 1000 for r, b in pairs]
                ).as_dict()
                figures["end_ms"] = summarize(
                    [(_end(r) - _end(b)) * 1000 for r, b in pairs]
                ).as_dict()
                figures["cpu_ms"] = summarize(cpu).as_dict()
                figures["cpu_split_ms"] = {
                    part: summarize(
                        [(r.cpu[part] - b.cpu[part]) / n * 1000 for r, b in pairs]
                    ).as_dict()
                    for part in sessions.CPU_PARTS
                }
    return table


def _start(result: sessions.SessionResult) -> float:
    """From the session's spawn to its first test's logfinish (interpreter, collection, set-up)."""
    return result.stamps[0] - result.spawned


def _end(result: sessions.SessionResult) -> float:
    """From the session's last test's logfinish to its exit (summary, unconfigure, exit)."""
    return result.spawned + result.wall - result.stamps[-1]


# -- section 2: the raw floor --------------------------------------------------


class Floor:
    """Runs rawfloor.py a slice at a time (one call per round) and pools the iterations."""

    def __init__(
        self, project: Path, iterations: int, cgroup_sessions: Sequence[str], bind: str
    ) -> None:
        self.project = project
        self.iterations = iterations
        self.cgroup_sessions = list(cgroup_sessions)
        self.bind = bind
        self.levels = ["fork", "ns", "overlay", "lo"] + (["full"] if cgroup_sessions else [])
        self.seconds: dict[str, list[float]] = {}
        self.ballast_seconds: dict[str, list[float]] = {}
        self.phases: dict[str, dict[str, list[float]]] = {}
        self.ballast_phases: dict[str, dict[str, list[float]]] = {}
        self.rss = 0
        self.factory_rss = 0
        self.ballast_rss = 0
        self.ballast_mb = 0
        self.problem: str | None = None

    def run(self, ballast_mb: int = 0) -> None:
        if self.problem is not None:
            return
        levels = self.levels if not ballast_mb else ["fork", self.levels[-1]]
        argv = [sys.executable, "-I", "-S", str(RAWFLOOR), "--rootdir", str(self.project)]
        argv += ["--iterations", str(self.iterations), "--levels", ",".join(levels)]
        argv += ["--bind", self.bind, "--ballast-mb", str(ballast_mb)]
        for session in self.cgroup_sessions:
            argv += ["--cgroup-session", session]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            self.problem = f"rawfloor.py failed: {done.stderr.strip()[-800:]}"
            return
        data = json.loads(done.stdout)
        target = self.ballast_seconds if ballast_mb else self.seconds
        for level, values in data["seconds"].items():
            target.setdefault(level, []).extend(values)
        phases = self.ballast_phases if ballast_mb else self.phases
        for level, split in data["phases"].items():
            for phase, values in split.items():
                phases.setdefault(level, {}).setdefault(phase, []).extend(values)
        if ballast_mb:
            self.ballast_rss, self.ballast_mb = data["rss"], ballast_mb
        else:
            self.rss, self.factory_rss = data["rss"], data["factory_rss"]

    def figures(self) -> dict[str, Any]:
        def ms(values: dict[str, list[float]]) -> dict[str, Any]:
            return {k: summarize(v).scaled(1000).as_dict() for k, v in values.items() if v}

        return {
            "problem": self.problem,
            "levels_ms": ms(self.seconds),
            "phases_ms": {level: ms(split) for level, split in self.phases.items()},
            "rss": self.rss,
            "factory_rss": self.factory_rss,
            "ballast_levels_ms": ms(self.ballast_seconds),
            "ballast_phases_ms": {level: ms(split) for level, split in self.ballast_phases.items()},
            "ballast_rss": self.ballast_rss,
            "cgroup_sessions": self.cgroup_sessions,
        }


def pytest_rss(runs: dict[str, RowRuns]) -> int:
    """The inline pytest parent's RSS after its first test: every fork copies its page tables."""
    entry = runs.get("inline")
    values = [
        r.samples["after_first_test"]["rss"]
        for r in (entry.results.values() if entry else [])
        if "after_first_test" in r.samples
    ]
    return int(quantile(values, 0.5)) if values else 0


# -- sections 3, 4 and 6 ---------------------------------------------------------


def measure_overlay(top: Path, mode: Mode) -> dict[str, Any]:
    results = overlay.measure(str(top), mode.tree_sizes, mode.set_up_reps, mode.copy_reps)
    return {
        str(size): {
            "set_up_ms": summarize(values["set_up"]).scaled(1000).as_dict(),
            "copytree_ms": summarize(values["copytree"]).scaled(1000).as_dict(),
        }
        for size, values in results.items()
    }


def measure_sustained(project: Path, total: int, window: int, scratch: Path) -> dict[str, Any]:
    """One long full-sandbox session: tests/s over the first and last ``window``, RSS and fds.

    Then the same tests in one fork-only session, as the reference: what a
    fork per test loses over the session by itself (pytest keeps every
    report, and every fork copies the page tables of all it keeps), so that
    a slowdown of the sandbox can be told from pytest's own.
    """
    sessions_run: dict[str, dict[str, Any]] = {}
    for key, row in (("full", _row("full")), ("fork_only", _row("fork"))):
        argv = sessions.pytest_argv(sys.executable, project, row.args)
        env = sessions.session_env(NSBENCH_SAMPLE_EVERY=str(window), **row.env)
        result = sessions.run_session(argv, env, total, scratch / "probe.json", 300 + 2.0 * total)
        sessions_run[key] = {
            "wall_s": result.wall,
            **_throughput(result.stamps, window),
            "samples": result.samples,
        }
    return {"tests": total, "window": window, **sessions_run.pop("full"), **sessions_run}


def _throughput(stamps: list[float], window: int) -> dict[str, Any]:
    """Tests/s over the first and the last ``window`` of a session's logfinish timestamps."""
    first = window / (stamps[window] - stamps[0])
    last = window / (stamps[-1] - stamps[-1 - window])
    # Every window in between too: a trend tells a cost that grows from a load spike.
    trend = [
        window / (stamps[end] - stamps[end - window]) for end in range(window, len(stamps), window)
    ]
    return {
        "first_per_s": first,
        "last_per_s": last,
        "ratio": last / first,
        "per_window_per_s": trend,
    }


def measure_memory(project: Path, sleep: float) -> dict[str, Any]:
    """The sleeping test in the full sandbox and in the fork-only baseline (1 process).

    The full sandbox's processes: the session's factory, the sandbox's init
    (forked from the factory; for a plain user, through an outer process),
    and the test process (forked from pytest; for a plain user, through one
    more process): 3 as root, 5 for a plain user.
    """
    figures: dict[str, Any] = {}
    cases = (("full", 3 if os.geteuid() == 0 else 5), ("fork", 1))
    for key, processes in cases:
        row = _row(key)
        argv = sessions.pytest_argv(sys.executable, project, row.args)
        try:
            figures[key] = memory.sample_in_flight(
                argv, str(project), sessions.session_env(**row.env), processes, settle=sleep / 3
            )
        except RuntimeError as exc:
            figures[key] = {"problem": str(exc)[-800:]}
    return figures


# -- targets --------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The PASS/FAIL lines, each from figures measured in this run."""
    rows = report.get("overhead", {})
    out = []

    def median(figures: dict[str, Any] | None, key: str) -> float | None:
        value = (figures or {}).get(key)
        return None if value is None else float(value["median"])

    def check(name: str, value: float | None, limit: float, higher_is_better: bool = False) -> None:
        if value is None:
            out.append({"target": name, "status": "SKIP", "value": None, "limit": limit})
            return
        ok = value >= limit if higher_is_better else value <= limit
        out.append(
            {"target": name, "status": "PASS" if ok else "FAIL", "value": value, "limit": limit}
        )

    full = median(rows.get("full"), "overhead_ms")
    forked = median(rows.get("forked"), "overhead_ms")
    floor = median(report.get("floor", {}).get("levels_ms", {}), "full")
    check(
        "full sandbox overhead / pytest-forked overhead <= 1.0",
        full / forked if full is not None and forked else None,
        1.0,
    )
    check(
        "full sandbox overhead / raw floor (full) <= 2.0",
        full / floor if full is not None and floor else None,
        2.0,
    )
    scale = report.get("overlay", {})
    sizes = sorted(int(s) for s in scale if s.isdigit())
    if len(sizes) >= 2:
        small, big = scale[str(sizes[0])]["set_up_ms"], scale[str(sizes[-1])]["set_up_ms"]
        name = f"overlay set-up {sizes[-1]} files / {sizes[0]} files <= 1.2"
        check(name, big["median"] / small["median"], 1.2)
    else:
        check("overlay set-up largest / smallest tree <= 1.2", None, 1.2)
    sustained = report.get("sustained", {})
    check(
        "sustained last-window / first-window throughput >= 0.9", sustained.get("ratio"), 0.9, True
    )
    return out


# -- the run ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Mode]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes")
    parser.add_argument("--json", metavar="FILE", help="save every figure to FILE")
    parser.add_argument("--sections", default=",".join(map(str, ALL_SECTIONS)))
    parser.add_argument(
        "--no-pytest-forked",
        action="store_true",
        help="skip the reference venvs (pytest-forked's, and the plugin's on pytest 8.4)",
    )
    parser.add_argument(
        "--rows", help="only these rows of section 1 (keys: " + ", ".join(r.key for r in ROWS) + ")"
    )
    parser.add_argument("--seed", type=int, default=1, help="of the order of rows in rounds")
    parser.add_argument("--keep", action="store_true", help="keep the generated projects")
    for name in ("n", "reps", "sustained", "window", "set-up-reps", "copy-reps"):
        parser.add_argument(f"--{name}", type=int, help="override the mode's size")
    parser.add_argument("--floor-iterations", type=int, help="raw-floor iterations per round")
    parser.add_argument("--tree-sizes", help="comma-separated file counts, e.g. 10,1000,50000")
    parser.add_argument("--sleep", type=float, help="seconds the memory section's test sleeps")
    parser.add_argument("--moves", type=int, help="section 7's moves of each way at each pace")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else DEFAULT
    overrides: dict[str, Any] = {
        field: getattr(args, field)
        for field in (
            "n",
            "reps",
            "sustained",
            "window",
            "set_up_reps",
            "copy_reps",
            "sleep",
            "moves",
        )
        if getattr(args, field) is not None
    }
    if args.floor_iterations is not None:
        overrides["floor_iterations"] = args.floor_iterations
    if args.tree_sizes:
        overrides["tree_sizes"] = tuple(int(s) for s in args.tree_sizes.split(","))
    mode = replace(mode, **overrides)
    if mode.sustained <= 2 * mode.window:
        parser.error("--sustained must be more than twice --window")
    return args, mode


def run(args: argparse.Namespace, mode: Mode, scratch: Path) -> dict[str, Any]:
    sections = {int(s) for s in args.sections.split(",")}
    report: dict[str, Any] = {"machine": machine.describe(), "mode": asdict(mode)}
    report["sections"] = sorted(sections)
    problem, manager = nsbox_status()
    report["nsbox_problem"] = problem
    try:
        if sections & {1, 2, 5}:
            _sessions_and_floor(report, sections, mode, scratch, manager, args)
        if 3 in sections:
            log(f"overlay scaling: trees of {', '.join(map(str, mode.tree_sizes))} files")
            report["overlay"] = _guarded(lambda: measure_overlay(scratch, mode))
        if 4 in sections:
            log(f"sustained: {mode.sustained} tests in one session, sandboxed, then fork-only")
            project = sessions.make_project(scratch / "sustained", mode.sustained, per_file=100)
            report["sustained"] = _guarded(
                lambda: measure_sustained(project, mode.sustained, mode.window, scratch)
            )
        if 6 in sections:
            log("memory: one sandboxed test in flight")
            body = f"__import__('time').sleep({mode.sleep})"
            project = sessions.make_project(scratch / "memory", 1, body=body)
            report["memory"] = _guarded(lambda: measure_memory(project, mode.sleep))
        if 7 in sections:
            log("moving into a cgroup: tasks, cgroup.procs, born there")
            report["moves"] = (
                {"problem": f"no cgroups: {manager}"}
                if isinstance(manager, str)
                else _guarded(lambda: cgroupmove.measure_moves(manager, mode.moves, log))
            )
    finally:
        if not isinstance(manager, str):
            manager.close()
    report["targets"] = targets(report)
    return report


def _guarded(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A section's figures, or what made it fail: one broken section must not lose the others."""
    try:
        return measure()
    except (OSError, RuntimeError, subprocess.SubprocessError, KeyError, ValueError) as exc:
        log(f"  failed: {exc!r}"[:600])
        return {"problem": f"{type(exc).__name__}: {str(exc)[-1500:]}"}


def _sessions_and_floor(
    report: dict[str, Any],
    sections: set[int],
    mode: Mode,
    scratch: Path,
    manager: Any,
    args: argparse.Namespace,
) -> None:
    project = sessions.make_project(scratch / "project", mode.n)
    pythons = {"main": sys.executable}
    rows = [r for r in ROWS if r.section == 1 and 1 in sections]
    if 5 in sections:
        rows += [r for r in ROWS if r.key in ("inline", "full", "xdist") and r not in rows]
    if args.rows:
        wanted = set(args.rows.split(","))
        baselines = {r.baseline for r in rows if r.key in wanted}
        rows = [r for r in rows if r.key in wanted | baselines | {"inline"}]
    skipped: dict[str, str] = {}
    projects: Projects | str = Projects(project, scratch)
    if any(r.user for r in rows):
        projects = plain_user_projects(project, scratch, mode.n)
        if isinstance(projects, str):
            skipped.update({r.key: projects for r in rows if r.user})
            projects = Projects(project, scratch)
    for venv, (what, ensure, key) in REFERENCE_VENVS.items():
        if not args.no_pytest_forked and any(r.venv == venv for r in rows):
            log(f"{what} (created on first use)")
            python, versions = ensure(CACHE)
            report[key] = versions
            if python is not None:
                pythons[venv] = python
    for row in rows:
        if row.venv not in pythons:
            why = report.get(REFERENCE_VENVS[row.venv][2])
            skipped[row.key] = why or "--no-pytest-forked"
        elif (
            row.key not in ("inline", "fork", "inline_user", "fork_user")
            and report["nsbox_problem"]
        ):
            skipped[row.key] = f"nsbox cannot sandbox here: {report['nsbox_problem']}"
    if isinstance(manager, str):
        for row in ROWS:
            if row.cgroups:
                skipped[row.key] = f"no cgroups: {manager}"
    floor = _floor(sections, mode, scratch, project, manager)
    runs = run_rounds(
        [r for r in rows if r.key not in skipped],
        projects,
        mode.n,
        pythons,
        mode,
        (lambda _round: floor.run()) if floor is not None else None,
        args.seed,
    )
    table = summarize_rows(runs, mode.n)
    if 1 in sections:
        report["timeline"] = measure_timelines(runs, projects, mode.n, pythons)
    for key, reason in skipped.items():
        row = _row(key)
        table[key] = {"label": row.label, "how": row.how, "problem": f"unavailable: {reason}"}
    report["overhead"] = {r.key: table[r.key] for r in ROWS if r.key in table}
    report["n"] = mode.n
    if floor is not None:
        rss = pytest_rss(runs)
        if rss > floor.rss > 0:
            log(f"raw floor with ballast: the parent padded to pytest's RSS ({rss >> 20} MB)")
            floor.run(ballast_mb=(rss - floor.rss) >> 20)
        report["floor"] = floor.figures()
        report["floor"]["pytest_rss"] = rss
    if 5 in sections:
        report["xdist"] = _xdist_ratio(runs)


def _floor(
    sections: set[int], mode: Mode, scratch: Path, project: Path, manager: Any
) -> Floor | None:
    if 2 not in sections:
        return None
    bind = tempfile.mkdtemp(prefix="nsbench-basetemp-")  # where pytest's basetemp would be
    _cleanup.append(lambda: shutil.rmtree(bind, ignore_errors=True))
    cgroup_sessions = [] if isinstance(manager, str) else list(manager.session_dirs)
    floor = Floor(project, mode.floor_iterations, cgroup_sessions, bind)
    return floor


def _xdist_ratio(runs: dict[str, RowRuns]) -> dict[str, Any]:
    full, xdist = runs.get("full"), runs.get("xdist")
    if not full or not xdist or not full.results or not xdist.results:
        return {"problem": "the -n 0 or -n 2 sessions did not run"}
    paired = [
        xdist.results[k].wall / full.results[k].wall for k in xdist.results if k in full.results
    ]
    return {
        "n0_wall_s": summarize([r.wall for r in full.results.values()]).as_dict(),
        "n2_wall_s": summarize([r.wall for r in xdist.results.values()]).as_dict(),
        "ratio": summarize(paired).as_dict(),
    }


_cleanup: list[Callable[[], None]] = []


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like an exception: the running session is killed, temp dirs removed."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args, mode = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not sys.platform.startswith("linux"):
        print("pytest-nsbox benchmarks need Linux", file=sys.stderr)
        return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    try:
        report = run(args, mode, scratch)
    finally:
        for step in reversed(_cleanup):
            step()
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    report["elapsed_s"] = time.monotonic() - _started
    print(render(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        log(f"figures saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
