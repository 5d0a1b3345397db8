"""The printed report: every figure of the run's JSON, as text tables with their method."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from nsbench.rows import ROWS
from nsbench.sessions import CPU_PARTS, TIMELINE_STEPS

MB = 1 << 20


def _band(figures: dict[str, Any] | None, fmt: str = ".2f") -> str:
    """``median [p10-p90]`` of a Summary dict; ``-`` when absent."""
    if not figures:
        return "-"
    if figures["n"] == 1:
        return f"{figures['median']:{fmt}}"
    return f"{figures['median']:{fmt}} [{figures['p10']:{fmt}}-{figures['p90']:{fmt}}]"


def _ratio(value: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    if not value or not base or base["median"] <= 0:
        return "-"
    return f"{value['median'] / base['median']:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append(
            indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
    return lines


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, 100, initial_indent=indent, subsequent_indent=indent + "  ")


def _header(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    mode = report["mode"]
    lines = [
        "pytest-nsbox benchmark",
        f"machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, {m['python']}, "
        f"pytest {m['pytest']}, pytest-nsbox {m['pytest-nsbox']}, pytest-xdist {m['pytest-xdist']}",
        f"         cgroups {m['cgroups']}, euid {m['euid']}, "
        f"load average at start {m['loadavg_at_start']}",
    ]
    if "pytest_forked" in report:
        lines.append(f"reference venv: {report['pytest_forked']}")
    if "nsbox_pytest8" in report:
        lines.append(f"the plugin's pytest 8 venv: {report['nsbox_pytest8']}")
    if report.get("nsbox_problem"):
        lines.append(f"nsbox cannot sandbox here: {report['nsbox_problem']}")
    lines.append(
        f"mode: N={mode['n']} tests x {mode['reps']} rounds, sustained {mode['sustained']} "
        f"(window {mode['window']}), trees {', '.join(map(str, mode['tree_sizes']))} files"
    )
    lines.append("figures: median [p10-p90] unless noted")
    return lines


def _overhead(report: dict[str, Any]) -> list[str]:
    table = report.get("overhead")
    if not table:
        return []
    floors = report.get("floor", {}).get("levels_ms", {})
    forked = table.get("forked", {}).get("overhead_ms")
    lines = [
        "",
        f"1. Per-test overhead, N={report['n']} trivial tests, whole sessions in subprocesses, "
        f"{report['mode']['reps']} interleaved rounds",
        "   overhead = (session wall - inline wall of the same round) / N; interval = time "
        "between consecutive tests' logfinish, pooled",
    ]
    header = [
        "row",
        "wall s",
        "overhead ms/test",
        "interval ms",
        "CPU ms/test",
        "cores busy",
        "x fork",
        "x forked",
        "x floor",
    ]
    rows = []
    for row in ROWS:
        figures = table.get(row.key)
        if figures is None:
            continue
        if figures.get("problem"):
            problem = " ".join(figures["problem"].split())[:70]
            rows.append([row.label, problem, *[""] * (len(header) - 2)])
            continue
        overhead = figures.get("overhead_ms")
        fork = table.get(row.fork_baseline, {}).get("overhead_ms")
        rows.append(
            [
                row.label,
                _band(figures["wall_s"]),
                _band(overhead),
                _band(figures["interval_ms"]),
                _band(figures.get("cpu_ms")),
                f"{figures['cores_busy']['median']:.2f}",
                _ratio(overhead, fork) if row.key != row.fork_baseline else "",
                _ratio(overhead, forked) if row.key != "forked" else "",
                _ratio(overhead, floors.get(row.floor or "")),
            ]
        )
    lines += _table(header, rows)
    lines.append(
        "  x fork / x forked / x floor: median overhead over the fork-only row's (the plain "
        "user's for its rows), "
        "pytest-forked's, and the raw floor of the same system calls (section 2)"
    )
    lines += _wrap(
        "CPU ms/test: the whole machine's busy CPU time (/proc/stat: every core, every process "
        "and kernel thread) per test, over the inline session's of the same round; cores busy: "
        "the busy share of the machine's CPU time during the session (the same counters), "
        f"times its {report['machine']['cores']} cores. "
        "A row whose cores are all busy is bound by the CPU it spends in total, not by the "
        "path of one test.",
        "  ",
    )
    lines += _cpu_split(table)
    lines += _session_ends(table)
    lines += _timeline(report.get("timeline") or {})
    lines.append("  How each row was measured:")
    for row in ROWS:
        if row.key in table:
            lines += _wrap(f"{row.label}: {row.how}", "    ")
    for figures in table.values():
        if figures.get("problem") and len(figures["problem"]) > 70:
            lines += _wrap(f"{figures['label']}: {figures['problem']}", "    ")
    return lines


def _cpu_split(table: dict[str, Any]) -> list[str]:
    """Whose CPU the CPU ms/test column is: medians, each over the inline session's same part."""
    rows = []
    for row in ROWS:
        split = table.get(row.key, {}).get("cpu_split_ms")
        if row.section == 1 and split:
            rows.append([row.label, *[f"{split[part]['median']:.2f}" for part in CPU_PARTS]])
    header = ["CPU ms/test by whom", "pytest", "its test processes", "factory, inits", "the rest"]
    return _subtable(
        header,
        rows,
        "pytest: the pytest process's own CPU time, to its exit (its process tree's, less "
        "every child it reaped); its test processes: the children it reaped by session finish "
        "(getrusage, with whatever they reaped); factory, inits: the children it reaped after "
        "(the sandbox factory, with the inits it forked and reaped); the rest: the machine's "
        "busy time beyond the whole tree, mostly kernel threads (RCU, the workqueues that tear "
        "namespaces and cgroups down).",
    )


