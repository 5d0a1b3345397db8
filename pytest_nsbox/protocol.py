"""Frames on the result pipe between a sandbox and the pytest process.

The sandboxed test writes its reports here as soon as each exists, and the
sandbox's init adds what only it can see (the test's exit status, processes
left running, the files written). The test itself could write garbage to the
pipe or close it, so every frame carries a magic tag and a length, and the
reader treats anything else as a protocol error for that one test instead of
trusting it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"NSBX"
_HEADER = struct.Struct(">4sI")
MAX_FRAME = 256 * 1024 * 1024
_DECODER = json.JSONDecoder()


class ProtocolError(Exception):
    """The byte stream on the result pipe is not a sequence of frames."""


@dataclass(frozen=True)
class Frame:
    kind: str
    body: dict[str, Any]


def encode(kind: str, body: dict[str, Any]) -> bytes:
    """One frame: header (magic, length) and a JSON payload."""
    payload = _flat_payload(kind, body)
    if payload is None:
        payload = json.dumps({"kind": kind, "body": body}, default=repr).encode()
    return _HEADER.pack(MAGIC, len(payload)) + payload


def _flat_payload(kind: str, body: dict[str, Any]) -> bytes | None:
    """The JSON of a frame whose body holds only ints, finite floats and plain words; else None.

    Formatted, not encoded: the frames sent most are of this kind (a plain
    report, a plain user's exit status), sent by processes just forked, for
    which the JSON encoder's first use costs more copied pages than the
    frame has bytes. ``repr`` of an int or a finite float is its JSON.
    """
    fields = []
    for key, value in body.items():
        if type(value) is int or (type(value) is float and math.isfinite(value)):
            text = b"%r" % value
        elif type(value) is str and value.isascii() and value.isidentifier():
            text = b'"%s"' % value.encode()
        else:
            return None
        if not (key.isascii() and key.isidentifier()):
            return None
        fields.append(b'"%s": %s' % (key.encode(), text))
    return b'{"kind": "%s", "body": {%s}}' % (kind.encode(), b", ".join(fields))


def send(fd: int, kind: str, body: dict[str, Any]) -> None:
    """Write one frame completely (a pipe may take it in several writes)."""
    view = memoryview(encode(kind, body))
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Reassembles frames from the chunks read off the pipe."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Frame]:
        self._buffer += chunk
        frames = []
        while len(self._buffer) >= _HEADER.size:
            magic, length = _HEADER.unpack_from(self._buffer)
            if magic != MAGIC or length > MAX_FRAME:
                raise ProtocolError(
                    f"unexpected bytes on the result pipe: {bytes(self._buffer[:16])!r}"
                )
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(_decode(bytes(self._buffer[_HEADER.size : end])))
            del self._buffer[:end]
        return frames

    def finish(self) -> None:
        """At end of stream: a partial frame left over is a protocol error."""
        if self._buffer:
            raise ProtocolError(
                f"result pipe closed in the middle of a frame ({len(self._buffer)} bytes left)"
            )


def _decode(payload: bytes) -> Frame:
    """One frame's payload: a JSON object, nothing before or after it.

    Decoded with ``raw_decode``, not ``json.loads``: the pytest process
    decodes every frame just after a fork, and ``loads``' encoding
    detection and whitespace regexes cost it about 20 page faults per test.
    """
    try:
        text = payload.decode()
        data, end = _DECODER.raw_decode(text)
        if end != len(text):
            raise ValueError(f"extra data at char {end}")
        return Frame(str(data["kind"]), dict(data["body"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"a frame on the result pipe is not valid: {exc}") from None
