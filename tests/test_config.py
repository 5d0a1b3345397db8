"""Tests of pytest_nsbox.config: the parsers, the settings objects, and where settings come from.

The parsers are tested directly, with tables of accepted and rejected values
and with Hypothesis. The session and marker handling is tested against real
pytest configs built by ``pytester`` from a conftest that registers the
options itself (``add_options``) with the installed plugin blocked
(``-p no:nsbox``), so these tests do not depend on the state of the plugin
module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_nsbox.config import (
    DEFAULT_TMP_SIZE,
    DEFAULT_WRITES_IGNORE,
    MARKER_ARGS,
    GiB,
    KiB,
    MiB,
    NsboxConfigError,
    SandboxSettings,
    SessionOptions,
    Throttle,
    TiB,
    format_size,
    marker_help,
    parse_bool,
    parse_cpu,
    parse_duration,
    parse_pids,
    parse_size,
    parse_throttle,
    settings_for_item,
)

SIZE_FORMS = 'expected bytes as an int or a size like "64m", "64MiB", "64 MB", "1g"'

# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64m", 67108864),
        ("64M", 64 * MiB),
        ("64MiB", 64 * MiB),
        ("64mib", 64 * MiB),
        ("64 MB", 64 * MiB),
        ("64mb", 64 * MiB),
        ("  64m  ", 64 * MiB),
        ("1g", 1073741824),
        ("1G", GiB),
        ("1GiB", GiB),
        ("1.5g", 1610612736),
        ("512k", 524288),
        ("512 KiB", 512 * KiB),
        ("0.5k", 512),
        ("1024", 1024),
        ("100b", 100),
        ("100B", 100),
        ("100 b", 100),
        ("1.0", 1),
        (".5m", 512 * KiB),
        ("1t", TiB),
        ("2TB", 2 * TiB),
        (67108864, 64 * MiB),
        (1, 1),
        (2048.0, 2048),
    ],
)
def test_parse_size_accepts(value: object, expected: int) -> None:
    assert parse_size(value, name="memory") == expected


def test_parse_size_truncates_a_fraction_of_a_unit_to_whole_bytes() -> None:
    # 0.3 KiB is 307.2 bytes; Docker truncates too.
    assert parse_size("0.3k", name="memory") == 307


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("64x", SIZE_FORMS),
        ("", SIZE_FORMS),
        ("m", SIZE_FORMS),
        ("   ", SIZE_FORMS),
        ("-64m", SIZE_FORMS),
        ("+64m", SIZE_FORMS),
        ("64 m b", SIZE_FORMS),
        ("64mm", SIZE_FORMS),
        ("1e3", SIZE_FORMS),
        ("64_000", SIZE_FORMS),
        ("inf", SIZE_FORMS),
        ("\u0661\u0662m", SIZE_FORMS),  # Arabic-Indic digits are not digits here
        (True, SIZE_FORMS),
        (False, SIZE_FORMS),
        (None, SIZE_FORMS),
        ([64], SIZE_FORMS),
        (b"64m", SIZE_FORMS),
        (math.nan, SIZE_FORMS),
        (math.inf, SIZE_FORMS),
        (1.5, "a byte count must be whole"),
        ("1.5", "a byte count must be whole"),
        ("1.5b", "a byte count must be whole"),
        (0, "a size must be positive"),
        ("0", "a size must be positive"),
        ("0m", "a size must be positive"),
        (-1, "a size must be positive"),
        (0.0, "a size must be positive"),
        ("0.0001k", "a size must be positive"),
        ("8388608t", "more than the kernel's limit"),
        (2**63, "more than the kernel's limit"),
    ],
)
def test_parse_size_rejects(value: object, problem: str) -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_size(value, name="--nsbox-memory")
    message = str(excinfo.value)
    assert message.startswith(f"invalid --nsbox-memory={value!r}: ")
    assert problem in message
    assert "(binary units: 1m = 1048576 bytes)" in message


def test_parse_size_message_names_setting_value_origin_and_forms() -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_size("64x", name="memory", where="on test_mod.py::test_x")
    assert str(excinfo.value) == (
        "invalid memory='64x' on test_mod.py::test_x: expected bytes as an int or a size "
        'like "64m", "64MiB", "64 MB", "1g" (binary units: 1m = 1048576 bytes)'
    )


def test_config_error_is_a_value_error() -> None:
    assert issubclass(NsboxConfigError, ValueError)


# ----------------------------------------------------------------------------- parse_cpu


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.5, 0.5), (2, 2.0), (1024, 1024.0), ("1.5", 1.5), (" 0.25 ", 0.25), ("1e-2", 0.01)],
)
def test_parse_cpu_accepts(value: object, expected: float) -> None:
    result = parse_cpu(value, name="cpu")
    assert result == expected
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value",
    [0, 0.0, -1, -0.5, 1024.5, 1025, 10**400, True, False, math.nan, math.inf, -math.inf,
     "nan", "inf", "half", "", "0.5 cpus", "50%", None, [1]],
)  # fmt: skip
def test_parse_cpu_rejects(value: object) -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_cpu(value, name="cpu", where="on t.py::test_a")
    message = str(excinfo.value)
    assert message.startswith(f"invalid cpu={value!r} on t.py::test_a: ")
    assert "expected a number of CPUs > 0 and <= 1024" in message


# ------------------------------------------------------------------------ parse_duration


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (10, 10.0),
        (0.25, 0.25),
        ("10", 10.0),
        ("10s", 10.0),
        ("10S", 10.0),
        ("1.5 s", 1.5),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration_accepts(value: object, expected: float) -> None:
    assert parse_duration(value, name="timeout") == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [0, -1, 0.0, "0s", "0", "-5s", "10x", "s", "", "10 seconds", "1d", math.nan, math.inf,
     "nan", "inf", True, None, [10]],
)  # fmt: skip
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_duration(value, name="--nsbox-timeout")
    message = str(excinfo.value)
    assert message.startswith(f"invalid --nsbox-timeout={value!r}: ")
    assert '"10s", "500ms", "2m"' in message


# ---------------------------------------------------------------------------- parse_pids


@pytest.mark.parametrize(("value", "expected"), [(3, 3), (64, 64), ("64", 64), (" 128 ", 128)])
def test_parse_pids_accepts(value: object, expected: int) -> None:
    assert parse_pids(value, name="pids") == expected


@pytest.mark.parametrize("value", [2, 0, -1, "2"])
def test_parse_pids_below_three_says_the_sandbox_needs_two(value: object) -> None:
    with pytest.raises(NsboxConfigError, match="the sandbox itself needs 2 processes") as excinfo:
        parse_pids(value, name="pids")
    assert str(excinfo.value).startswith(f"invalid pids={value!r}: expected at least 3")


@pytest.mark.parametrize("value", [True, 64.0, 4.5, "64.0", "sixty", "", "-5", "1e2", None])
def test_parse_pids_rejects_non_integers(value: object) -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_pids(value, name="pids")
    assert str(excinfo.value) == (
        f"invalid pids={value!r}: expected a whole number of tasks >= 3, like 64"
    )


# ------------------------------------------------------------------------ parse_throttle


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.2, Throttle(fraction=0.2, seconds=None)),
        (1, Throttle(fraction=1.0, seconds=None)),
        ("0.5", Throttle(fraction=0.5, seconds=None)),
        ("2s", Throttle(fraction=None, seconds=2.0)),
        ("500ms", Throttle(fraction=None, seconds=0.5)),
        ("1.5 s", Throttle(fraction=None, seconds=1.5)),
    ],
)
def test_parse_throttle_accepts(value: object, expected: Throttle) -> None:
    assert parse_throttle(value, name="max_throttle") == expected


@pytest.mark.parametrize("value", [2, 1.5, "2", "10"])
def test_parse_throttle_bare_number_above_one_explains_both_forms(value: object) -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_throttle(value, name="max_throttle")
    message = str(excinfo.value)
    assert message.startswith(f"invalid max_throttle={value!r}: a bare number is a fraction")
    assert "(0, 1]" in message
    assert 'give a unit, like "2s"' in message


@pytest.mark.parametrize("value", [0, -0.5, "0", "0s", "-2s", "2x", "", True, None, math.nan])
def test_parse_throttle_rejects(value: object) -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_throttle(value, name="max_throttle")
    message = str(excinfo.value)
    assert message.startswith(f"invalid max_throttle={value!r}: ")
    assert "fraction of wall time in (0, 1]" in message
    assert "throttled-time duration with a unit" in message


def test_throttle_has_exactly_one_form() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Throttle(fraction=None, seconds=None)
    with pytest.raises(ValueError, match="exactly one"):
        Throttle(fraction=0.5, seconds=1.0)


def test_throttle_str_is_an_accepted_form() -> None:
    for throttle in (Throttle(fraction=0.2, seconds=None), Throttle(fraction=None, seconds=2.5)):
        assert parse_throttle(str(throttle), name="max_throttle") == throttle
    assert str(Throttle(fraction=None, seconds=2.0)) == "2s"


# ---------------------------------------------------------------------------- parse_bool


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("Yes", True), (" on ", True), (True, True),
     ("0", False), ("false", False), ("No", False), ("OFF", False), (False, False)],
)  # fmt: skip
def test_parse_bool_accepts(value: object, expected: bool) -> None:
    assert parse_bool(value, name="PYTEST_NSBOX") is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "y", "enable", None, 1])
def test_parse_bool_rejects(value: object) -> None:
    with pytest.raises(NsboxConfigError) as excinfo:
        parse_bool(value, name="PYTEST_NSBOX", where="in the environment")
    assert str(excinfo.value) == (
        f"invalid PYTEST_NSBOX={value!r} in the environment: "
        "expected one of 1/0, true/false, yes/no, on/off"
    )


# ----------------------------------------------------------------- format_size, settings


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (100, "100 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (512 * KiB, "512.0 KiB"),
        (64 * MiB, "64.0 MiB"),
        (GiB + GiB // 2, "1.5 GiB"),
        (3 * TiB, "3.0 TiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_sandbox_settings_defaults() -> None:
    settings = SandboxSettings()
    assert settings.network == "loopback"
    assert settings.tmp == "private"
    assert settings.tmp_size == DEFAULT_TMP_SIZE == 256 * MiB
    assert settings.writes == "ignore"
    assert settings.writes_ignore == ("__pycache__", "*.pyc", ".pytest_cache")
    assert settings.writable == ()
    assert (settings.memory, settings.cpu, settings.pids, settings.timeout) == (None,) * 4
    assert settings.max_throttle is None
    assert settings.hostname is None
    assert settings.describe() == ""
    assert not settings.limits_requested


@pytest.mark.parametrize(
    ("changes", "requested"),
    [({"memory": 64 * MiB}, True), ({"cpu": 0.5}, True), ({"pids": 10}, True),
     ({"timeout": 5.0}, False), ({"network": "host"}, False)],
)  # fmt: skip
def test_limits_requested(changes: dict[str, Any], requested: bool) -> None:
    assert SandboxSettings(**changes).limits_requested is requested


def test_describe_lists_only_non_default_settings() -> None:
    settings = SandboxSettings(memory=64 * MiB, cpu=0.5, pids=64)
    assert settings.describe() == "memory=64.0 MiB cpu=0.5 pids=64"
    settings = SandboxSettings(
        timeout=10.0,
        max_throttle=Throttle(fraction=0.2, seconds=None),
        network="host",
        hostname="box",
        tmp_size=GiB,
        writable=("/a", "/b"),
        writes="fail",
    )
    assert settings.describe() == (
        "timeout=10s max_throttle=0.2 network=host hostname=box tmp_size=1.0 GiB "
        "writable=/a,/b writes=fail"
    )


@pytest.mark.parametrize(
    ("nodeid", "expected"),
    [
        ("test_mod.py::test_foo", "nsbox-test-foo"),
        ("tests/test_a.py::TestX::test_Foo_bar[1-x]", "nsbox-test-foo-bar-1-x"),
        ("test_mod.py::test_ünï", "nsbox-test-n"),
        ("test_mod.py::___", "nsbox"),
        ("doc.txt", "nsbox-doc-txt"),
        ("t.py::test_" + "a" * 80, "nsbox-test-" + "a" * 52),
        ("t.py::test_" + "a" * 51 + "_b", "nsbox-test-" + "a" * 51),  # no trailing '-'
    ],
)
def test_hostname_for_derives_from_the_test_name(nodeid: str, expected: str) -> None:
    assert SandboxSettings().hostname_for(nodeid) == expected


def test_hostname_for_returns_an_explicit_hostname() -> None:
    assert SandboxSettings(hostname="db.local").hostname_for("t.py::test_x") == "db.local"


HOSTNAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@given(st.text())
def test_hostname_for_is_always_a_valid_hostname(nodeid: str) -> None:
    assert HOSTNAME_RE.fullmatch(SandboxSettings().hostname_for(nodeid))


def test_marker_help_documents_every_marker_argument() -> None:
    text = marker_help()
    signature, _, description = text.partition(":")
    assert signature.startswith("nsbox(")
    assert "sandbox" in description
    assert re.findall(r"(\w+)=", signature) == list(MARKER_ARGS)


# ------------------------------------------------------------------- Hypothesis properties

SIZE_UNITS = [
    ("", 1), ("b", 1), ("k", KiB), ("kb", KiB), ("kib", KiB), ("m", MiB), ("mb", MiB),
    ("mib", MiB), ("g", GiB), ("gb", GiB), ("gib", GiB), ("t", TiB), ("tb", TiB), ("tib", TiB),
]  # fmt: skip


@st.composite
def any_case(draw: st.DrawFn, word: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in word)


@given(
    count=st.integers(min_value=1, max_value=2**20),
    unit=st.sampled_from(SIZE_UNITS).flatmap(lambda u: st.tuples(any_case(u[0]), st.just(u[1]))),
    space=st.sampled_from(["", " ", "  "]),
)
def test_parse_size_round_trips_every_unit(count: int, unit: tuple[str, int], space: str) -> None:
    spelling, scale = unit
    assert parse_size(f"{count}{space}{spelling}", name="memory") == count * scale


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_parse_size_accepts_any_positive_int_and_its_decimal_string(n: int) -> None:
    assert parse_size(n, name="memory") == n
    assert parse_size(str(n), name="memory") == n


@given(st.integers(min_value=1, max_value=2**50))
def test_format_size_reads_back_within_its_rounding(n: int) -> None:
    # format_size keeps one decimal: 0.05 of a unit, at most 5% of the size.
    assert parse_size(format_size(n), name="memory") == pytest.approx(n, rel=0.05)


@given(st.text())
def test_parse_size_of_any_text_is_a_size_or_a_config_error(text: str) -> None:
    try:
        size = parse_size(text, name="memory")
    except NsboxConfigError as err:
        assert str(err).startswith(f"invalid memory={text!r}: ")
    else:
        assert isinstance(size, int)
        assert 0 < size <= 2**63 - 1


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(),
    st.lists(st.integers(), max_size=2),
)  # fmt: skip


@given(ANY_VALUE)
def test_parsers_raise_only_config_errors(value: object) -> None:
    for parse in (parse_size, parse_cpu, parse_duration, parse_pids, parse_throttle, parse_bool):
        with contextlib.suppress(NsboxConfigError):
            parse(value, name="x")


@given(st.floats(min_value=0, max_value=1024, exclude_min=True))
def test_parse_cpu_round_trips_floats_and_their_repr(cpus: float) -> None:
    assert parse_cpu(cpus, name="cpu") == cpus
    assert parse_cpu(repr(cpus), name="cpu") == cpus


@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 < x <= 1024))
def test_parse_cpu_rejects_every_float_outside_the_range(cpus: float) -> None:
    with pytest.raises(NsboxConfigError):
        parse_cpu(cpus, name="cpu")


@given(st.text())
def test_parse_cpu_of_any_text_is_a_cpu_count_or_a_config_error(text: str) -> None:
    try:
        cpus = parse_cpu(text, name="cpu")
    except NsboxConfigError as err:
        assert str(err).startswith(f"invalid cpu={text!r}: ")
    else:
        assert 0 < cpus <= 1024


# ------------------------------------------------------- options, sessions and markers

CONFTEST = """
import pytest
from pytest_nsbox import config as nsbox_config


