"""The benchmark harness runs end to end and reads its own output back.

``benchmarks/run.py`` is a script, not a timed test: this runs it with the
smallest sizes (a handful of tests, no pytest-forked venv) so a broken
harness is caught by the suite, and checks that its JSON holds every
section's figures and that its printed report shows them. The engine rows
of section 1 are checked to be what they say: each one layer more than the
one before, seen from inside the sandbox.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PlainUser

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
RUN = BENCH_DIR / "run.py"
TINY = [
    "--n=6",
    "--reps=1",
    "--rows=fork,full,full_hostnet,fork_user,full_user,full8",
    "--sections=1,2,3,4,6,7",
    "--sustained=9",
    "--window=3",
    "--tree-sizes=10,50",
    "--floor-iterations=2",
    "--set-up-reps=1",
    "--copy-reps=1",
    "--sleep=0.6",
    "--moves=3",
    "--no-pytest-forked",
]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the harness builds sandboxes and cgroups: Linux, as root",
)


def test_tiny_run_reports_every_section(tmp_path: Path, plain_user: PlainUser) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(RUN), *TINY, f"--json={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())

    overhead = figures["overhead"]
    # The rows of a reference venv are listed as not run, with why, when the venvs are skipped.
    assert overhead["full8"]["problem"] == "unavailable: --no-pytest-forked", overhead["full8"]
    for key in ("inline", "fork", "full", "full_hostnet", "inline_user", "fork_user", "full_user"):
        assert overhead[key].get("problem") is None, overhead[key]
        assert overhead[key]["wall_s"]["median"] > 0
        assert overhead[key]["uids"] == [plain_user.uid if key.endswith("_user") else 0]
        # The whole machine's busy time over the session's wall time: some, at most every core.
        assert 0 < overhead[key]["cores_busy"]["median"] <= (os.cpu_count() or 1), overhead[key]
    # With 6 tests the sign of an overhead is noise; that it was computed is the point.
    assert isinstance(overhead["full"]["overhead_ms"]["median"], float)
    assert isinstance(overhead["full"]["cpu_ms"]["median"], float)
    # A session's start and end, once per session, over inline's: the sandbox's start
    # includes at least its factory's first sandbox, built while pytest waits.
    assert overhead["full"]["start_ms"]["median"] > 0, overhead["full"]
    assert isinstance(overhead["full"]["end_ms"]["median"], float)
    # The split of that CPU by whom adds up to it (one round: the medians are the values),
    # and only the sandbox has a factory and inits to spend it.
    for key in ("fork", "full"):
        split = {part: f["median"] for part, f in overhead[key]["cpu_split_ms"].items()}
        assert set(split) == {"pytest", "tests", "helpers", "rest"}
        assert sum(split.values()) == pytest.approx(overhead[key]["cpu_ms"]["median"]), split
    full_helpers = overhead["full"]["cpu_split_ms"]["helpers"]["median"]
    assert full_helpers > overhead["fork"]["cpu_split_ms"]["helpers"]["median"]
    assert set(figures["floor"]["levels_ms"]) >= {"fork", "ns", "overlay", "lo"}
    for level in ("ns", "overlay", "lo"):
        assert set(figures["floor"]["phases_ms"][level]) == {"build", "test", "teardown"}
    assert set(figures["overlay"]) == {"10", "50"}
    sustained = figures["sustained"]
    assert sustained["tests"] == 9
    # The full sandbox's session and the fork-only reference's: 9 timestamps, 2 whole windows.
    for figures_of in (sustained, sustained["fork_only"]):
        assert figures_of["first_per_s"] > 0
        assert len(figures_of["per_window_per_s"]) == (9 - 1) // 3, figures_of
        assert figures_of["ratio"] == pytest.approx(
            figures_of["last_per_s"] / figures_of["first_per_s"]
        )
    # As root: the session's factory, the sandbox's init (no outer), the test process.
    assert figures["memory"]["full"]["processes"] == 3
    assert figures["memory"]["full"]["unreadable"] == 0  # root may read a non-dumpable init
    parts = figures["memory"]["full"]["parts"]
    assert {part: f["processes"] for part, f in parts.items()} == {
        "factory": 1,
        "init": 1,
        "test": 1,
    }
    assert all(f["rss"] > 0 for f in parts.values()), parts
    # Every way of getting into a cgroup was measured here, or is named as missing with why;
    # a child's own write lies inside its fork-to-message time, so its quantiles are below.
    moves = figures["moves"]
    assert set(moves["paces"]) == {"10", "50"}, moves
    for ways in moves["paces"].values():
        assert set(ways) | set(moves["missing"]) == {"tasks", "cgroup.procs", "clone"}, moves
        assert not set(ways) & set(moves["missing"]), moves
        assert {"cgroup.procs", "clone"} <= set(ways), moves  # root, v1 controllers or v2
        for way, measured in ways.items():
            assert measured["moves"] == measured["in_cgroup_ms"]["n"] == 3, measured
            if way == "clone":
                assert measured["move_ms"] is None, measured
                continue
            for q in ("p10", "median", "p90"):
                assert 0 < measured["move_ms"][q] < measured["in_cgroup_ms"][q], measured
            assert 0 <= measured["slow"] <= 3, measured

    report = done.stdout
    assert report.startswith("pytest-nsbox benchmark\nmachine: ")
    for target in figures["targets"]:
        assert f"{target['status']:4}  {target['target']}" in report
    full = overhead["full"]["overhead_ms"]["median"]
    assert f"{full:.2f}" in report
    assert "CPU ms/test" in report and "cores busy" in report
    for label, figures_of in (
        ("full sandbox", sustained),
        ("fork-only baseline", sustained["fork_only"]),
    ):
        assert f"{label} (wall {figures_of['wall_s']:.1f} s)" in report
        assert f"last/first {figures_of['ratio']:.3f}" in report
    assert "CPU ms/test by whom" in report and "factory, inits" in report
    assert "session, ms over inline's" in report
    # Step by step: a forked test's "before" holds the fork (and the sandbox's set-up),
    # which an inline test's does not; each step was timed on every test but the first.
    timeline = figures["timeline"]
    assert set(timeline) == {"inline", "fork", "full"}, timeline
    for steps in timeline.values():
        assert steps["problem"] is None, steps
        for step in ("before", "protocol", "after", "between"):
            assert steps[f"{step}_ms"]["n"] == (6 - 1 if step != "between" else 6 - 2), steps
        assert steps["protocol_ms"]["median"] > 0, steps
    inline_before = timeline["inline"]["before_ms"]["median"]
    assert timeline["fork"]["before_ms"]["median"] > inline_before, timeline
    assert timeline["full"]["before_ms"]["median"] > inline_before, timeline
    assert "ms/test, step by step" in report
    assert f"{timeline['full']['before_ms']['median']:.2f}" in report
    assert re.search(r"full sandbox: init \(and a plain user's outer\) +1 ", report), report
    clone_10 = moves["paces"]["10"]["clone"]["in_cgroup_ms"]["median"]
    assert re.search(rf"clone +10 ms +{clone_10:.3f} .* -\n", report), report


# What a test of the generated project sees of its sandbox, against $NSBENCH_STEP.
LAYERS_TEST = """
import os
import pathlib
import socket

