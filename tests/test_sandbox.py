"""End-to-end: an inner pytest session sandboxes its tests, as users run it.

Each test writes a small project with ``pytester`` and runs pytest on it; the
sandbox is real (namespaces, overlay, private /tmp, loopback). What the
sandboxed test observes it asserts itself, inside; what must hold afterwards
(the repo byte-identical, the host's /tmp untouched) is asserted here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from pytest_nsbox import filesystem, kernel, network


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with its content hash and mode."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "__pycache__" in rel or ".pytest_cache" in rel:
            continue
        st = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        digest[rel] = f"{oct(st.st_mode)}:{content}"
    return digest


def test_pid_namespace_and_hostname(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, socket
        import pytest

        @pytest.mark.nsbox(hostname="box-one")
        def test_inside():
            assert os.getpid() == 2
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            assert pids == [1, 2], pids
            assert socket.gethostname() == "box-one"

        @pytest.mark.nsbox
        def test_default_hostname():
            assert socket.gethostname().startswith("nsbox-")
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)


def test_network_is_loopback_only(pytester: pytest.Pytester) -> None:
    host_listener = socket.socket()
    host_listener.bind(("127.0.0.1", 0))
    host_listener.listen()
    port = host_listener.getsockname()[1]
    accepted: list[object] = []
    host_listener.settimeout(5)

    def accept() -> None:
        with contextlib.suppress(OSError):
            accepted.append(host_listener.accept())

    waiter = threading.Thread(target=accept)
    waiter.start()
    pytester.makepyfile(
        f"""
        import socket
        import pytest

        @pytest.mark.nsbox
        def test_inside():
            assert socket.if_nameindex() == [(1, "lo")]
            routes = open("/proc/net/route").read().splitlines()[1:]
            assert routes == [], routes
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen()
            client = socket.create_connection(server.getsockname(), timeout=2)
            conn, _ = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            v6 = socket.socket(socket.AF_INET6)
            v6.bind(("::1", 0))
        """
    )
    try:
        result = pytester.runpytest()
    finally:
        host_listener.close()
        waiter.join()
    result.assert_outcomes(passed=1)
    assert accepted == []


def test_host_network_when_asked(pytester: pytest.Pytester) -> None:
    host_ifaces = socket.if_nameindex()
    pytester.makepyfile(
        f"""
        import socket
        import pytest

        @pytest.mark.nsbox(network="host")
        def test_sees_host_interfaces():
            assert socket.if_nameindex() == {host_ifaces!r}
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_repo_writes_are_thrown_away(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_writes="""
        import os, shutil
        from pathlib import Path
        import pytest

        ROOT = Path(__file__).parent

        @pytest.mark.nsbox
        def test_writes_everything():
            (ROOT / "data.txt").write_text("changed")
            (ROOT / "new.txt").write_text("created")
            os.rename(ROOT / "sub", ROOT / "sub-renamed")
            os.remove(ROOT / "other.txt")
            os.chmod(ROOT / "keep.txt", 0o600)
            assert (ROOT / "data.txt").read_text() == "changed"
            assert not (ROOT / "sub").exists()
            assert (ROOT / "sub-renamed" / "inner.txt").read_text() == "inner"

        @pytest.mark.nsbox
        def test_deletes_the_repo():
            for entry in ROOT.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            assert list(ROOT.iterdir()) == []

        @pytest.mark.nsbox
        def test_then_sees_it_intact():
            assert (ROOT / "data.txt").read_text() == "original"
            assert (ROOT / "other.txt").exists()
        """
    )
    (pytester.path / "data.txt").write_text("original")
    (pytester.path / "other.txt").write_text("other")
    (pytester.path / "keep.txt").write_text("keep")
    (pytester.path / "sub").mkdir()
    (pytester.path / "sub" / "inner.txt").write_text("inner")
    before = tree_digest(pytester.path)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert tree_digest(pytester.path) == before


def test_private_tmp_and_tmp_path(pytester: pytest.Pytester) -> None:
    marker = f"/tmp/nsbox-e2e-{os.getpid()}-{id(pytester)}"
    pytester.makepyfile(
        f"""
        import os
        import pytest

        @pytest.mark.nsbox
        def test_inside(tmp_path):
            with open("{marker}", "w") as f:
                f.write("inside")
            (tmp_path / "kept.txt").write_text("tmp_path is the host's basetemp")
            assert sorted(os.listdir("/tmp")) != []
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert not os.path.exists(marker)
    kept = list(Path(pytester.path.parent / "basetemp").rglob("kept.txt"))
    assert len(kept) == 1


def test_tmp_is_size_limited(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import errno
        import pytest

        @pytest.mark.nsbox(tmp_size="8m")
        def test_fills_tmp():
            with pytest.raises(OSError) as info:
                with open("/tmp/big", "wb") as f:
                    for _ in range(100):
                        f.write(b"x" * (1 << 20))
            assert info.value.errno == errno.ENOSPC
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_crash_by_signal_is_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, signal, sys
        import pytest

        @pytest.mark.nsbox
        def test_segfault():
            print("before the crash")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGSEGV)

        @pytest.mark.nsbox
        def test_exit():
            os._exit(3)

        @pytest.mark.nsbox
        def test_after():
            pass
        """
    )
    result = pytester.runpytest("-rA")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*CRASHED*test_segfault - Crashed: the test process was killed by SIGSEGV (signal 11) during call",
            "*CRASHED*test_exit - Crashed: the test process exited with status 3 during call",
        ]
    )
    assert "when=???" not in result.stdout.str()