def _session_ends(table: dict[str, Any]) -> list[str]:
    """What a session spends before its first test ends and after its last: once, not per test."""
    rows = []
    for row in ROWS:
        figures = table.get(row.key, {})
        if row.section == 1 and "start_ms" in figures:
            rows.append([row.label, _band(figures["start_ms"]), _band(figures["end_ms"])])
    header = ["session, ms over inline's", "start", "end"]
    return _subtable(
        header,
        rows,
        "start: from the session's spawn to its first test's logfinish (the interpreter, "
        "plugins, collection, the first test and its sandbox); end: from its last test's "
        "logfinish to its exit. Each over the inline session's of the same round (of its own "
        "venv): the overhead per test above holds them, divided by N.",
    )


def _timeline(timeline: dict[str, Any]) -> list[str]:
    """Where a test's time goes, step by step, in the timestamped sessions."""
    rows = []
    for figures in timeline.values():
        if figures.get("problem"):
            problem = " ".join(figures["problem"].split())[:60]
            rows.append([figures["label"], problem, *[""] * (len(TIMELINE_STEPS) - 1)])
            continue
        steps = [figures[f"{step}_ms"] for step in TIMELINE_STEPS]
        rows.append([figures["label"], *[f"{step['median']:.2f}" for step in steps]])
    header = ["ms/test, step by step", *TIMELINE_STEPS]
    return _subtable(
        header,
        rows,
        "One more session per row, timed at four points on one clock (medians over its tests): "
        "before = pytest's logstart to the start of the test's setup in its process (pytest's "
        "own steps, the fork, a sandbox's set-up); protocol = setup to the teardown report "
        "(the reports sent on the way); after = from there to pytest's logfinish (the test "
        "process's exit, pytest reading the reports and its own steps); between = logfinish "
        "to the next test's logstart. Not the sessions of the table above: taking the "
        "timestamps costs the test process a few copied pages.",
    )


def _subtable(header: Sequence[str], rows: Sequence[Sequence[str]], note: str) -> list[str]:
    """A table below a section's main one, with its note; nothing without rows."""
    if not rows:
        return []
    return ["", *_table(header, rows), *_wrap(note, "  ")]


