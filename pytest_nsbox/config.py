"""All user configuration of the sandbox: what can be set, from where, and how it is checked.

Settings come from four places, lowest precedence first: the ini file, the
environment, the command line, and ``@pytest.mark.nsbox`` markers. The
session-wide values are read and validated once, by
:meth:`SessionOptions.from_config`; marker values are validated per test by
:func:`settings_for_item`. Every value is checked where it is read, so that an
error can say which setting was wrong, what its value was, where it came from
and what would have been accepted. The rest of the plugin receives only
validated, typed settings and never re-checks them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import pytest

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

#: A Python interpreter cannot even start in less memory than this, so a lower
#: limit would fail every test with an opaque out-of-memory kill.
MIN_MEMORY = 16 * MiB
#: pytest keeps its own temporary files (``tmp_path``) in /tmp.
MIN_TMP_SIZE = 1 * MiB
DEFAULT_TMP_SIZE = 256 * MiB
#: cgroup files hold signed 64-bit byte counts; more cannot be set.
MAX_BYTES = 2**63 - 1
MAX_CPU = 1024
#: The sandbox's own processes count against the task limit too.
MIN_PIDS = 3
DEFAULT_WRITES_IGNORE = ("__pycache__", "*.pyc", ".pytest_cache")

NETWORK_MODES = ("loopback", "host")
TMP_MODES = ("private", "host")
WRITES_MODES = ("ignore", "report", "fail")
UNAVAILABLE_MODES = ("fail", "skip", "run")

#: Written in ini, env or CLI values, this lifts a limit set at a lower
#: precedence (``--nsbox-memory=none`` beats ``nsbox_memory = 1g``).
NO_LIMIT = "none"

#: The arguments of ``@pytest.mark.nsbox``, in the order help and errors list them.
MARKER_ARGS = (
    "memory",
    "cpu",
    "pids",
    "timeout",
    "max_throttle",
    "network",
    "hostname",
    "tmp",
    "tmp_size",
    "writable",
    "writes",
    "enabled",
)

_SIZE_FORMS = (
    'expected bytes as an int or a size like "64m", "64MiB", "64 MB", "1g" '
    "(binary units: 1m = 1048576 bytes)"
)
_CPU_FORMS = f"expected a number of CPUs > 0 and <= {MAX_CPU}, as for docker --cpus: 0.5, 2, '1.5'"
_DURATION_FORMS = 'expected seconds > 0 as a number or a duration like "10s", "500ms", "2m", "1h"'
_PIDS_FORMS = f"expected a whole number of tasks >= {MIN_PIDS}, like 64"
_THROTTLE_FORMS = (
    "expected a fraction of wall time in (0, 1] like 0.2, "
    'or a throttled-time duration with a unit like "2s" or "500ms"'
)
_BOOL_FORMS = "expected one of 1/0, true/false, yes/no, on/off"
_HOSTNAME_FORMS = (
    "expected None (derived from the test name) or a hostname of at most 64 letters, digits, "
    "'-' and '.', whose dot-separated labels are not empty and do not start or end with '-'"
)
_WRITABLE_FORMS = "expected an existing path, or a list of them, as str or os.PathLike"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **dict.fromkeys(("k", "kb", "kib"), KiB),
    **dict.fromkeys(("m", "mb", "mib"), MiB),
    **dict.fromkeys(("g", "gb", "gib"), GiB),
    **dict.fromkeys(("t", "tb", "tib"), TiB),
}
# Digit runs are bounded so that absurd inputs fail the match instead of
# reaching int()'s limit on the length of a digit string.
_DECIMAL = r"(?:[0-9]{1,30}(?:\.[0-9]{1,30})?|\.[0-9]{1,30})"
_SIZE_RE = re.compile(rf"({_DECIMAL})\s*([a-z]*)", re.ASCII | re.IGNORECASE)
_DURATION_RE = re.compile(rf"({_DECIMAL})\s*(ms|s|m|h)", re.ASCII | re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PIDS_RE = re.compile(r"[0-9]{1,20}", re.ASCII)
_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", re.ASCII | re.IGNORECASE)
_NOT_HOSTNAME_CHARS = re.compile(r"[^a-z0-9]+")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


class NsboxConfigError(ValueError):
    """A setting has a value the sandbox cannot use.

    The message names the setting, the bad value, where it came from and the
    accepted forms: it is shown to the user as is, with no traceback.
    """


def _invalid(name: str, value: object, where: str, problem: str) -> NsboxConfigError:
    """The one shape of every "bad value" message, so they all read alike."""
    place = f" {where}" if where else ""
    return NsboxConfigError(f"invalid {name}={value!r}{place}: {problem}")


@dataclass(frozen=True)
class Throttle:
    """How much CPU throttling a test under a ``cpu=`` limit may suffer before it fails.

    A ``fraction`` of the test's wall time, or a number of throttled ``seconds``:
    exactly one is set.
    """

    fraction: float | None
    seconds: float | None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.seconds is None):
            raise ValueError(f"Throttle needs exactly one of fraction and seconds, got {self!r}")

    def __str__(self) -> str:
        """The throttle in the form the marker accepts: ``0.2`` or ``2s``."""
        if self.fraction is not None:
            return f"{self.fraction:g}"
        assert self.seconds is not None  # __post_init__ guarantees one is set
        return _format_seconds(self.seconds)


@dataclass(frozen=True)
class SandboxSettings:
    """The validated settings one sandboxed test runs with.

    Sizes are bytes, durations seconds, paths absolute. ``None`` limits mean no
    limit. Built only by :meth:`SessionOptions.from_config` (the session
    defaults) and :func:`settings_for_item`, which validate every field.
    """

    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None
    timeout: float | None = None
    max_throttle: Throttle | None = None
    network: str = "loopback"
    hostname: str | None = None
    tmp: str = "private"
    tmp_size: int = DEFAULT_TMP_SIZE
    writable: tuple[str, ...] = ()
    writes: str = "ignore"
    writes_ignore: tuple[str, ...] = DEFAULT_WRITES_IGNORE

    @property
    def limits_requested(self) -> bool:
        """Whether the test needs cgroup limits (and so a usable cgroup)."""
        return self.memory is not None or self.cpu is not None or self.pids is not None

    def hostname_for(self, nodeid: str) -> str:
        """The hostname inside the test's sandbox.

        Unless one was given, it is derived from the test's name, so that logs
        and error messages written from inside the sandbox say which test they
        came from: ``nsbox-test-foo`` for ``test_mod.py::test_foo``.
        """
        if self.hostname is not None:
            return self.hostname
        test_name = nodeid.rpartition("::")[2]
        slug = _NOT_HOSTNAME_CHARS.sub("-", test_name.lower()).strip("-")
        # One DNS label: at most 63 characters, not ending in '-'.
        return f"nsbox-{slug}"[:63].rstrip("-") if slug else "nsbox"

    def describe(self) -> str:
        """The settings that differ from the defaults, on one line, for reports.

        For example ``memory=64.0 MiB cpu=0.5 pids=64``; empty if all are defaults.
        """
        defaults = SandboxSettings()
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != getattr(defaults, field.name):
                parts.append(f"{field.name}={_describe_value(field.name, value)}")
        return " ".join(parts)


def _describe_value(field: str, value: object) -> str:
    if field in ("memory", "tmp_size") and isinstance(value, int):
        return format_size(value)
    if field == "timeout" and isinstance(value, float):
        return _format_seconds(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def format_size(n: int) -> str:
    """A byte count for humans, in the largest binary unit it reaches: ``64.0 MiB``."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def _as_number(value: object) -> float | None:
    """``value`` as a float if it is an int, a float or a string float() reads, else None.

    bool is refused although it is an int: ``cpu=True`` is a mistake, not one CPU.
    Non-finite results are returned for the caller's range check to reject.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_size(value: object, *, name: str, where: str = "") -> int:
    """A byte count from an int or a size string with an optional binary unit.

    Units are binary, as Docker reads them: ``k``/``kb``/``kib`` = 1024, ``m``
    = 1024**2, ``g`` = 1024**3, ``t`` = 1024**4, any case, with optional space.
    A fraction of a unit (``1.5g``) is truncated to whole bytes; a fraction of a
    byte is an error. ``where`` says where the value came from, for the message.
    """
    if isinstance(value, bool):
        raise _invalid(name, value, where, _SIZE_FORMS)
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        amount, scale = Fraction(value), 1
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        unit = match[2].lower()
        if unit not in _SIZE_UNITS:
            raise _invalid(name, value, where, _SIZE_FORMS)
        amount, scale = Fraction(match[1]), _SIZE_UNITS[unit]
    else:
        raise _invalid(name, value, where, _SIZE_FORMS)
    if scale == 1 and amount.denominator != 1:
        raise _invalid(name, value, where, f"a byte count must be whole; {_SIZE_FORMS}")
    size = math.floor(amount * scale)
    if size <= 0:
        raise _invalid(name, value, where, f"a size must be positive; {_SIZE_FORMS}")
    if size > MAX_BYTES:
        raise _invalid(name, value, where, f"more than the kernel's limit of 8 EiB; {_SIZE_FORMS}")
    return size


def parse_cpu(value: object, *, name: str, where: str = "") -> float:
    """A CPU limit in CPUs, like ``docker --cpus``: 0.5 is half of one CPU's time."""
    cpus = _as_number(value)
    if cpus is None or not 0 < cpus <= MAX_CPU:  # also false for nan
        raise _invalid(name, value, where, _CPU_FORMS)
    return cpus