ROOT = str(pathlib.Path(__file__).resolve().parent)


def mounted(path):
    # (type, source) of the topmost mount on exactly this path, or None.
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == path:
                dash = fields.index("-")
                found = (fields[dash + 1], fields[dash + 2])
    return found


def loopback_up():
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=2):
                return True
    except OSError:
        return False


def check():
    step = os.environ["NSBENCH_STEP"]
    seen = {
        "rootdir": mounted(ROOT),
        "tmp": mounted("/tmp"),
        "lo": loopback_up(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    assert seen["pid"] == 2, seen
    assert (seen["rootdir"] or ("",))[0] == ("overlay" if step != "ns" else ""), seen
    assert (seen["tmp"] == ("tmpfs", "nsbox-tmp")) == (step != "ns"), seen
    assert seen["lo"] == (step in ("lo", "cgroup")), seen
    assert seen["hostname"].startswith("nsbox-test-") == (step == "cgroup"), seen


def test_first():
    check()


def test_second():
    check()


def test_third():
    check()
"""


@pytest.mark.parametrize("step", ["ns", "overlay", "lo", "cgroup"])
def test_engine_rows_add_one_layer_each(step: str, tmp_path: Path) -> None:
    """Three tests, so two run in a sandbox prepared while the one before ran."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        from nsbench import sessions
    finally:
        sys.path.remove(str(BENCH_DIR))
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_layers.py").write_text(LAYERS_TEST)
    argv = sessions.pytest_argv(sys.executable, project, ("-p", "nsbench.steps_plugin"))
    env = sessions.session_env(NSBENCH_STEP=step)
    result = sessions.run_session(argv, env, 3, tmp_path / "probe.json", timeout=120)
    assert len(result.stamps) == 3


def test_namespaces_only_factory_runs_the_plugins_interpreter() -> None:
    """The "ns" row's factory differs from the plugin's only by the stub it imports first."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        from nsbench.steps_plugin import NamespacesOnlyFactory
    finally:
        sys.path.remove(str(BENCH_DIR))
    from pytest_nsbox.factory import SandboxFactory

    stubbed, plain = NamespacesOnlyFactory().command(7), SandboxFactory().command(7)
    assert stubbed[:-1] == plain[:-1]
    code = stubbed[-1]
    assert str(BENCH_DIR) in code
    assert code.index("import nsbench.ns_stub") < code.index("serve(7, ")