def test_background_process_is_killed_and_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess
        import pytest

        @pytest.mark.nsbox
        def test_daemon():
            subprocess.Popen(["sleep", "1000"], start_new_session=True)
        """
    )
    result = pytester.runpytest("-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*nsbox: processes left running, killed at the end of the test*",
            "pid 3: sleep (sleep 1000)",
            "*test_daemon: left running, killed: sleep (pid 3)",
        ]
    )


def test_reports_round_trip(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import logging, sys, warnings
        import pytest

        pytestmark = pytest.mark.nsbox

        def test_skip():
            pytest.skip("skipped inside")

        @pytest.mark.xfail(reason="expected")
        def test_xfail():
            assert 0

        @pytest.mark.xfail(reason="unexpected pass")
        def test_xpass():
            pass

        def test_fails():
            print("captured out")
            print("captured err", file=sys.stderr)
            logging.getLogger("x").warning("captured log")
            assert 1 + 1 == 3, "real failure message"

        def test_properties(record_property):
            record_property("answer", 42)

        def test_warns():
            warnings.warn("careful inside", UserWarning)
        """
    )
    xml = pytester.path / "junit.xml"
    result = pytester.runpytest("-rA", f"--junitxml={xml}")
    result.assert_outcomes(passed=2, failed=1, skipped=1, xfailed=1, xpassed=1)
    result.stdout.fnmatch_lines(
        [
            "*- Captured stdout call -*",
            "captured out",
            "*- Captured stderr call -*",
            "captured err",
            "*- Captured log call -*",
            "WARNING  x:*captured log",
            "*= warnings summary =*",
            "*UserWarning: careful inside",
            "*= short test summary info =*",
            "SKIPPED * skipped inside",
            "FAILED *test_fails - AssertionError: real failure message*",
        ]
    )
    assert 'name="answer" value="42"' in xml.read_text()


_REPORT_DUMP = """
import json
import pytest

def pytest_configure(config):
    config.addinivalue_line("markers", "slow_after_all: added by the test itself")

def pytest_runtest_logreport(report):
    if report.nodeid.endswith("_seen_by_serializer"):
        return
    report.user_properties = [p for p in report.user_properties if not p[0].startswith("nsbox_")]
    kept = {
        name: repr(value)
        for name, value in sorted(vars(report).items())
        if name not in ("duration", "start", "stop", "nsbox")
    }
    with open("reports.jsonl", "a") as out:
        out.write(json.dumps(kept) + "\\n")

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if item.name == "test_plugin_adds_an_attribute":
        report.added_by_plugin = call.when
    return report
"""

_REPORT_TESTS = """
import pytest

def test_plain():
    pass

def test_prints():
    print("out")

def test_marks_itself(request):
    request.applymarker(pytest.mark.slow_after_all)

def test_properties(record_property):
    record_property("answer", 42)

def test_plugin_adds_an_attribute():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    pass

class TestClass:
    def test_method(self):
        pass
"""


def test_reports_of_passed_tests_are_those_made_inline(pytester: pytest.Pytester) -> None:
    """Plain reports travel as four numbers; every report arrives as pytest made it inline."""
    pytester.makeconftest(_REPORT_DUMP)
    pytester.makepyfile(_REPORT_TESTS)
    dump = pytester.path / "reports.jsonl"
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=8)
    inline = dump.read_text().splitlines()
    dump.unlink()
    pytester.runpytest("-p", "no:cacheprovider", "--nsbox").assert_outcomes(passed=8)
    sandboxed = dump.read_text().splitlines()
    assert len(inline) == 24
    assert sandboxed == inline