def parse_duration(value: object, *, name: str, where: str = "") -> float:
    """Seconds from a number or a string with a unit: ``ms``, ``s``, ``m`` or ``h``."""
    seconds = _as_number(value)
    if seconds is None and isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match:
            seconds = float(match[1]) * _DURATION_UNITS[match[2].lower()]
    if seconds is None or not (0 < seconds < math.inf):
        raise _invalid(name, value, where, _DURATION_FORMS)
    return seconds


def parse_pids(value: object, *, name: str, where: str = "") -> int:
    """A task limit: a whole number, at least what the sandbox itself uses plus one."""
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and _PIDS_RE.fullmatch(value.strip()):
        count = int(value)
    else:
        raise _invalid(name, value, where, _PIDS_FORMS)
    if count < MIN_PIDS:
        raise _invalid(
            name,
            value,
            where,
            f"expected at least {MIN_PIDS}: the sandbox itself needs 2 processes, "
            "so a lower limit leaves none for the test",
        )
    return count


def parse_throttle(value: object, *, name: str, where: str = "") -> Throttle:
    """A throttling budget: a bare number is a fraction, a duration needs a unit.

    The unit is required for durations because a bare ``2`` could mean either
    "2 seconds" or a mistyped fraction; refusing it is clearer than guessing.
    """
    fraction = _as_number(value)
    if fraction is not None:
        if 0 < fraction <= 1:
            return Throttle(fraction=fraction, seconds=None)
        if fraction > 1:
            raise _invalid(
                name,
                value,
                where,
                "a bare number is a fraction of wall time and must be in (0, 1], like 0.2; "
                'for a throttled-time duration give a unit, like "2s" or "500ms"',
            )
        raise _invalid(name, value, where, _THROTTLE_FORMS)
    try:
        seconds = parse_duration(value, name=name, where=where)
    except NsboxConfigError:
        raise _invalid(name, value, where, _THROTTLE_FORMS) from None
    return Throttle(fraction=None, seconds=seconds)