def pytest_addoption(parser):
    nsbox_config.add_options(parser)


def pytest_configure(config):
    config.addinivalue_line("markers", nsbox_config.marker_help())
"""

# Computes the settings as the plugin will: once per session, then per item,
# and writes them where the outer test can read them.
REPORTING_CONFTEST = (
    CONFTEST
    + """

import dataclasses
import json


def pytest_collection_modifyitems(config, items):
    options = nsbox_config.SessionOptions.from_config(config)
    found = {}
    for item in items:
        try:
            settings = nsbox_config.settings_for_item(item, options)
        except nsbox_config.NsboxConfigError as err:
            found[item.nodeid] = {"error": str(err)}
        else:
            found[item.nodeid] = settings and dataclasses.asdict(settings)
    result = {"session": dataclasses.asdict(options), "items": found}
    (config.rootpath / "nsbox-settings.json").write_text(json.dumps(result))
"""
)

ISOLATE = ("-p", "no:nsbox", "--strict-markers")
NO_ENV: Mapping[str, str] = {}


@pytest.fixture
def box(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory with the options registered, and no nsbox env vars leaking in."""
    for var in list(os.environ):
        if var.startswith("PYTEST_NSBOX"):
            monkeypatch.delenv(var)
    pytester.makeconftest(CONFTEST)
    return pytester


