"""The session configurations of sections 1 and 5, and how each was measured (printed as is)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nsbench.sessions import FULL_SANDBOX

STEPS_PLUGIN = ("-p", "nsbench.steps_plugin")


@dataclass(frozen=True)
class Row:
    """One way to run the same N trivial tests as a whole pytest session."""

    key: str
    label: str
    how: str
    venv: str  # "main" (this interpreter), "forked" (pytest-forked's venv), "nsbox8" (see rows)
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    baseline: str = "inline"  # the inline row of the same venv, subtracted for the overhead
    floor: str | None = None  # the raw-floor level with the same system calls
    section: int = 1
    user: bool = False  # run as the plain user (plainuser.PLAIN_USER), in a project it owns
    fork_baseline: str = "fork"  # the fork-only row its "x fork" ratio is taken against
    cgroups: bool = False  # its sessions set cgroup limits: not run (with why) without cgroups


def _step(key: str, label: str, how: str, floor: str, *, cgroups: bool = False) -> Row:
    return Row(
        key, label, how, "main", STEPS_PLUGIN, {"NSBENCH_STEP": key}, floor=floor, cgroups=cgroups
    )


ROWS = (
    Row(
        "inline",
        "plain pytest, inline",
        "pytest -q -p no:cacheprovider; the nsbox plugin is loaded (entry point) but inactive",
        "main",
    ),
    Row(
        "fork",
        "fork-only baseline",
        "-p nsbench.steps_plugin, NSBENCH_STEP=fork: a fork per test, the child runs "
        "_pytest.runner.runtestprotocol(log=False) and writes the reports "
        "(pytest_report_to_serializable) as JSON to a pipe: pytest-forked's mechanism",
        "main",
        STEPS_PLUGIN,
        {"NSBENCH_STEP": "fork"},
        floor="fork",
    ),
    _step(
        "ns",
        "nsbox (a) namespaces",
        "-p nsbench.steps_plugin, NSBENCH_STEP=ns: the engine as the plugin drives it, without "
        "the plugin: one pytest_nsbox.factory.SandboxFactory per session, the next test's "
        "sandbox asked for with prepare() before the current test is forked (built meanwhile), "
        "pending.wait(), runner.run(prepared, childrun.SandboxedItem) forking the test once "
        "into it, prepared.close() after. --nsbox's SandboxSpec (init forked into "
        "mnt/pid/net/uts/ipc and its own lock user+mnt namespaces; the test joins them with "
        "setns and unshares a cgroup namespace of its own), lo left down, no "
        "hostname; the factory's interpreter imports nsbench.ns_stub before serve(), which "
        "replaces filesystem.set_up with a stub (make mounts private, mount the new /proc). "
        "Without a cgroup, runner.run waits for init's leftover check before it returns",
        "ns",
    ),
    _step(
        "overlay",
        "nsbox (b) + overlay",
        "as (a) with the plain SandboxFactory, so the real filesystem.set_up: scratch tmpfs, "
        "overlay on the rootdir, private /tmp and /dev/shm, basetemp bound through, /proc",
        "overlay",
    ),
    _step(
        "lo",
        "nsbox (c) + loopback",
        "as (b) plus lo brought up (the spec's prebuilt RTM_NEWLINK request)",
        "lo",
    ),
    _step(
        "cgroup",
        "nsbox (c) + cgroup, engine",
        "as (c) plus a cgroup per test: pytest_nsbox.cgroups.open_manager() once, "
        "manager.plan(Limits(256m, 1 cpu, 64 pids)) per test passed to prepare() (the "
        "sandbox's init makes it and stays outside, the test process joins it), removed by the "
        "factory "
        "once init has exited, as in the plugin (rmdir; kill()+remove() only if not empty); "
        "also the "
        "plugin's per-test hostname "
        "(nsbox-<test name>). With a cgroup, runner.run counts the cgroup's tasks instead of "
        "waiting for init. None of the plugin's other per-test work (settings, usage, "
        "outcomes, records)",
        "full",
        cgroups=True,
    ),
    Row(
        "full",
        "nsbox (d) full sandbox",
        "the plugin itself: " + " ".join(FULL_SANDBOX),
        "main",
        FULL_SANDBOX,
        floor="full",
        cgroups=True,
    ),
    Row(
        "full_hostnet",
        "nsbox (d) full, host network",
        "the plugin as in (d) with --nsbox-network=host: no network namespace of the test's "
        "own to create and tear down, and no lo to bring up; what one costs a test, and so "
        "the most that sharing one between tests could save",
        "main",
        (*FULL_SANDBOX, "--nsbox-network=host"),
        cgroups=True,
    ),
    Row(
        "xdist",
        "nsbox (d) full, -n 2",
        "the plugin with -n 2 (pytest-xdist): " + " ".join(FULL_SANDBOX) + " -n 2",
        "main",
        (*FULL_SANDBOX, "-n", "2"),
        floor="full",
        section=5,
        cgroups=True,
    ),
    Row(
        "forked_inline",
        "pytest 8.4 inline (ref venv)",
        "the pytest-forked venv's pytest 8.4, inline: the baseline of the next row",
        "forked",
        baseline="forked_inline",
    ),
    Row(
        "forked",
        "pytest-forked 1.7.5 --forked",
        "pytest-forked 1.7.5 on pytest 8.4 (venv in benchmarks/.cache): --forked; overhead "
        "against that venv's own inline session",
        "forked",
        ("--forked",),
        baseline="forked_inline",
        floor="fork",
    ),
    Row(
        "nsbox8_inline",
        "pytest 8.4 inline, nsbox venv",
        "pytest 8.4 and this project (editable) in a venv of their own (benchmarks/.cache), "
        "inline: the baseline of the next row",
        "nsbox8",
        baseline="nsbox8_inline",
    ),
    Row(
        "full8",
        "nsbox (d) full, on pytest 8.4",
        "the plugin as in (d), on pytest-forked's pytest 8.4 (the venv of the row above): "
        "how much of the gap to pytest-forked is pytest's own",
        "nsbox8",
        FULL_SANDBOX,
        baseline="nsbox8_inline",
        floor="full",
        cgroups=True,
    ),
    # The rootless path: what a user who runs pytest without root gets (CI
    # runners, laptops). Without cgroups delegated to the user there are no
    # limits, so the sandbox is --nsbox alone; its own inline and fork-only
    # rows, as the same user, are its baselines.
    Row(
        "inline_user",
        "plain user: inline",
        "as the inline row, run as the plain user nsbox-tester (ids dropped after making the "
        "interpreter reachable, in a project that user owns): the baseline of the next two rows",
        "main",
        baseline="inline_user",
        user=True,
    ),
    Row(
        "fork_user",
        "plain user: fork-only",
        "as the fork-only baseline, as nsbox-tester",
        "main",
        STEPS_PLUGIN,
        {"NSBENCH_STEP": "fork"},
        baseline="inline_user",
        user=True,
        fork_baseline="fork_user",
    ),
    Row(
        "full_user",
        "plain user: nsbox --nsbox",
        "the plugin as nsbox-tester: --nsbox (user, mnt, pid, net, uts, ipc namespaces, overlay, "
        "loopback; no cgroup limits: none delegated to the user). x fork: over the plain user's "
        "fork-only row",
        "main",
        ("--nsbox",),
        baseline="inline_user",
        user=True,
        fork_baseline="fork_user",
    ),
)