def test_plugin_serializers_see_every_report(pytester: pytest.Pytester) -> None:
    """A plugin that serializes reports itself gets every report, plain ones too."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.hookimpl(tryfirst=True)
        def pytest_report_to_serializable(config, report):
            data = report._to_json()
            data["seen_by"] = "conftest"
            return data

        @pytest.hookimpl(tryfirst=True)
        def pytest_report_from_serializable(config, data):
            if data.get("seen_by") == "conftest":
                from _pytest.reports import TestReport
                report = TestReport._from_json(data)
                report.seen_by = data["seen_by"]
                return report

        def pytest_runtest_logreport(report):
            assert getattr(report, "seen_by", None) == "conftest", report
        """
    )
    pytester.makepyfile("def test_plain_seen_by_serializer(): pass")
    pytester.runpytest("-p", "no:cacheprovider", "--nsbox").assert_outcomes(passed=1)


def test_bad_marker_values_are_collection_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(network="internet")
        def test_a():
            pass

        @pytest.mark.nsbox(memroy="64m")
        def test_b():
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*network='internet'*test_a*'loopback', 'host'*", "*memroy*test_b*did you mean memory*"]
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os

        def test_not_sandboxed():
            assert os.getpid() != 2
        """
    )
    pytester.runpytest("-p", "no:nsbox", "--strict-markers").assert_outcomes(passed=1)


def test_strict_markers_accepts_nsbox(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox
        def test_marked():
            pass
        """
    )
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)


def test_sandbox_everything_and_opt_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        import pytest

        def test_in_sandbox():
            assert os.getpid() == 2

        @pytest.mark.nsbox(enabled=False)
        def test_opted_out():
            assert os.getpid() != 2
        """
    )
    pytester.runpytest("--nsbox").assert_outcomes(passed=2)
    pytester.makeini("[pytest]\nnsbox = true\n")
    pytester.runpytest().assert_outcomes(passed=2)


def test_fixtures_of_inline_tests_stay_consistent(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_a="""
        import pytest
        EVENTS = []

        @pytest.fixture(scope="module")
        def resource():
            EVENTS.append("setup")
            yield
            EVENTS.append("teardown")

        def test_inline(resource):
            pass

        @pytest.mark.nsbox
        def test_sandboxed(resource):
            pass
        """,
        test_b="""
        from test_a import EVENTS

        def test_after():
            assert EVENTS == ["setup", "teardown"], EVENTS
        """,
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=3)


def test_pdb_is_refused_clearly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest("--pdb")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--pdb and --trace need the test*"])


def test_capture_no_still_sandboxes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.nsbox
        def test_marked():
            print("printed straight to the terminal")
            assert os.getpid() == 2
        """
    )
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*printed straight to the terminal*"])


def test_header_says_what_the_sandbox_does(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        [f"nsbox: user+mnt+pid+net+uts+ipc+cgroup namespaces, overlay on {pytester.path}*"]
    )