def session(
    pytester: pytest.Pytester, *args: str, environ: Mapping[str, str] = NO_ENV
) -> SessionOptions:
    config = pytester.parseconfig(*ISOLATE, *args)
    return SessionOptions.from_config(config, environ=environ)


def usage_error(pytester: pytest.Pytester, *args: str, environ: Mapping[str, str] = NO_ENV) -> str:
    with pytest.raises(pytest.UsageError) as excinfo:
        session(pytester, *args, environ=environ)
    return str(excinfo.value)


def items(pytester: pytest.Pytester, source: str, *args: str) -> dict[str, pytest.Item]:
    """The items of a test module ``test_mod.py`` with ``source``, by name."""
    path = pytester.makepyfile(test_mod=source)
    module = pytester.getmodulecol(path, configargs=(*ISOLATE, *args))
    return {item.name: item for item in pytester.genitems([module])}


def item_settings(
    pytester: pytest.Pytester, source: str, *args: str, environ: Mapping[str, str] = NO_ENV
) -> dict[str, SandboxSettings | None]:
    found = items(pytester, source, *args)
    config = next(iter(found.values())).config
    options = SessionOptions.from_config(config, environ=environ)
    return {name: settings_for_item(item, options) for name, item in found.items()}


def marker_error(pytester: pytest.Pytester, source: str, *args: str) -> str:
    (item,) = items(pytester, source, *args).values()
    options = SessionOptions.from_config(item.config, environ={})
    with pytest.raises(NsboxConfigError) as excinfo:
        settings_for_item(item, options)
    return str(excinfo.value)


