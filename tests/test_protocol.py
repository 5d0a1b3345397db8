"""Frames on the result pipe: round trips, garbage, truncation."""

from __future__ import annotations

import os

import pytest

from pytest_nsbox import protocol


def test_round_trip_in_pieces() -> None:
    data = protocol.encode("report", {"when": "call", "text": "x" * 100_000}) + protocol.encode(
        "exit", {"status": 0}
    )
    reader = protocol.FrameReader()
    frames = []
    for start in range(0, len(data), 777):
        frames.extend(reader.feed(data[start : start + 777]))
    reader.finish()
    assert [f.kind for f in frames] == ["report", "exit"]
    assert frames[0].body["text"] == "x" * 100_000


def test_send_writes_whole_frames_through_a_pipe() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        protocol.send(write_end, "big", {"blob": "y" * 300_000})
        os._exit(0)
    os.close(write_end)
    reader = protocol.FrameReader()
    frames = []
    while chunk := os.read(read_end, 65536):
        frames.extend(reader.feed(chunk))
    os.waitpid(pid, 0)
    os.close(read_end)
    assert len(frames) == 1 and len(frames[0].body["blob"]) == 300_000


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(protocol.ProtocolError, match="unexpected bytes"):
        protocol.FrameReader().feed(b"hello, parent! " * 4)


def test_truncated_frame_is_a_protocol_error() -> None:
    reader = protocol.FrameReader()
    assert reader.feed(protocol.encode("exit", {"status": 0})[:-3]) == []
    with pytest.raises(protocol.ProtocolError, match="in the middle of a frame"):
        reader.finish()


@pytest.mark.parametrize(
    "payload",
    [
        b"{oops",
        b' {"kind": "exit", "body": {}}',  # before the object
        b'{"kind": "exit", "body": {}} ',  # after it
        b'{"kind": "exit", "body": {}}{}',
        b'{"kind": "exit", "body": {"status": "\xff"}}',  # not UTF-8
        b'["exit", {}]',
        b'{"kind": "exit", "body": 3}',
    ],
)
def test_frame_with_valid_header_but_bad_json(payload: bytes) -> None:
    bad = b"NSBX" + len(payload).to_bytes(4, "big") + payload
    with pytest.raises(protocol.ProtocolError, match="not valid"):
        protocol.FrameReader().feed(bad)


FLAT_BODIES = [
    {"status": 0},
    {"status": -9},
    {"when": "teardown", "duration": 1e-05, "start": 1764590000.123456, "stop": -0.0},
    {"big": 10**30, "small": 5e-324, "huge": 1.7976931348623157e308},
    {},
]
OTHER_BODIES = [
    {"ok": True},
    {"value": float("nan")},
    {"text": 'a "quoted" word'},
    {"text": "naïve"},
    {"nested": {"a": [1, 2]}},
    {"bad key": 1},
]


@pytest.mark.parametrize("body", FLAT_BODIES)
def test_flat_bodies_are_formatted_as_json_without_the_encoder(
    body: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_encoder(*args: object, **kwargs: object) -> str:
        raise AssertionError("the JSON encoder was used")

    monkeypatch.setattr(protocol.json, "dumps", no_encoder)
    (frame,) = protocol.FrameReader().feed(protocol.encode("plain_report", body))
    assert frame == protocol.Frame("plain_report", body)
    assert [type(v) for v in frame.body.values()] == [type(v) for v in body.values()]


@pytest.mark.parametrize("body", OTHER_BODIES, ids=repr)
def test_other_bodies_take_the_encoder(body: dict[str, object]) -> None:
    (frame,) = protocol.FrameReader().feed(protocol.encode("report", body))
    assert frame.kind == "report"
    assert repr(frame.body) == repr(body)  # repr: nan is not equal to itself