def test_import_path_under_tmp_stays_visible_read_only(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A virtualenv or PYTHONPATH entry under /tmp survives the private /tmp."""
    import shutil
    import tempfile

    libdir = Path(tempfile.mkdtemp(prefix="nsbox-lib-", dir="/tmp"))
    try:
        (libdir / "lazy_helper.py").write_text("VALUE = 42\n")
        monkeypatch.setenv("PYTHONPATH", str(libdir))
        pytester.makepyfile(
            """
            import ctypes, errno, os
            import pytest

            @pytest.mark.nsbox
            def test_lazy_import():
                import lazy_helper
                assert lazy_helper.VALUE == 42
                with pytest.raises(OSError) as info:
                    open(lazy_helper.__file__, "a")
                assert info.value.errno == errno.EROFS
                # Nor can the test remount it read-write: the flag is locked.
                libc = ctypes.CDLL(None, use_errno=True)
                where = os.path.dirname(lazy_helper.__file__).encode()
                assert libc.mount(None, where, None, 32 | 4096, None) == -1  # MS_REMOUNT|MS_BIND
                assert ctypes.get_errno() == errno.EPERM
            """
        )
        pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
        assert (libdir / "lazy_helper.py").read_text() == "VALUE = 42\n"
    finally:
        shutil.rmtree(libdir)


def test_filesystem_plan_works_out_the_host_paths_once() -> None:
    """What init binds back and where it lays the scratch tmpfs, decided from the host's paths."""

    def plan(
        rootdir: str, interpreter: tuple[str, ...], private_tmp: bool = True
    ) -> filesystem.FilesystemPlan:
        return filesystem.plan(
            rootdir=rootdir,
            privileged=True,
            private_tmp=private_tmp,
            tmp_size=1 << 20,
            upper_size=1 << 20,
            passthrough=(),
            interpreter=interpreter,
        )

    paths = ("/usr/lib/python3", "/tmp/venv", "/tmp/venv/lib", "/tmp", "/dev/shm/repo/src")
    made = plan("/dev/shm/repo", paths)
    # Only what a private tmpfs hides, outermost, not /tmp itself, not inside the repo.
    assert made.readonly == ("/tmp/venv",)
    assert plan("/dev/shm/repo", paths, private_tmp=False).readonly == ()
    # The scratch tmpfs never covers the repo or the interpreter for its moment.
    assert made.scratch not in ("", "/dev/shm", "/tmp")
    assert os.path.isdir(made.scratch)
    assert plan("/srv/repo", ()).scratch == "/dev/shm"
    assert plan("/dev/shm/repo", paths) is made  # once per session, not per test


def test_tmp_itself_on_sys_path_stays_private(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script run from /tmp puts /tmp on sys.path; /tmp must stay private anyway."""
    marker = Path(f"/tmp/nsbox-host-only-{os.getpid()}")
    marker.write_text("host")
    try:
        monkeypatch.setenv("PYTHONPATH", "/tmp")
        pytester.makepyfile(
            f"""
            import os
            import pytest

            @pytest.mark.nsbox
            def test_private():
                assert not os.path.exists("{marker}")
                open("/tmp/written-inside", "w").close()
            """
        )
        pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
        assert not os.path.exists("/tmp/written-inside")
    finally:
        marker.unlink()


@pytest.mark.parametrize("how", ["--nsbox", "marker"])
def test_lo_request_is_built_outside_pytest(pytester: pytest.Pytester, how: str) -> None:
    """pyroute2 builds the lo-up request in a helper: pytest itself never imports it."""
    pytester.makeconftest(
        """
        import json, sys

        def pytest_sessionfinish(session):
            with open("imported.json", "w") as out:
                json.dump(sorted(m for m in sys.modules if m.split(".")[0] == "pyroute2"), out)
        """
    )
    pytester.makepyfile(
        """
        import socket
        import pytest

        @pytest.mark.nsbox
        def test_lo_is_up():
            server = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(server.getsockname(), timeout=2)
            conn, _ = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        """
    )
    args = ["--nsbox"] if how == "--nsbox" else []
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *args).assert_outcomes(passed=1)
    assert json.loads((pytester.path / "imported.json").read_text()) == []


def test_helper_builds_the_same_request_pyroute2_builds_here() -> None:
    assert network.LoopbackRequest().get() == network.encode_loopback_up()


def test_the_lo_request_helper_imports_only_the_message_classes() -> None:
    """Not the pyroute2 package's ``__init__``, which imports all of pyroute2 (3x the time)."""
    import subprocess

    command = network._helper_command()
    command[-1] += "; sys.stderr.write(' '.join(sorted(sys.modules)))"
    done = subprocess.run(command, capture_output=True, check=True)
    assert done.stdout == network.encode_loopback_up()
    modules = set(done.stderr.decode().split())
    assert "pyroute2.netlink.rtnl.ifinfmsg" in modules
    assert not modules & {"pyroute2.iproute", "pyroute2.ndb", "pyroute2.ipdb", "asyncio"}


def test_failed_lo_request_helper_names_the_step_and_the_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = [
        sys.executable,
        "-S",
        "-c",
        "raise ModuleNotFoundError(\"No module named 'pyroute2'\")",
    ]
    monkeypatch.setattr(network, "_helper_command", lambda: broken)
    with pytest.raises(kernel.SandboxSetupError) as info:
        network.LoopbackRequest().get()
    message = str(info.value)
    assert "build the lo-up request with pyroute2" in message
    assert "exited with 1: ModuleNotFoundError: No module named 'pyroute2'" in message


def test_signal_handlers_are_the_tests_own(pytester: pytest.Pytester) -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM ends the test, whatever the parent set."""
    pytester.makeconftest(
        """
        import signal

        def pytest_configure(config):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
        """
    )
    pytester.makepyfile(
        """
        import signal
        import pytest

        @pytest.mark.nsbox
        def test_sandboxed():
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

        def test_inline_after_keeps_the_parents():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert callable(signal.getsignal(signal.SIGTERM))
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to hold to")
def test_cpu_affinity_is_pytests(pytester: pytest.Pytester) -> None:
    """pytest holds itself to one CPU to fork a test: the test and the tests after get all back."""
    allowed = sorted(os.sched_getaffinity(0))
    pytester.makepyfile(
        f"""
        import os
        import pytest

        ALLOWED = set({allowed})

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(3))
        def test_sandboxed(n):
            assert os.sched_getaffinity(0) == ALLOWED

        def test_inline_after():
            assert os.sched_getaffinity(0) == ALLOWED
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=4)


def test_sandbox_processes_are_named(pytester: pytest.Pytester) -> None:
    """ps tells the sandbox's own processes from the tests: init is pid 1 of each sandbox."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox
        def test_init_is_named():
            assert open("/proc/1/comm").read() == "nsbox-init\\n"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)