def test_options_are_registered_with_none_defaults(box: pytest.Pytester) -> None:
    config = box.parseconfig(*ISOLATE)
    dests = ["nsbox", "nsbox_unavailable", "nsbox_memory", "nsbox_cpu", "nsbox_pids",
             "nsbox_timeout", "nsbox_network", "nsbox_tmp", "nsbox_tmp_size", "nsbox_writes",
             "nsbox_cgroup", "nsbox_report", "nsbox_doctor"]  # fmt: skip
    assert {dest: config.getoption(dest) for dest in dests} == dict.fromkeys(dests)
    ini_keys = [*dests[:-1], "nsbox_writes_ignore"]
    assert {key: config.getini(key) for key in ini_keys} == dict.fromkeys(ini_keys)


def test_help_lists_the_options_and_ini_keys(box: pytest.Pytester) -> None:
    result = box.runpytest(*ISOLATE, "--help")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "*nsbox*",
            "*--nsbox *sandbox every collected test*",
            "*--nsbox-unavailable=fail|skip|run*",
            "*--nsbox-memory=SIZE*",
            "*--nsbox-report=FILE.json*",
            "*--nsbox-doctor*",
        ]
    )
    for key in ("nsbox_memory", "nsbox_cpu", "nsbox_tmp_size", "nsbox_writes_ignore"):
        assert key in result.stdout.str()
    assert "PYTEST_NSBOX_MEMORY" in result.stdout.str()


def test_session_defaults_without_any_setting(box: pytest.Pytester) -> None:
    options = session(box)
    assert options == SessionOptions(
        sandbox_all=False,
        unavailable="fail",
        cgroup_path=None,
        report_path=None,
        doctor=False,
        defaults=SandboxSettings(),
    )


