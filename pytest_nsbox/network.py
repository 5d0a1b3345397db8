"""The sandbox's network: a fresh network namespace whose ``lo`` is brought up.

A new network namespace has only ``lo``, and it is down. The request that
brings it up is an RTM_NEWLINK message built with pyroute2's message classes
once per session, and not in the pytest process: importing pyroute2 takes
about 170 ms and 10 MB (it brings asyncio, multiprocessing and sqlite3), and
every fork of pytest pays for its memory again, in page tables copied and
torn down. So a short-lived interpreter builds the request and prints it;
the session starts it early (:func:`start_loopback_request`) and reads it
when the first sandbox needs it, and that interpreter imports only the
message classes (:func:`helper_main`). The sandbox's init only sends those
bytes over a plain netlink socket and reads the kernel's acknowledgement,
an ``nlmsgerr``: a netlink header and a signed errno, decoded with
``struct``. Creating a full ``pyroute2.IPRoute`` in every sandbox would
cost about five times the whole network step.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING

from pytest_nsbox.kernel import SandboxSetupError

if TYPE_CHECKING:
    import subprocess  # imported in start() only: see factory's imports

LOOPBACK_INDEX = 1  # the kernel gives lo index 1 in every new network namespace
NLMSG_ERROR = 2
# struct nlmsghdr (length, type, flags, sequence, port) then nlmsgerr's int error
_ACK = struct.Struct("=IHHIIi")


def encode_loopback_up() -> bytes:
    """The encoded RTM_NEWLINK request that sets ``lo`` up (run in the helper, see above)."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

    msg = ifinfmsg()
    msg["index"] = LOOPBACK_INDEX
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 1
    msg.encode()
    return bytes(msg.data[: msg["header"]["length"]])


class LoopbackRequest:
    """The lo-up request of this process, built once by a helper interpreter."""

    def __init__(self) -> None:
        self._helper: subprocess.Popen[bytes] | None = None
        self._request: bytes | None = None

    def start(self) -> None:
        """Start building it now (in parallel with whatever pytest does next)."""
        if self._helper is None and self._request is None:
            import subprocess  # not in the factory process, which imports this module

            self._helper = subprocess.Popen(
                _helper_command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )

    def get(self) -> bytes:
        """The request's bytes, waiting for the helper the first time."""
        if self._request is None:
            self.start()
            assert self._helper is not None
            helper, self._helper = self._helper, None
            out, err = helper.communicate()
            if helper.returncode != 0 or not out:
                lines = err.decode(errors="replace").strip().splitlines()
                raise SandboxSetupError(
                    "build the lo-up request with pyroute2",
                    errno.EIO,
                    f"{' '.join(_helper_command()[:2])} exited with {helper.returncode}: "
                    + (lines[-1] if lines else "no output"),
                )
            self._request = out
        return self._request

    def discard(self) -> None:
        """End a helper whose answer nobody asked for."""
        if self._helper is not None:
            helper, self._helper = self._helper, None
            helper.kill()
            helper.communicate()


def helper_main() -> None:
    """The helper interpreter's program: write the request's bytes to stdout.

    Importing any module of pyroute2 first runs the package's
    ``__init__``, which imports all of pyroute2 (about 150 ms: asyncio,
    its NDB, sqlite3, conntrack); the request needs its netlink message
    classes only (about 50 ms). In this interpreter, which does nothing
    else, the package is registered as a bare module over its own
    directory, so that only the submodules the request uses are imported.
    The bytes are the same (tests/test_sandbox.py compares them with those
    built after a full import).
    """
    import importlib.util
    import types

    found = importlib.util.find_spec("pyroute2")
    if found is not None and found.submodule_search_locations is not None:
        package = types.ModuleType("pyroute2")
        package.__spec__ = found
        package.__path__ = list(found.submodule_search_locations)
        sys.modules["pyroute2"] = package
    sys.stdout.buffer.write(encode_loopback_up())


def _helper_command() -> list[str]:
    """This interpreter with this process's import path (-S: no site, the path is given)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [package_parent, *sys.path]
    code = (
        f"import sys; sys.path[:] = {path!r}; from pytest_nsbox.network import helper_main; "
        "helper_main()"
    )
    return [sys.executable, "-S", "-c", code]


_LOOPBACK = LoopbackRequest()


def start_loopback_request() -> None:
    """Have this process's lo-up request built in the background, ahead of its first use."""
    _LOOPBACK.start()


def loopback_up_request() -> bytes:
    """The encoded RTM_NEWLINK request that sets ``lo`` up."""
    return _LOOPBACK.get()


def discard_loopback_request() -> None:
    """End the helper if it still runs (a session that sandboxed nothing)."""
    _LOOPBACK.discard()


def bring_loopback_up(request: bytes) -> None:
    """Send the prepared request in the current network namespace and check the ack."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.sendto(request, (0, 0))
        reply = sock.recv(4096)
    except OSError as exc:
        raise SandboxSetupError("netlink RTM_NEWLINK lo up", exc.errno or errno.EIO) from None
    finally:
        sock.close()
    check_ack(reply)


def check_ack(reply: bytes) -> None:
    """Raise unless ``reply`` is the kernel's acknowledgement with error 0."""
    if len(reply) < _ACK.size:
        raise SandboxSetupError(
            "netlink RTM_NEWLINK lo up", errno.EPROTO, f"short reply of {len(reply)} bytes"
        )
    _, kind, _, _, _, error = _ACK.unpack_from(reply)
    if kind != NLMSG_ERROR:
        raise SandboxSetupError(
            "netlink RTM_NEWLINK lo up", errno.EPROTO, f"unexpected reply type {kind}"
        )
    if error != 0:
        raise SandboxSetupError("netlink RTM_NEWLINK lo up", -error)
