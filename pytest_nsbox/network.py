"""The sandbox's network: a fresh network namespace whose ``lo`` is brought up.

A new network namespace has only ``lo``, and it is down. The request that
brings it up is an RTM_NEWLINK message built with pyroute2's message classes
once, in the parent (they compile lazily, so building them per test would cost
milliseconds); the forked child only sends those bytes over a plain netlink
socket and decodes the kernel's acknowledgement. Creating a full
``pyroute2.IPRoute`` in every child costs about five times as much.
"""

from __future__ import annotations

import errno
import socket
from functools import lru_cache

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, nlmsgerr
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

from pytest_nsbox.kernel import SandboxSetupError

LOOPBACK_INDEX = 1  # the kernel gives lo index 1 in every new network namespace


@lru_cache(maxsize=1)
def loopback_up_request() -> bytes:
    """The encoded RTM_NEWLINK request that sets ``lo`` up."""
    msg = ifinfmsg()
    msg["index"] = LOOPBACK_INDEX
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 1
    msg.encode()
    # Warm the decoder too: the child must not pay for its lazy compilation.
    sample = nlmsgerr()
    sample["header"]["type"] = NLMSG_ERROR
    sample["error"] = 0
    sample.encode()
    nlmsgerr(bytes(sample.data)).decode()
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
    ack = nlmsgerr(reply)
    ack.decode()
    if ack["header"]["type"] != NLMSG_ERROR:
        raise SandboxSetupError(
            "netlink RTM_NEWLINK lo up",
            errno.EPROTO,
            f"unexpected reply type {ack['header']['type']}",
        )
    if ack["error"] != 0:
        raise SandboxSetupError("netlink RTM_NEWLINK lo up", -ack["error"])