@pytest.mark.parametrize(
    ("ini", "env", "cli", "expected"),
    [
        ("1g", None, None, GiB),
        (None, "512m", None, 512 * MiB),
        (None, None, "256m", 256 * MiB),
        ("1g", "512m", None, 512 * MiB),
        ("1g", None, "256m", 256 * MiB),
        (None, "512m", "256m", 256 * MiB),
        ("1g", "512m", "256m", 256 * MiB),
        ("1g", "none", None, None),
        ("1g", "512m", "none", None),
        ("1g", "", None, GiB),  # an empty variable counts as unset
    ],
)
def test_memory_precedence_ini_env_cli(
    box: pytest.Pytester, ini: str | None, env: str | None, cli: str | None, expected: int | None
) -> None:
    if ini is not None:
        box.makeini(f"[pytest]\nnsbox_memory = {ini}\n")
    environ = {} if env is None else {"PYTEST_NSBOX_MEMORY": env}
    args = () if cli is None else (f"--nsbox-memory={cli}",)
    assert session(box, *args, environ=environ).defaults.memory == expected


def test_every_session_default_from_its_source(box: pytest.Pytester) -> None:
    box.makeini(
        "[pytest]\n"
        "nsbox_network = host\n"
        "nsbox_tmp_size = 64m\n"
        "nsbox_writes = report\n"
        "nsbox_writes_ignore =\n    *.log\n    build\n"
        "nsbox_unavailable = skip\n"
        "nsbox_cgroup = /sys/fs/cgroup/ci.slice/nsbox\n"
    )
    options = session(
        box,
        "--nsbox-cpu=1.5",
        "--nsbox-writes=fail",
        "--nsbox-doctor",
        environ={"PYTEST_NSBOX_PIDS": "128", "PYTEST_NSBOX_TIMEOUT": "2m", "PYTEST_NSBOX": "yes"},
    )
    assert options.sandbox_all is True
    assert options.unavailable == "skip"
    assert options.cgroup_path == "/sys/fs/cgroup/ci.slice/nsbox"
    assert options.doctor is True
    assert options.defaults == SandboxSettings(
        cpu=1.5,
        pids=128,
        timeout=120.0,
        network="host",
        tmp_size=64 * MiB,
        writes="fail",
        writes_ignore=("*.log", "build"),
    )


@pytest.mark.parametrize(
    ("ini", "env", "cli", "expected"),
    [
        (None, None, False, False),
        ("true", None, False, True),
        ("true", "0", False, False),
        ("false", "on", False, True),
        ("false", "off", True, True),
    ],
)
def test_sandbox_all_precedence(
    box: pytest.Pytester, ini: str | None, env: str | None, cli: bool, expected: bool
) -> None:
    if ini is not None:
        box.makeini(f"[pytest]\nnsbox = {ini}\n")
    environ = {} if env is None else {"PYTEST_NSBOX": env}
    args = ("--nsbox",) if cli else ()
    assert session(box, *args, environ=environ).sandbox_all is expected


def test_unavailable_precedence(box: pytest.Pytester) -> None:
    box.makeini("[pytest]\nnsbox_unavailable = skip\n")
    assert session(box).unavailable == "skip"
    assert session(box, environ={"PYTEST_NSBOX_UNAVAILABLE": "run"}).unavailable == "run"
    environ = {"PYTEST_NSBOX_UNAVAILABLE": "run"}
    assert session(box, "--nsbox-unavailable=fail", environ=environ).unavailable == "fail"