def _floor(report: dict[str, Any]) -> list[str]:
    floor = report.get("floor")
    if not floor:
        return []
    factory = ""
    if floor.get("factory_rss"):
        factory = f", its factory's {floor['factory_rss'] / MB:.0f} MB"
    lines = [
        "",
        f"2. Raw floor: the same system calls from a minimal Python process "
        f"(benchmarks/nsbench/rawfloor.py under python -I -S, RSS {floor['rss'] / MB:.0f} MB"
        f"{factory}), levels interleaved, ms per sandbox built, used and taken down, in sequence",
    ]
    if floor.get("problem"):
        lines += _wrap(floor["problem"], "  ")
    table = report.get("overhead", {})
    matching = {
        "fork": ["fork", "forked"],
        "ns": ["ns"],
        "overlay": ["overlay"],
        "lo": ["lo"],
        "full": ["cgroup", "full"],
    }
    rows = []
    for level, figures in floor["levels_ms"].items():
        for key in matching.get(level, []):
            overhead = table.get(key, {}).get("overhead_ms")
            label = table.get(key, {}).get("label", key)
            rows.append([level, _band(figures), label, _band(overhead), _ratio(overhead, figures)])
    lines += _table(["level", "floor ms", "row", "row overhead ms", "row / floor"], rows)
    phases = _phases(floor.get("phases_ms", {}))
    if phases:
        lines += _wrap(f"phases, ms (median): {phases}", "  ")
    ballast = floor.get("ballast_levels_ms")
    if ballast:
        parts = ", ".join(f"{level} {_band(v)} ms" for level, v in ballast.items())
        lines += _wrap(
            f"with the floor process (the one that forks the test) padded to pytest's RSS "
            f"({floor['ballast_rss'] / MB:.0f} MB; inline pytest's after its first test: "
            f"{floor['pytest_rss'] / MB:.0f} MB; the factory stays small): {parts}",
            "  ",
        )
        ballast_phases = _phases(floor.get("ballast_phases_ms", {}))
        if ballast_phases:
            lines += _wrap(f"padded, phases, ms (median): {ballast_phases}", "  ")
    lines += _wrap(
        "levels: fork = this process forks, the child writes to a pipe and exits, reaped "
        "(pytest-forked's mechanism); ns = the engine's processes: a request to a small factory "
        "process (forked at start, before any padding), which as root unshares "
        "mnt/pid/net/uts/ipc itself, forks init, pid 1, and goes back to its own namespaces "
        "with setns (a plain user's factory forks outer, which unshares user and the others, "
        "writes its own id maps, opens the host /proc and forks init); init makes the mounts "
        "private + /proc, unshares user+mnt itself (the lock namespace) and "
        "asks the process that forked it, which writes init's id maps through its host /proc "
        "fd; init opens its lock namespaces, makes itself non-dumpable and sends its namespace "
        "fds, O_PATH fds of the scratch and /tmp and its pidfd by SCM_RIGHTS; this process "
        "forks the test into init's pid namespace (root: setns of pid-for-children around the "
        "fork; a plain user: through a first child in outer's user namespace), the test joins "
        "net/uts/ipc with setns, unshares cgroup, joins user/mnt, answers on a pipe and is "
        "reaped (pidfd poll); "
        "init is told and exits; overlay = + init's scratch tmpfs, overlay, /tmp, /dev/shm "
        "(over the scratch), bind; lo = + RTM_NEWLINK; full = + sethostname, init's cgroup "
        "mkdir/limits in every hierarchy (init stays outside it) and its counter files opened "
        "and sent, the test's attach, every counter read through those descriptors, a count "
        "of the cgroup's tasks (pids.current) instead of telling init, the rmdir after init's "
        "exit",
        "  ",
    )
    lines += _wrap(
        "phases: build = the request until init's descriptors arrive; test = the test "
        "process's fork until its reap; teardown = the rest, until init (a plain user's: "
        "outer, which ends after init) has exited (and the rmdir). The floor runs them one "
        "after the other; the plugin asks for the next test's sandbox before it forks the "
        "current test, so the build overlaps the previous test (on another core), and its "
        "factory removes a cgroup once init has exited: its time per test is not bounded "
        "below by this sum ('x floor' under 1 is possible). The padded figures show what "
        "pytest's size adds to the test phase.",
        "  ",
    )
    return lines


