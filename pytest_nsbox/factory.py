"""The sandbox factory: a small process that builds sandboxes ahead of their tests.

What a sandbox costs most is forking: each fork of the pytest process copies
its page tables and then its pages as they are touched, and a sandbox needs
an init beside the test (see :mod:`pytest_nsbox.sandbox`). So pytest starts
one factory per session, a fresh interpreter (about 14 MB) that imports only
the sandbox's own modules, and asks it for the sandbox of the *next* test
while the current one runs. The factory forks init from itself (cheap: it
is small; a plain user's, through an outer process), init builds the
mounts and network and sends pytest a descriptor of each namespace. For the
test, pytest forks once, and its child joins them with ``setns``.

Requests go over a SOCK_SEQPACKET socket: a pickled ``(SandboxSpec,
SandboxCgroup | None)`` and, as SCM_RIGHTS, the init's end of a fresh
socket pair; pytest keeps the other end and talks to init directly. The
factory also removes each sandbox's cgroup, once the process it forked
for it (init, or outer) has exited: then the cgroup is empty. When pytest
closes its socket the factory waits for those processes (each ends when
pytest closes its channel), removes their cgroups and exits; if pytest
dies, the factory's parent-death signal ends it, and every init still
waiting sees its channel close.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import select
import signal
import socket
import sys
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_nsbox import kernel, protocol, sandbox
from pytest_nsbox.kernel import StepError

if TYPE_CHECKING:
    # Imported where pytest uses it, never at the top: subprocess imports
    # threading, whose at-fork handler cost each fork the factory makes
    # (init's) about 140 copy-on-write faults, a quarter of init's.
    import subprocess
    from collections.abc import Callable

    from pytest_nsbox.cgroups import Limits, SandboxCgroup

_MAX_REQUEST = 1 << 20
_MAX_READY_FDS = 64  # init's namespaces, mounts, cgroup counter files and pidfd: about 20
_DEATH_GRACE = 0.5  # seconds a factory whose socket hung up may take to exit (see death)
# Variables that would have coverage measure the factory itself (it is not the tests' code).
_COVERAGE_ENV = (
    "COVERAGE_PROCESS_START",
    "COV_CORE_SOURCE",
    "COV_CORE_CONFIG",
    "COV_CORE_DATAFILE",
)


# -- the factory process -------------------------------------------------------


def serve(sock_fd: int, parent_pid: int) -> None:
    """The factory's loop: one sandbox per request, until pytest closes the socket."""
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        return
    kernel.set_process_name("nsbox-factory")
    # Ctrl-C reaches the whole process group; pytest decides when the factory ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = socket.socket(fileno=sock_fd)
    factory_pid = os.getpid()
    home: sandbox.HomeNamespaces | None = None
    if os.geteuid() == 0:
        sandbox.spare_from_oom_killer()
        home = sandbox.HomeNamespaces.open()
    # What the factory holds now it holds for life: frozen, no collection
    # walks it, so its pages stay shared with the processes it forks.
    gc.freeze()
    cgroups_by_pid: dict[int, SandboxCgroup] = {}  # each sandbox's, by the pid forked for it
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(requests, _MAX_REQUEST, 1, socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            continue
        if not data:
            _reap(cgroups_by_pid, until_none_left=True)
            return
        spec, cgroup = pickle.loads(data)
        forked: int | None
        if spec.privileged and home is not None:
            forked = sandbox.start_privileged(spec, cgroup, fds[0], home, (requests.fileno(),))
        else:
            forked = os.fork()
            if forked == 0:
                requests.close()
                sandbox.run_outer(spec, cgroup, fds[0], factory_pid)
        for fd in fds:
            os.close(fd)
        if forked is not None and cgroup is not None:
            cgroups_by_pid[forked] = cgroup
        _reap(cgroups_by_pid, until_none_left=False)


def _reap(cgroups: dict[int, SandboxCgroup], *, until_none_left: bool) -> None:
    """Reap the sandboxes' processes that exited (or all of them), and remove their cgroups.

    When init has exited its cgroup is empty (a plain user's outer exits
    after its init): pytest has read its counters before it let init go.
    What cannot be removed is said on stderr; the session's cgroup manager
    removes it with the session's directory.
    """
    for pid in sandbox.reap_exited(wait_for_all=until_none_left):
        cgroup = cgroups.pop(pid, None)
        if cgroup is None:
            continue
        try:
            if not cgroup.remove_if_empty():
                cgroup.kill()
                cgroup.remove()
        except StepError as exc:
            print(f"nsbox: sandbox factory: {exc}", file=sys.stderr, flush=True)


# -- the pytest side -----------------------------------------------------------


@dataclass
class PreparedSandbox:
    """A built sandbox, as the pytest process holds it: descriptors of init's namespaces.

    ``setup_error`` is set instead when building it failed (the step and
    the kernel's reason, from init, outer or the factory).
    """

    spec: sandbox.SandboxSpec
    cgroup: SandboxCgroup | None
    channel: socket.socket | None
    namespaces: dict[str, int] = field(default_factory=dict)
    mounts: dict[str, int] = field(default_factory=dict)
    init_pidfd: int | None = None
    setup_error: dict[str, Any] | None = None
    factory_pid: int | None = None  # the factory process that built it
    # Init's pidfd, polled by alive(): made once, before the test is forked.
    _init_watch: select.poll | None = field(default=None, init=False, repr=False, compare=False)

    def descriptors(self) -> tuple[int, ...]:
        """Every descriptor of this sandbox that the pytest process holds."""
        own = [*self.namespaces.values(), *self.mounts.values()]
        if self.cgroup is not None:
            own.extend(self.cgroup.counter_descriptors())
        if self.channel is not None:
            own.append(self.channel.fileno())
        if self.init_pidfd is not None:
            own.append(self.init_pidfd)
        return tuple(own)

    def alive(self, wait: float = 0.0) -> bool:
        """Whether init still runs, after waiting up to ``wait`` seconds for it to exit.

        Its pidfd turns readable when it has exited.
        """
        if self.init_pidfd is None:
            return False
        if self._init_watch is None:
            self._init_watch = select.poll()
            self._init_watch.register(self.init_pidfd, select.POLLIN)
        return not self._init_watch.poll(int(wait * 1000))

    def close(self) -> None:
        """Let init go: it ends when its channel closes. Closing twice is fine."""
        for fd in (*self.namespaces.values(), *self.mounts.values()):
            os.close(fd)
        self.namespaces, self.mounts = {}, {}
        if self.cgroup is not None:
            self.cgroup.close_counters()
        if self.init_pidfd is not None:
            os.close(self.init_pidfd)
            self.init_pidfd = None
            self._init_watch = None
        if self.channel is not None:
            self.channel.close()


class PendingSandbox:
    """A sandbox asked for and not yet taken; :meth:`wait` blocks until init is ready."""

    def __init__(
        self,
        spec: sandbox.SandboxSpec,
        cgroup: SandboxCgroup | None,
        channel: socket.socket,
        factory: SandboxFactory,
    ) -> None:
        self.spec = spec
        self.cgroup = cgroup
        self.channel = channel
        self.factory = factory
        self.factory_pid = factory.pid

    def wait(self) -> PreparedSandbox:
        reader = protocol.FrameReader()
        received: list[int] = []
        frames: list[protocol.Frame] = []
        try:
            while not frames:
                data, fds, _, _ = socket.recv_fds(
                    self.channel, 1 << 16, _MAX_READY_FDS, socket.MSG_CMSG_CLOEXEC
                )
                received.extend(fds)
                if not data:
                    raise protocol.ProtocolError("the sandbox's init exited before it was ready")
                frames = reader.feed(data)
        except (OSError, protocol.ProtocolError) as exc:
            return self._failed({"step": "prepare the sandbox", "message": str(exc)}, received)
        frame = frames[0]
        if frame.kind != "ready":
            return self._failed(frame.body, received)
        names = [*frame.body["namespaces"], *frame.body["mounts"]]
        counters = received[len(names) : -1]
        wanted = 0 if self.cgroup is None else len(self.cgroup.descriptor_paths())
        if len(received) != len(names) + wanted + 1 or frame.body["counters"] != wanted:
            message = f"init sent {len(received)} descriptors for {len(names) + wanted + 1}"
            return self._failed({"step": "prepare the sandbox", "message": message}, received)
        by_name = dict(zip(names, received, strict=False))
        if self.cgroup is not None:
            self.cgroup.use_counters(counters)
        return PreparedSandbox(
            self.spec,
            self.cgroup,
            self.channel,
            namespaces={name: by_name[name] for name in frame.body["namespaces"]},
            mounts={name: by_name[name] for name in frame.body["mounts"]},
            init_pidfd=received[-1],
            factory_pid=self.factory_pid,
        )

    def _failed(self, error: dict[str, Any], received: list[int]) -> PreparedSandbox:
        """A sandbox that failed to be ready; ``received`` are descriptors to close."""
        for fd in received:
            os.close(fd)
        death = self.factory.death(self.factory_pid, settle=True)
        if death is not None:  # the factory's end is why the sandbox gave up
            error = {**error, "message": f"{error['message']}; {death}"}
        return PreparedSandbox(
            self.spec, self.cgroup, self.channel, setup_error=error, factory_pid=self.factory_pid
        )

    def discard(self) -> None:
        """Give the sandbox up unused: init sees its channel close and exits."""
        self.channel.close()


def _not_asked(spec: sandbox.SandboxSpec, exc: StepError) -> PreparedSandbox:
    """A sandbox that could not even be asked for: the step that failed, as a setup error."""
    return PreparedSandbox(spec, None, None, setup_error={"step": exc.step, "message": str(exc)})


class SandboxFactory:
    """Pytest's handle on its factory process, started on the first request."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._requests: socket.socket | None = None
        self._own_pid_namespace: int | None = None
        self._channels: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._deaths: dict[int, str] = {}  # factory pid -> how it ended

    @property
    def own_pid_namespace(self) -> int:
        """A descriptor of pytest's own pid namespace, to return to after forking a test."""
        if self._own_pid_namespace is None:
            self._own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        return self._own_pid_namespace

    def descriptors(self) -> tuple[int, ...]:
        """The descriptors a test process must not keep: the factory's and every sandbox's."""
        own = [self._requests.fileno()] if self._requests is not None else []
        if self._own_pid_namespace is not None:
            own.append(self._own_pid_namespace)
        own.extend(fd for fd in (channel.fileno() for channel in self._channels) if fd >= 0)
        return tuple(own)

    def death(self, pid: int | None, *, settle: bool = False) -> str | None:
        """How the factory process ``pid`` ended, if it did: for its sandboxes' messages.

        ``settle``, once a sandbox failed: a dying factory closes its
        descriptors (so its init sees them close, and gives up) a moment
        before its exit can be waited for; a factory whose socket has already
        hung up gets up to ``_DEATH_GRACE`` seconds to finish, so that the
        sandbox's message can name its end.
        """
        process = self._process
        if process is None or process.pid != pid:
            return self._deaths.get(pid) if pid is not None else None
        if settle and process.poll() is None and self._hung_up():
            import subprocess  # see the imports at the top

            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_DEATH_GRACE)
        if process.poll() is not None:
            status = process.returncode
            how = (
                f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            )
            self._deaths[process.pid] = f"the sandbox factory (pid {process.pid}) {how}"
        return self._deaths.get(pid)

    def _hung_up(self) -> bool:
        """Whether the factory's end of the request socket is closed (POLLHUP)."""
        if self._requests is None:
            return False
        poller = select.poll()
        poller.register(self._requests.fileno(), 0)
        return bool(poller.poll(0))

    def prepare(self, spec: sandbox.SandboxSpec, cgroup: SandboxCgroup | None) -> PendingSandbox:
        """Ask for a sandbox; it is built while the caller goes on.

        A factory that has died since the last request is replaced by a new
        one (the sandboxes it was building report its end).
        """
        if self.death(self.pid) is not None:
            self._stop()
        requests = self._started()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            socket.send_fds(requests, [pickle.dumps((spec, cgroup))], [theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise kernel.SandboxSetupError(
                "send a request to the sandbox factory",
                exc.errno or 0,
                self.death(self.pid, settle=True) or "",
            ) from None
        finally:
            theirs.close()
        self._channels.add(ours)
        return PendingSandbox(spec, cgroup, ours, self)

    def start(self) -> None:
        """Start the factory process now, ahead of the first request.

        Its interpreter's start (about 40 ms) then runs while pytest
        collects, not while the first sandbox is waited for. A factory
        that cannot start is left for the first request to meet: it tries
        again, and its test reports the step that failed.
        """
        with contextlib.suppress(StepError):
            self._started()

    @property
    def pid(self) -> int | None:
        """The running factory's process id (None before the first request)."""
        return self._process.pid if self._process is not None else None

    def _started(self) -> socket.socket:
        if self._requests is not None:
            return self._requests
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        env = {k: v for k, v in os.environ.items() if k not in _COVERAGE_ENV}
        import subprocess  # see the imports at the top

        try:
            self._process = subprocess.Popen(
                self.command(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise kernel.SandboxSetupError(
                f"start the sandbox factory ({sys.executable})", exc.errno or 0
            ) from None
        finally:
            theirs.close()
        self._requests = ours
        return ours

    def command(self, sock_fd: int) -> list[str]:
        """The factory's command line: this interpreter, serving requests on ``sock_fd``.

        -I -S: no site-packages, no user environment. The factory needs only
        the standard library and this package, and the smaller it is, the
        cheaper each fork of it. (The benchmark's layer-by-layer rows
        override this to stub a step out.)
        """
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            f"import sys; sys.path.insert(0, {package_parent!r}); "
            f"from pytest_nsbox.factory import serve; serve({sock_fd}, {os.getpid()})"
        )
        return [sys.executable, "-I", "-S", "-c", code]

    def close(self) -> None:
        """End the factory: closing its socket ends its loop. Closing twice is fine."""
        self._stop()
        if self._own_pid_namespace is not None:
            with contextlib.suppress(OSError):
                os.close(self._own_pid_namespace)
            self._own_pid_namespace = None

    def _stop(self) -> None:
        if self._requests is not None:
            self._requests.close()
            self._requests = None
        if self._process is not None:
            import subprocess  # see the imports at the top

            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


class SandboxPipeline:
    """The sandboxes on their way to the tests, as a session's loop of tests meets them.

    One sandbox is built ahead, for the test that runs next; :meth:`take`
    hands it over when it fits the test that asks (built from an equal
    spec with equal cgroup limits: the working directory or ``sys.path`` may
    have changed since, and its init must still run), else it is discarded
    and a sandbox built now. A test's cgroup is planned by ``plan_cgroup``
    (the sandbox's init makes it, the factory removes it). The pipeline
    does not own the factory.
    """

    def __init__(
        self,
        factory: SandboxFactory,
        plan_cgroup: Callable[[Limits | None], SandboxCgroup | None],
    ) -> None:
        self.factory = factory
        self._plan_cgroup = plan_cgroup
        self._next: PendingSandbox | None = None

    def take(self, spec: sandbox.SandboxSpec, limits: Limits | None) -> PreparedSandbox:
        """The sandbox for a test: the one built ahead if it fits, else one built now."""
        pending, self._next = self._next, None
        if pending is not None:
            if pending.spec == spec and (pending.cgroup and pending.cgroup.limits) == limits:
                prepared = pending.wait()
                if prepared.setup_error is not None or prepared.alive():
                    return prepared
                self.release(prepared)  # its init died meanwhile (with a factory that died?)
            else:
                pending.discard()
        try:
            return self._prepare(spec, limits).wait()
        except StepError as exc:  # the factory could not be started or asked
            return _not_asked(spec, exc)

    def prepare_next(self, spec: sandbox.SandboxSpec, limits: Limits | None) -> None:
        """Ask for the next test's sandbox; a failure is left for that test to meet."""
        try:
            self._next = self._prepare(spec, limits)
        except StepError:
            self._next = None

    def release(self, prepared: PreparedSandbox) -> None:
        """After the test: let its init go (the factory then removes its cgroup)."""
        prepared.close()

    def close(self) -> None:
        """Drop the sandbox built ahead; twice is fine."""
        if self._next is not None:
            self._next.discard()
            self._next = None

    def _prepare(self, spec: sandbox.SandboxSpec, limits: Limits | None) -> PendingSandbox:
        return self.factory.prepare(spec, self._plan_cgroup(limits))
