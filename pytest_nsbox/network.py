"""The sandbox's network: a fresh network namespace whose ``lo`` is brought up.

A new network namespace has only ``lo``, and it is down. The request that
brings it up is an RTM_NEWLINK message built with pyroute2's message classes
once, in the pytest process (they compile lazily, so building them per test
would cost milliseconds); the sandbox's init only sends those bytes over a
plain netlink socket and reads the kernel's acknowledgement, an
``nlmsgerr``: a netlink header and a signed errno. Decoding that needs only
``struct``, so the sandbox factory (:mod:`pytest_nsbox.factory`) does not
import pyroute2 at all. Creating a full ``pyroute2.IPRoute`` in every
sandbox costs about five times as much.
"""

from __future__ import annotations

import errno
import socket
import struct
from functools import lru_cache

from pytest_nsbox.kernel import SandboxSetupError

LOOPBACK_INDEX = 1  # the kernel gives lo index 1 in every new network namespace
NLMSG_ERROR = 2
# struct nlmsghdr (length, type, flags, sequence, port) then nlmsgerr's int error
_ACK = struct.Struct("=IHHIIi")


@lru_cache(maxsize=1)
def loopback_up_request() -> bytes:
    """The encoded RTM_NEWLINK request that sets ``lo`` up."""
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