def test_session_reads_os_environ_by_default(
    box: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_NSBOX_CPU", "0.5")
    config = box.parseconfig(*ISOLATE)
    assert SessionOptions.from_config(config).defaults.cpu == 0.5


def test_report_path_from_cli_is_relative_to_the_current_directory(
    box: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    box.makeini("[pytest]\n")
    sub = box.mkdir("sub")
    monkeypatch.chdir(sub)
    options = session(box, "--nsbox-report=out.json")
    assert options.report_path == str(sub / "out.json")


def test_report_path_from_ini_is_relative_to_the_rootdir(
    box: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    box.makeini("[pytest]\nnsbox_report = reports/nsbox.json\n")
    box.mkdir("reports")
    monkeypatch.chdir(box.mkdir("sub"))
    assert session(box).report_path == str(box.path / "reports" / "nsbox.json")


def test_report_path_in_a_missing_directory_is_a_usage_error(box: pytest.Pytester) -> None:
    message = usage_error(box, "--nsbox-report=nowhere/out.json")
    assert message == (
        f"invalid --nsbox-report='nowhere/out.json': directory {box.path / 'nowhere'} "
        "does not exist; expected a file path in an existing directory"
    )
    box.mkdir("adir")
    assert "is a directory" in usage_error(box, "--nsbox-report=adir")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--nsbox-memory=12x",), "invalid --nsbox-memory='12x': " + SIZE_FORMS),
        (("--nsbox-memory=8m",), "invalid --nsbox-memory='8m': 8.0 MiB is below the 16.0 MiB "
         'minimum: a Python child needs that much to start; give at least "16m"'),
        (("--nsbox-memory=",), "invalid --nsbox-memory='': " + SIZE_FORMS),
        (("--nsbox-tmp-size=512k",), "invalid --nsbox-tmp-size='512k': 512.0 KiB is below the "
         "1.0 MiB minimum"),
        (("--nsbox-cpu=0",), "invalid --nsbox-cpu='0': expected a number of CPUs > 0"),
        (("--nsbox-pids=2",), "invalid --nsbox-pids='2': expected at least 3: the sandbox "
         "itself needs 2 processes"),
        (("--nsbox-timeout=soon",), "invalid --nsbox-timeout='soon': expected seconds > 0"),
        (("--nsbox-network=bridge",), "invalid --nsbox-network='bridge': expected one of "
         "'loopback', 'host'"),
        (("--nsbox-tmp=shared",), "invalid --nsbox-tmp='shared': expected one of 'private', "
         "'host'"),
        (("--nsbox-writes=warn",), "invalid --nsbox-writes='warn': expected one of 'ignore', "
         "'report', 'fail'"),
        (("--nsbox-unavailable=ignore",), "invalid --nsbox-unavailable='ignore': expected one "
         "of 'fail', 'skip', 'run'"),
        (("--nsbox-cgroup= ",), "invalid --nsbox-cgroup=' ': expected a non-empty path"),
        (("--nsbox-tmp=host", "--nsbox-tmp-size=1g"), "invalid --nsbox-tmp-size='1g': it sizes "
         "the private /tmp, but --nsbox-tmp='host' shares the host's /tmp; drop one of them"),
    ],
)  # fmt: skip
def test_bad_cli_values_are_usage_errors(
    box: pytest.Pytester, args: tuple[str, ...], expected: str
) -> None:
    assert usage_error(box, *args).startswith(expected)


def test_bad_env_value_names_the_variable(box: pytest.Pytester) -> None:
    message = usage_error(box, environ={"PYTEST_NSBOX_MEMORY": "12x"})
    assert message == f"invalid PYTEST_NSBOX_MEMORY='12x' in the environment: {SIZE_FORMS} " + (
        "(binary units: 1m = 1048576 bytes)"
    )
    message = usage_error(box, environ={"PYTEST_NSBOX": "sometimes"})
    assert message.startswith("invalid PYTEST_NSBOX='sometimes' in the environment: expected")


def test_bad_ini_value_names_the_key_and_the_file(box: pytest.Pytester) -> None:
    inifile = box.makeini("[pytest]\nnsbox_memory = 12x\nnsbox_tmp = host\n")
    assert usage_error(box).startswith(f"invalid nsbox_memory='12x' in {inifile}: {SIZE_FORMS}")
    # A valid value from a higher-precedence source hides the bad one.
    assert session(box, "--nsbox-memory=64m").defaults.memory == 64 * MiB
    message = usage_error(box, "--nsbox-memory=64m", "--nsbox-tmp-size=1g")
    assert f"but nsbox_tmp='host' in {inifile} shares the host's /tmp" in message


def test_bad_override_ini_value_names_the_override(box: pytest.Pytester) -> None:
    box.makeini("[pytest]\nnsbox_memory = 1g\n")
    message = usage_error(box, "-o", "nsbox_memory=12x")
    assert message.startswith(f"invalid nsbox_memory='12x' in -o/--override-ini: {SIZE_FORMS}")


def test_bad_cli_value_stops_a_real_run_with_a_usage_error(box: pytest.Pytester) -> None:
    box.makeconftest(REPORTING_CONFTEST)
    box.makepyfile("def test_a(): pass")
    result = box.runpytest(*ISOLATE, "--nsbox-memory=12x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # 4
    result.stderr.fnmatch_lines([f"ERROR: invalid --nsbox-memory='12x': {SIZE_FORMS}*"])
    result.stdout.no_fnmatch_line("*passed*")


MARKED_MODULE = """
import pytest

pytestmark = pytest.mark.nsbox(memory="1g", network="host", timeout=30)


class TestClass:
    pytestmark = pytest.mark.nsbox(memory="512m", cpu=1)

    @pytest.mark.nsbox(memory="64m")
    def test_method_marker(self):
        pass

    def test_class_marker(self):
        pass


def test_module_marker():
    pass


@pytest.mark.nsbox(hostname="custom", memory=None)
def test_function_marker():
    pass


@pytest.mark.nsbox(pids=32)
@pytest.mark.nsbox(pids=16, tmp="host")
def test_stacked_markers_the_one_nearest_the_def_wins():
    pass
"""


def test_markers_merge_per_argument_with_the_closest_winning(box: pytest.Pytester) -> None:
    found = item_settings(box, MARKED_MODULE)
    module = SandboxSettings(memory=GiB, network="host", timeout=30.0)
    assert found == {
        "test_method_marker": dataclasses.replace(module, memory=64 * MiB, cpu=1.0),
        "test_class_marker": dataclasses.replace(module, memory=512 * MiB, cpu=1.0),
        "test_module_marker": module,
        "test_function_marker": dataclasses.replace(module, memory=None, hostname="custom"),
        "test_stacked_markers_the_one_nearest_the_def_wins": dataclasses.replace(
            module, pids=16, tmp="host"
        ),
    }


def test_markers_override_session_defaults(box: pytest.Pytester) -> None:
    source = """
import pytest

@pytest.mark.nsbox(memory="64m", max_throttle="2s")
def test_marked():
    pass

def test_unmarked():
    pass
"""
    args = ("--nsbox", "--nsbox-memory=1g", "--nsbox-cpu=2", "--nsbox-network=host")
    found = item_settings(box, source, *args, environ={"PYTEST_NSBOX_PIDS": "50"})
    session_defaults = SandboxSettings(memory=GiB, cpu=2.0, pids=50, network="host")
    assert found["test_unmarked"] == session_defaults
    assert found["test_marked"] == dataclasses.replace(
        session_defaults, memory=64 * MiB, max_throttle=Throttle(fraction=None, seconds=2.0)
    )


def test_only_marked_tests_are_sandboxed_without_sandbox_all(box: pytest.Pytester) -> None:
    source = """
import pytest

@pytest.mark.nsbox
def test_bare_marker():
    pass

@pytest.mark.nsbox(enabled=True, cpu=0.5)
def test_enabled():
    pass

def test_unmarked():
    pass
"""
    found = item_settings(box, source, "--nsbox-memory=1g")
    assert found == {
        "test_bare_marker": SandboxSettings(memory=GiB),
        "test_enabled": SandboxSettings(memory=GiB, cpu=0.5),
        "test_unmarked": None,
    }


OPT_OUT_MODULE = """
import pytest

@pytest.mark.nsbox(enabled=False)
def test_opted_out():
    pass

def test_unmarked():
    pass

class TestOptedOut:
    pytestmark = pytest.mark.nsbox(enabled=False)

    def test_inherits_opt_out(self):
        pass

    @pytest.mark.nsbox(memory="64m")
    def test_closer_marker_opts_back_in(self):
        pass
"""


def test_enabled_false_opts_out_under_sandbox_all(box: pytest.Pytester) -> None:
    found = item_settings(box, OPT_OUT_MODULE, "--nsbox")
    assert found == {
        "test_opted_out": None,
        "test_unmarked": SandboxSettings(),
        "test_inherits_opt_out": None,
        "test_closer_marker_opts_back_in": SandboxSettings(memory=64 * MiB),
    }


def test_enabled_false_without_sandbox_all(box: pytest.Pytester) -> None:
    found = item_settings(box, OPT_OUT_MODULE)
    assert found["test_opted_out"] is None
    assert found["test_unmarked"] is None
    assert found["test_closer_marker_opts_back_in"] == SandboxSettings(memory=64 * MiB)


def test_writable_paths_are_resolved_against_the_rootdir(
    box: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    box.makeini("[pytest]\n")
    data = box.mkdir("data")
    (data / "cache").mkdir()
    Path(box.path, "link").symlink_to(data)
    absolute = box.mkdir("elsewhere")
    monkeypatch.chdir(box.mkdir("sub"))
    source = f"""
import pathlib
import pytest

@pytest.mark.nsbox(writable="data")
def test_one():
    pass

@pytest.mark.nsbox(writable=[pathlib.Path("link/cache"), {str(absolute)!r}, "data", "link"])
def test_list():
    pass
"""
    found = item_settings(box, source)
    real = os.path.realpath
    assert found["test_one"] == SandboxSettings(writable=(real(data),))
    test_list = found["test_list"]
    assert test_list is not None
    assert test_list.writable == (real(data / "cache"), real(absolute), real(data))


def marker_on(arguments: str) -> str:
    return f"import pytest\n\n@pytest.mark.nsbox({arguments})\ndef test_x():\n    pass\n"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('memroy="64m"', "invalid memroy='64m' on test_mod.py::test_x: the nsbox marker has no "
         "such argument; did you mean memory? it accepts: memory, cpu, pids, timeout, "
         "max_throttle, network, hostname, tmp, tmp_size, writable, writes, enabled"),
        ("colour=1", "invalid colour=1 on test_mod.py::test_x: the nsbox marker has no such "
         "argument; it accepts: memory,"),
        ('"64m"', "invalid positional arguments ('64m',) to the nsbox marker on "
         "test_mod.py::test_x: it takes keyword arguments only"),
        ('enabled=False, memory="64m"', "conflicting nsbox arguments on test_mod.py::test_x: "
         "enabled=False opts the test out of the sandbox, so memory='64m' would have no effect"),
        ('enabled="no"', "invalid enabled='no' on test_mod.py::test_x: expected True or False"),
        ("max_throttle=0.2", "invalid max_throttle=0.2 on test_mod.py::test_x: max_throttle "
         "needs a cpu limit: throttling only happens under cpu="),
        ('cpu=None, max_throttle="1s"', "invalid max_throttle='1s' on test_mod.py::test_x: "
         "max_throttle needs a cpu limit"),
        ("cpu=1, max_throttle=3", "invalid max_throttle=3 on test_mod.py::test_x: a bare number "
         "is a fraction of wall time"),
        ('tmp="host", tmp_size="1g"', "invalid tmp_size='1g' on test_mod.py::test_x: it sizes "
         "the private /tmp, but tmp='host' on test_mod.py::test_x shares the host's /tmp"),
        ('memory="64x"', "invalid memory='64x' on test_mod.py::test_x: " + SIZE_FORMS),
        ('memory="8m"', "invalid memory='8m' on test_mod.py::test_x: 8.0 MiB is below the "
         "16.0 MiB minimum: a Python child needs that much to start"),
        ("memory=True", "invalid memory=True on test_mod.py::test_x: " + SIZE_FORMS),
        ("cpu=0", "invalid cpu=0 on test_mod.py::test_x: expected a number of CPUs"),
        ("pids=2", "invalid pids=2 on test_mod.py::test_x: expected at least 3: the sandbox "
         "itself needs 2 processes"),
        ("pids=8.0", "invalid pids=8.0 on test_mod.py::test_x: expected a whole number"),
        ("timeout=-1", "invalid timeout=-1 on test_mod.py::test_x: expected seconds > 0"),
        ('network="bridge"', "invalid network='bridge' on test_mod.py::test_x: expected one of "
         "'loopback', 'host'"),
        ("network=None", "invalid network=None on test_mod.py::test_x: expected one of"),
        ('writes="warn"', "invalid writes='warn' on test_mod.py::test_x: expected one of "
         "'ignore', 'report', 'fail'"),
        ('hostname="bad_host"', "invalid hostname='bad_host' on test_mod.py::test_x: expected "
         "None (derived from the test name) or a hostname"),
        ('hostname="-lead"', "invalid hostname='-lead' on test_mod.py::test_x"),
        ('hostname="a..b"', "invalid hostname='a..b' on test_mod.py::test_x"),
        ('hostname="a/b"', "invalid hostname='a/b' on test_mod.py::test_x"),
        ('hostname="a\\0b"', "invalid hostname='a\\x00b' on test_mod.py::test_x"),
        ('hostname="h" * 65', f"invalid hostname={'h' * 65!r} on test_mod.py::test_x"),
        ("hostname=''", "invalid hostname='' on test_mod.py::test_x"),
        ('writable="missing"', "invalid writable='missing' on test_mod.py::test_x: "
         "{root}/missing does not exist (relative paths are relative to the rootdir {root}); "
         "expected an existing path"),
        ("writable=[1]", "invalid writable=[1] on test_mod.py::test_x: expected an existing path"),
        ('writable=b"data"', "invalid writable=b'data' on test_mod.py::test_x: expected an "
         "existing path"),
        ('writable=""', "invalid writable='' on test_mod.py::test_x: expected an existing path"),
    ],
)  # fmt: skip
def test_marker_errors_name_test_argument_value_and_forms(
    box: pytest.Pytester, arguments: str, expected: str
) -> None:
    message = marker_error(box, marker_on(arguments))
    assert message.startswith(expected.format(root=os.path.realpath(box.path)))


def test_valid_hostnames_are_kept(box: pytest.Pytester) -> None:
    source = marker_on('hostname="Db-1.example.test"')
    assert item_settings(box, source)["test_x"] == SandboxSettings(hostname="Db-1.example.test")


def test_marker_error_from_a_class_marker_says_where_the_marker_is(box: pytest.Pytester) -> None:
    source = """
import pytest

@pytest.mark.nsbox(cpu="lots")
class TestA:
    def test_b(self):
        pass
"""
    assert marker_error(box, source).startswith(
        "invalid cpu='lots' on test_mod.py::TestA::test_b "
        "(from the marker on test_mod.py::TestA): expected a number of CPUs"
    )


def test_a_bad_marker_value_overridden_by_a_closer_marker_is_not_used(
    box: pytest.Pytester,
) -> None:
    source = """
import pytest

pytestmark = pytest.mark.nsbox(memory="64x")

@pytest.mark.nsbox(memory="64m")
def test_x():
    pass
"""
    assert item_settings(box, source)["test_x"] == SandboxSettings(memory=64 * MiB)


def test_a_real_session_computes_settings_for_every_item(
    box: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    box.makeconftest(REPORTING_CONFTEST)
    box.makeini("[pytest]\nnsbox_memory = 1g\nnsbox_writes_ignore = *.log\n")
    box.makepyfile(
        test_mod="""
import pytest

pytestmark = pytest.mark.nsbox(cpu=0.5)

class TestA:
    @pytest.mark.nsbox(memory="64m", max_throttle=0.25)
    def test_closest(self):
        pass

    @pytest.mark.nsbox(enabled=False)
    def test_opted_out(self):
        pass

@pytest.mark.nsbox(bogus=1)
def test_bad():
    pass
""",
        test_plain="def test_plain():\n    pass\n",
    )
    monkeypatch.setenv("PYTEST_NSBOX_MEMORY", "512m")
    result = box.runpytest(*ISOLATE, "--collect-only", "-q", "--nsbox", "--nsbox-pids=64")
    assert result.ret == pytest.ExitCode.OK
    report = json.loads((box.path / "nsbox-settings.json").read_text())
    assert report["session"]["sandbox_all"] is True
    expected = SandboxSettings(memory=512 * MiB, pids=64, writes_ignore=("*.log",))
    defaults = json.loads(json.dumps(dataclasses.asdict(expected)))
    assert report["session"]["defaults"] == defaults
    found = report["items"]
    assert found["test_plain.py::test_plain"] == defaults
    assert found["test_mod.py::TestA::test_closest"] == {
        **defaults,
        "memory": 64 * MiB,
        "cpu": 0.5,
        "max_throttle": {"fraction": 0.25, "seconds": None},
    }
    assert found["test_mod.py::TestA::test_opted_out"] is None
    assert found["test_mod.py::test_bad"]["error"].startswith(
        "invalid bogus=1 on test_mod.py::test_bad: the nsbox marker has no such argument"
    )


def test_default_writes_ignore(box: pytest.Pytester) -> None:
    assert session(box).defaults.writes_ignore == DEFAULT_WRITES_IGNORE