def _phases(split: dict[str, dict[str, Any]]) -> str:
    """``ns build 3.10 / test 1.90 / teardown 0.70; ...`` for the sandbox levels."""
    parts = []
    for level, figures in split.items():
        if level == "fork" or not figures:
            continue
        named = " / ".join(
            f"{phase} {figures[phase]['median']:.2f}"
            for phase in ("build", "test", "teardown")
            if phase in figures
        )
        parts.append(f"{level} {named}")
    return "; ".join(parts)


def _overlay(report: dict[str, Any]) -> list[str]:
    scale = report.get("overlay")
    if not scale:
        return []
    lines = [
        "",
        "3. Scale with the repository: filesystem.set_up (the sandbox's whole mount sequence, "
        "overlay included) in a fresh mount namespace, against shutil.copytree of the same tree",
    ]
    if "problem" in scale:
        return lines + _wrap(scale["problem"], "  ")
    rows = []
    smallest = scale[str(min(int(s) for s in scale))]["set_up_ms"]
    for size in sorted(scale, key=int):
        figures = scale[size]
        rows.append(
            [
                f"{int(size):,}",
                _band(figures["set_up_ms"], ".3f"),
                _ratio(figures["set_up_ms"], smallest),
                _band(figures["copytree_ms"], ".1f"),
                _ratio(figures["copytree_ms"], figures["set_up_ms"]),
            ]
        )
    lines += _table(["files", "set-up ms", "vs smallest", "copytree ms", "copytree / set-up"], rows)
    return lines


def _sustained(report: dict[str, Any]) -> list[str]:
    s = report.get("sustained")
    if not s:
        return []
    if "problem" in s:
        return ["", "4. Sustained throughput:", *_wrap(s["problem"], "  ")]
    lines = [
        "",
        f"4. Sustained: {s['tests']} trivial tests in one session, logfinish timestamps and "
        "/proc/self of the parent",
    ]
    for label, figures in (("full sandbox", s), ("fork-only baseline", s["fork_only"])):
        samples = figures["samples"]
        first, end = samples.get("after_first_test", {}), samples.get("session_end", {})
        lines += [
            f"  {label} (wall {figures['wall_s']:.1f} s): first {s['window']}: "
            f"{figures['first_per_s']:.1f} tests/s; last {s['window']}: "
            f"{figures['last_per_s']:.1f} tests/s; last/first {figures['ratio']:.3f}",
            f"    parent RSS {first.get('rss', 0) / MB:.1f} MB after the first test -> "
            f"{end.get('rss', 0) / MB:.1f} MB at the end; open fds {first.get('fds')} -> "
            f"{end.get('fds')}",
            *_wrap(
                f"tests/s per window of {s['window']}: "
                + " ".join(f"{rate:.1f}" for rate in figures["per_window_per_s"]),
                "    ",
            ),
            *_wrap(
                "parent RSS MB every window: "
                + " ".join(
                    f"{samples[key]['rss'] / MB:.0f}" for key in samples if key.startswith("after_")
                ),
                "    ",
            ),
        ]
    lines += _wrap(
        "The fork-only session is the reference: what a fork per test loses over a "
        "session by itself, as pytest keeps every report and each fork copies the page "
        "tables of all it keeps. The target is the full sandbox's ratio alone.",
        "  ",
    )
    return lines


def _xdist(report: dict[str, Any]) -> list[str]:
    x = report.get("xdist")
    if not x:
        return []
    if "problem" in x:
        return ["", f"5. -n 2 vs -n 0: {x['problem']}"]
    return [
        "",
        f"5. -n 2 vs -n 0, full sandbox, N={report['n']}: wall -n 0 {_band(x['n0_wall_s'])} s, "
        f"-n 2 {_band(x['n2_wall_s'])} s; -n 2 / -n 0 = {_band(x['ratio'], '.3f')} "
        f"(paired per round; {report['machine']['cores']} cores)",
    ]