def parse_bool(value: object, *, name: str, where: str = "") -> bool:
    """A yes/no setting from an ini or env string (or an actual bool)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _invalid(name, value, where, _BOOL_FORMS)


def _parse_choice(value: object, choices: tuple[str, ...], *, name: str, where: str) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise _invalid(name, value, where, "expected one of " + ", ".join(map(repr, choices)))


def _parse_network(value: object, *, name: str, where: str) -> str:
    return _parse_choice(value, NETWORK_MODES, name=name, where=where)


def _parse_tmp(value: object, *, name: str, where: str) -> str:
    return _parse_choice(value, TMP_MODES, name=name, where=where)


def _parse_writes(value: object, *, name: str, where: str) -> str:
    return _parse_choice(value, WRITES_MODES, name=name, where=where)


def _parse_memory(value: object, *, name: str, where: str) -> int:
    size = parse_size(value, name=name, where=where)
    if size < MIN_MEMORY:
        raise _invalid(
            name,
            value,
            where,
            f"{format_size(size)} is below the {format_size(MIN_MEMORY)} minimum: "
            'a Python child needs that much to start; give at least "16m"',
        )
    return size


def _parse_tmp_size(value: object, *, name: str, where: str) -> int:
    size = parse_size(value, name=name, where=where)
    if size < MIN_TMP_SIZE:
        raise _invalid(
            name,
            value,
            where,
            f"{format_size(size)} is below the {format_size(MIN_TMP_SIZE)} minimum: "
            'pytest keeps its own temporary files in /tmp; give at least "1m"',
        )
    return size


def _parse_hostname(value: object, *, name: str, where: str) -> str | None:
    """An explicit hostname, checked here because sethostname() would only say EINVAL."""
    if value is None:
        return None
    if (
        isinstance(value, str)
        and len(value) <= 64
        and all(_HOST_LABEL_RE.fullmatch(label) for label in value.split("."))
    ):
        return value
    raise _invalid(name, value, where, _HOSTNAME_FORMS)


def _parse_writes_ignore(value: object, *, name: str, where: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) and p for p in value):
        return tuple(value)
    raise _invalid(name, value, where, "expected a list of non-empty fnmatch globs, like *.log")


def _parse_writable(value: object, rootdir: Path, *, name: str, where: str) -> tuple[str, ...]:
    """Absolute real paths of the ``writable`` pass-throughs, which must exist.

    They are resolved here, against the rootdir rather than whatever the
    current directory is, so that a missing path fails at collection, naming
    the path, instead of as a mount error inside the sandbox.
    """
    entries = list(value) if isinstance(value, (list, tuple)) else [value]
    paths: list[str] = []
    for entry in entries:
        path = os.fspath(entry) if isinstance(entry, (str, os.PathLike)) else None
        if not isinstance(path, str) or not path:
            raise _invalid(name, value, where, _WRITABLE_FORMS)
        full = os.path.realpath(os.path.join(rootdir, path))
        if not os.path.exists(full):
            raise _invalid(
                name,
                value,
                where,
                f"{full} does not exist (relative paths are relative to the rootdir "
                f"{rootdir}); {_WRITABLE_FORMS}",
            )
        paths.append(full)
    return tuple(dict.fromkeys(paths))


class _FieldParser(Protocol):
    def __call__(self, value: object, *, name: str, where: str) -> object: ...


_FIELD_PARSERS: dict[str, _FieldParser] = {
    "memory": _parse_memory,
    "cpu": parse_cpu,
    "pids": parse_pids,
    "timeout": parse_duration,
    "max_throttle": parse_throttle,
    "network": _parse_network,
    "hostname": _parse_hostname,
    "tmp": _parse_tmp,
    "tmp_size": _parse_tmp_size,
    "writes": _parse_writes,
    "writes_ignore": _parse_writes_ignore,
}
#: The fields where None (or "none" as text) means "no limit".
_LIMIT_FIELDS = ("memory", "cpu", "pids", "timeout", "max_throttle")


class _Given(NamedTuple):
    """A raw setting value and how to name it and its origin in a message."""

    value: object
    name: str
    where: str


def _build(base: SandboxSettings, given: Mapping[str, _Given], rootdir: Path) -> SandboxSettings:
    """``base`` with the ``given`` values validated and applied, then checked as a whole.

    Conflicts are only looked for among the values given together (all the
    markers of one test, or all session sources), so that a session default
    never turns a marker that is fine on its own into an error.
    """
    changes: dict[str, Any] = {}
    for field, (value, name, where) in given.items():
        if field in _LIMIT_FIELDS and (
            value is None or (isinstance(value, str) and value.strip().lower() == NO_LIMIT)
        ):
            changes[field] = None
        elif field == "writable":
            changes[field] = _parse_writable(value, rootdir, name=name, where=where)
        else:
            changes[field] = _FIELD_PARSERS[field](value, name=name, where=where)
    settings = dataclasses.replace(base, **changes)

    if "max_throttle" in given and settings.max_throttle is not None and settings.cpu is None:
        value, name, where = given["max_throttle"]
        raise _invalid(
            name,
            value,
            where,
            "max_throttle needs a cpu limit: throttling only happens under cpu=; "
            "set cpu as well, or drop max_throttle",
        )
    if "tmp" in given and "tmp_size" in given and settings.tmp == "host":
        value, name, where = given["tmp_size"]
        tmp = given["tmp"]
        raise _invalid(
            name,
            value,
            where,
            f"it sizes the private /tmp, but {tmp.name}={tmp.value!r}"
            f"{' ' + tmp.where if tmp.where else ''} shares the host's /tmp; drop one of them",
        )
    return settings


# Per-test settings that also have session defaults, and which of those can
# come from the environment. Each ``x`` is ``--nsbox-x`` on the command line,
# ``nsbox_x`` in the ini file and ``PYTEST_NSBOX_X`` in the environment.
_SESSION_FIELDS = {
    "memory": (
        "SIZE",
        "default memory limit of sandboxed tests, like 512m or 1g (binary units)",
    ),
    "cpu": ("CPUS", "default CPU limit of sandboxed tests, in CPUs as for docker --cpus: 0.5, 2"),
    "pids": ("N", f"default limit on the tasks of a sandboxed test (>= {MIN_PIDS})"),
    "timeout": ("DURATION", "default wall-clock timeout of sandboxed tests, like 30s, 500ms, 2m"),
    "network": (
        "loopback|host",
        "network of sandboxed tests: their own with only lo (loopback, the default), or the host's",
    ),
    "tmp": (
        "private|host",
        "/tmp of sandboxed tests: a private size-limited tmpfs (the default), or the host's",
    ),
    "tmp_size": ("SIZE", "size of the private /tmp (default 256m)"),
    "writes": (
        "ignore|report|fail",
        "what a test's writes to the repo do: nothing (ignore, the default), "
        "get reported (report), or fail the test (fail)",
    ),
}
_ENV_FIELDS = ("memory", "cpu", "pids", "timeout")


def add_options(parser: pytest.Parser) -> None:
    """Register the command-line options and ini keys of pytest-nsbox.

    Every option defaults to None and every ini key to None, so that "not
    given" can be told apart from a value and the lower precedence sources
    consulted instead.
    """
    group = parser.getgroup("nsbox", "pytest-nsbox: run tests in throw-away sandboxes")

    def add(
        key: str, help: str, *, env: bool = False, ini_help: str | None = None, **kwargs: Any
    ) -> None:
        sources = f"ini {key}" + (f", env {_env_var(key)}" if env else "")
        group.addoption(
            _cli_option(key), dest=key, default=None, help=f"{help} [{sources}]", **kwargs
        )
        parser.addini(key, ini_help or help, default=None)

    add(
        "nsbox",
        "sandbox every collected test, not only those marked nsbox",
        env=True,
        ini_help="sandbox every collected test: true or false",
        action="store_true",
    )
    add(
        "nsbox_unavailable",
        "what to do with a sandboxed test when this machine cannot sandbox it, or cannot "
        "set a limit it asks for: fail it (default), skip it, or run it unsandboxed",
        env=True,
        metavar="fail|skip|run",
    )
    for field, (metavar, help) in _SESSION_FIELDS.items():
        if field in _LIMIT_FIELDS:
            help += f"; '{NO_LIMIT}' for no limit"
        add(f"nsbox_{field}", help, env=field in _ENV_FIELDS, metavar=metavar)
    parser.addini(
        "nsbox_writes_ignore",
        "globs of repo writes to ignore, matched against each path component and the "
        "relative path (default: " + ", ".join(DEFAULT_WRITES_IGNORE) + ")",
        type="linelist",
        default=None,
    )
    add(
        "nsbox_cgroup", "a delegated cgroup subtree to create the tests' cgroups in", metavar="PATH"
    )
    add(
        "nsbox_report",
        "write a machine-readable report of every sandboxed test to this JSON file",
        metavar="FILE.json",
    )
    group.addoption(
        "--nsbox-doctor",
        dest="nsbox_doctor",
        action="store_true",
        default=None,
        help="check what sandboxing this machine supports, print it and exit",
    )


def _cli_option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _env_var(key: str) -> str:
    return "PYTEST_" + key.upper()


def _ini_where(config: pytest.Config, key: str) -> str:
    overrides = config.getoption("override_ini") or []
    if any(item.partition("=")[0].strip() == key for item in overrides):
        return "in -o/--override-ini"
    return f"in {config.inipath}"


def _read(
    config: pytest.Config,
    environ: Mapping[str, str],
    key: str,
    *,
    env: bool = False,
    cli: bool = True,
) -> _Given | None:
    """The highest-precedence value given for one session setting, or None.

    Command line beats environment beats ini file. Empty env and ini values
    count as not given, so ``PYTEST_NSBOX_MEMORY=`` unsets a variable.
    """
    if cli and (value := config.getoption(key)) is not None:
        return _Given(value, _cli_option(key), "")
    if env and environ.get(_env_var(key), "").strip():
        return _Given(environ[_env_var(key)], _env_var(key), "in the environment")
    if value := config.getini(key):
        return _Given(value, key, _ini_where(config, key))
    return None


def _text(given: _Given) -> str:
    """A path-like setting as non-blank text (ini values always are text)."""
    value, name, where = given
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise _invalid(name, value, where, "expected a non-empty path")


@dataclass(frozen=True)
class SessionOptions:
    """The session-wide settings of pytest-nsbox, read once per session.

    ``defaults`` are the settings of a sandboxed test that markers do not
    override.
    """

    sandbox_all: bool
    unavailable: str
    cgroup_path: str | None
    report_path: str | None
    doctor: bool
    defaults: SandboxSettings

    @classmethod
    def from_config(
        cls, config: pytest.Config, *, environ: Mapping[str, str] = os.environ
    ) -> SessionOptions:
        """Read and validate all session settings, from ini < env < CLI.

        A bad value is a :class:`pytest.UsageError`, so pytest stops before
        collecting anything and prints just the message.
        """
        try:
            return cls._read(config, environ)
        except NsboxConfigError as err:
            raise pytest.UsageError(str(err)) from err

    @classmethod
    def _read(cls, config: pytest.Config, environ: Mapping[str, str]) -> SessionOptions:
        given = _read(config, environ, "nsbox", env=True)
        sandbox_all = given is not None and parse_bool(
            given.value, name=given.name, where=given.where
        )

        given = _read(config, environ, "nsbox_unavailable", env=True)
        unavailable = (
            "fail"
            if given is None
            else _parse_choice(given.value, UNAVAILABLE_MODES, name=given.name, where=given.where)
        )

        given = _read(config, environ, "nsbox_cgroup")
        cgroup_path = None if given is None else _text(given)

        given = _read(config, environ, "nsbox_report")
        report_path = None if given is None else _report_path(config, given)

        settings = {
            field: found
            for field in _SESSION_FIELDS
            if (found := _read(config, environ, f"nsbox_{field}", env=field in _ENV_FIELDS))
        }
        if found := _read(config, environ, "nsbox_writes_ignore", cli=False):
            settings["writes_ignore"] = found
        return cls(
            sandbox_all=sandbox_all,
            unavailable=unavailable,
            cgroup_path=cgroup_path,
            report_path=report_path,
            doctor=bool(config.getoption("nsbox_doctor")),
            defaults=_build(SandboxSettings(), settings, config.rootpath),
        )


def _report_path(config: pytest.Config, given: _Given) -> str:
    """The report file as an absolute path, checked now rather than after the run.

    A path from the command line is relative to the current directory, like
    ``--junitxml``; one from the ini file is relative to the rootdir.
    """
    from_cli = given.name.startswith("--")
    base = config.invocation_params.dir if from_cli else config.rootpath
    path = base / _text(given)
    if path.is_dir():
        raise _invalid(
            given.name, given.value, given.where, f"{path} is a directory; expected a file path"
        )
    if not path.parent.is_dir():
        raise _invalid(
            given.name,
            given.value,
            given.where,
            f"directory {path.parent} does not exist; "
            "expected a file path in an existing directory",
        )
    return str(path)


def settings_for_item(item: pytest.Item, options: SessionOptions) -> SandboxSettings | None:
    """The settings ``item`` runs with in the sandbox, or None if it is not sandboxed.

    The ``nsbox`` markers of the test, its class and its module are merged
    argument by argument, the closest one winning, over the session defaults.
    A test is sandboxed if it has a marker or ``--nsbox`` is on; the closest
    marker decides, so ``nsbox(enabled=False)`` on a test opts it out of a
    sandboxed module or of ``--nsbox``, and a plain ``nsbox`` on a test opts it
    back in.
    """
    enabled = options.sandbox_all
    given: dict[str, _Given] = {}
    for node, mark in reversed(list(item.iter_markers_with_node("nsbox"))):
        where = f"on {item.nodeid}"
        if node is not item:
            where += f" (from the marker on {node.nodeid})"
        enabled = _check_marker(mark.args, mark.kwargs, where)
        for arg, value in mark.kwargs.items():
            if arg != "enabled":
                given[arg] = _Given(value, arg, where)
    if not enabled:
        return None
    return _build(options.defaults, given, item.config.rootpath)


def _check_marker(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str) -> bool:
    """Check the shape of one ``nsbox`` marker and return its ``enabled`` value."""
    if args:
        raise NsboxConfigError(
            f"invalid positional arguments {args!r} to the nsbox marker {where}: it takes "
            'keyword arguments only, like @pytest.mark.nsbox(memory="64m", cpu=0.5)'
        )
    for arg, value in kwargs.items():
        if arg not in MARKER_ARGS:
            close = difflib.get_close_matches(arg, MARKER_ARGS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise _invalid(
                arg,
                value,
                where,
                f"the nsbox marker has no such argument; {hint}it accepts: "
                + ", ".join(MARKER_ARGS),
            )
    enabled = kwargs.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _invalid("enabled", enabled, where, "expected True or False")
    if not enabled and len(kwargs) > 1:
        others = ", ".join(f"{arg}={value!r}" for arg, value in kwargs.items() if arg != "enabled")
        raise NsboxConfigError(
            f"conflicting nsbox arguments {where}: enabled=False opts the test out of the "
            f"sandbox, so {others} would have no effect; drop enabled=False or the other arguments"
        )
    return enabled


def marker_help() -> str:
    """The description of the ``nsbox`` marker, for ``config.addinivalue_line("markers", ...)``."""
    return (
        "nsbox(memory=None, cpu=None, pids=None, timeout=None, max_throttle=None, "
        "network='loopback', hostname=None, tmp='private', tmp_size='256m', writable=(), "
        "writes='ignore', enabled=True): run this test in a throw-away sandbox with these "
        "limits and settings (see README)"
    )