def _memory(report: dict[str, Any]) -> list[str]:
    m = report.get("memory")
    if not m:
        return []
    if "problem" in m:
        return ["", "6. Memory of one test in flight:", *_wrap(m["problem"], "  ")]
    lines = [
        "",
        f"6. Memory of one test in flight (it sleeps {report['mode']['sleep']} s), "
        "/proc/<pid>/smaps_rollup; Private = Private_Clean + Private_Dirty",
    ]
    rows = []
    for key, label in (("full", "full sandbox"), ("fork", "fork-only baseline")):
        figures = m.get(key, {})
        if "problem" in figures:
            rows.append([label, figures["problem"][:60], "", "", ""])
            continue
        entries = [("pytest parent", 1, figures["parent"], 0)]
        parts = figures.get("parts", {})
        if len(parts) > 1:
            entries += [
                (_PART_NAMES.get(part, part), f["processes"], f, f.get("unreadable", 0))
                for part, f in parts.items()
            ]
        entries.append(
            (
                "all its children",
                figures["processes"],
                figures["sandbox"],
                figures.get("unreadable", 0),
            )
        )
        for name, count, f, unreadable in entries:
            if unreadable:  # counted in n, not in the sums
                name = f"{name} ({unreadable} not readable)"
            rows.append(
                [
                    f"{label}: {name}",
                    str(count),
                    f"{f['rss'] / MB:.1f}",
                    f"{f['pss'] / MB:.1f}",
                    f"{f['private'] / MB:.1f}",
                ]
            )
    lines += _table(["process", "n", "Rss MB", "Pss MB", "Private MB"], rows)
    full = m.get("full", {})
    if len(full.get("parts", {})) > 1:
        note = (
            "the factory is one per session (a python -I -S of its own); init is forked from it "
            "(a plain user's through outer, counted with init), the test process from pytest "
            "(a plain user's through one more process, counted with it)"
        )
        if full.get("unreadable"):
            note += (
                "; init is not dumpable, so a plain user cannot read its smaps_rollup: "
                "'not readable' processes are counted in n, not in the sums"
            )
        lines += _wrap(note, "  ")
    return lines


_PART_NAMES = {
    "factory": "the sandbox factory",
    "init": "init (and a plain user's outer)",
    "test": "the test process",
}


def _moves(report: dict[str, Any]) -> list[str]:
    moves = report.get("moves")
    if not moves:
        return []
    lines = [
        "",
        "7. Into a test's cgroup: from the fork (clone) until the child says it is in, and the "
        "child's own write, the move (ms); the ways take turns, each once per pace",
    ]
    if "problem" in moves:
        return lines + _wrap(moves["problem"], "  ")
    rows = []
    for pace, ways in moves["paces"].items():
        for way, figures in ways.items():
            moved = figures["move_ms"]
            rows.append(
                [
                    way,
                    f"{pace} ms",
                    _band(figures["in_cgroup_ms"], ".3f"),
                    _band(moved, ".3f"),
                    f"{figures['slowest_ms']:.2f}",
                    "-" if moved is None else f"{figures['slow']} of {figures['moves']}",
                ]
            )
    slow = f"moves over {moves['slow_ms']:g} ms"
    header = ["way", "pace", "in its cgroup after", "the move", "slowest", slow]
    lines += _table(header, rows)
    for way, why in moves["missing"].items():
        lines.append(f"  {way}: not here ({why})")
    return lines


def _targets(report: dict[str, Any]) -> list[str]:
    lines = ["", "Targets"]
    for t in report["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  {t['status']:4}  {t['target']}: {value}")
    return lines


def render(report: dict[str, Any]) -> str:
    lines = _header(report)
    for part in (_overhead, _floor, _overlay, _sustained, _xdist, _memory, _moves, _targets):
        lines += part(report)
    if "elapsed_s" in report:
        lines += ["", f"elapsed: {report['elapsed_s']:.0f} s"]
    return "\n".join(lines)
