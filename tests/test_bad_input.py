"""Bad input ends that one call with a clear log line; the server and other calls go on."""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest
from aiohttp import WSCloseCode

from server.testing.standin import STANDIN_SESSIONS
from tests.conftest import MakeRig, Rig, heard, loud, speak

MEDIA = {"event": "media", "streamSid": "MZx", "media": {"track": "inbound", "chunk": "1",
                                                          "timestamp": "0", "payload": "AAAA"}}


def frame(**changes: object) -> bytes:
    return orjson.dumps({**MEDIA, **changes})


BAD_FRAMES = [
    pytest.param(b"not json at all", "frame is not JSON", id="non-json"),
    pytest.param(b"[1, 2, 3]", "frame is not a JSON object", id="not-object"),
    pytest.param(frame(media={"track": "inbound"}), "media event without media.payload",
                 id="missing-payload"),
    pytest.param(frame(media="x"), "media event without media.payload", id="media-not-object"),
    pytest.param(frame(media={"payload": 12}), "media payload is not a string", id="number"),
    pytest.param(frame(event="mark", mark={}), "mark event without mark.name", id="bad-mark"),
    pytest.param(frame(event="dtmf", dtmf={"digit": "12"}),
                 "dtmf event without a one-character dtmf.digit", id="bad-dtmf"),
    pytest.param(frame(event="start", start={"streamSid": "MZ", "callSid": "CA"}),
                 None, id="repeated-start-is-ignored"),
    pytest.param(frame(event="start", start={"streamSid": "MZ", "callSid": "CA",
                                             "mediaFormat": {"encoding": "audio/l16"}}),
                 "unsupported media encoding 'audio/l16'", id="bad-media-format"),
]


async def assert_healthy(rig: Rig, variant: int) -> None:
    """A fresh call on the same server still relays its own audio."""
    stream, _ = await rig.place()
    await speak(stream, frames=4, variant=variant)
    await stream.wait_for("mark")
    assert loud(variant) in heard(stream)


@pytest.mark.parametrize(("raw", "reason"), BAD_FRAMES)
async def test_bad_frame_mid_call(rig: Rig, raw: bytes, reason: str | None,
                                  caplog: pytest.LogCaptureFixture) -> None:
    other, other_session = await rig.place()
    stream, session = await rig.place()
    await stream.send_raw(raw.decode())
    if reason is None:  # harmless: the call goes on
        await speak(stream, frames=4, variant=8)
        await stream.wait_for("mark")
        assert loud(8) in heard(stream)
        return
    await asyncio.wait_for(stream.closed.wait(), 2.0)
    assert stream.close_code == WSCloseCode.POLICY_VIOLATION
    await asyncio.wait_for(session.closed.wait(), 1.0)
    assert f"bad frame from Twilio: {reason}" in caplog.text
    # The neighbour was not touched.
    assert not other.closed.is_set() and not other_session.closed.is_set()
    await speak(other, frames=4, variant=7)
    await other.wait_for("mark")
    assert loud(7) in heard(other)


async def test_binary_frame(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    stream, session = await rig.place()
    await stream.send_raw(b"\x00\x01binary")
    await asyncio.wait_for(stream.closed.wait(), 2.0)
    assert stream.close_code == WSCloseCode.POLICY_VIOLATION
    assert "binary frame (Twilio sends only text)" in caplog.text
    await asyncio.wait_for(session.closed.wait(), 1.0)


async def test_oversized_frame(rig: Rig) -> None:
    stream, session = await rig.place()
    payload = base64.b64encode(bytes(200_000)).decode()
    await stream.send_raw(orjson.dumps({**MEDIA, "media": {"payload": payload}}).decode())
    await asyncio.wait_for(stream.closed.wait(), 2.0)
    assert stream.close_code == WSCloseCode.MESSAGE_TOO_BIG
    await asyncio.wait_for(session.closed.wait(), 1.0)
    assert session.audio_bytes_received == 0
    await assert_healthy(rig, 2)


@pytest.mark.parametrize("payload", ["not base64!", '", "x": "y'])
async def test_bad_base64_is_refused_by_openai_and_the_call_goes_on(
    rig: Rig, payload: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Payloads are not checked per frame (see twilio_protocol.Media): OpenAI rejects that one
    append with a recoverable error, which is logged; the JSON is re-encoded, never spliced."""
    stream, session = await rig.place()
    await stream.send_raw(frame(media={"payload": payload}).decode())
    append = await session.wait_for("input_audio_buffer.append")
    assert append["audio"] == payload and set(append) <= {"type", "audio", "event_id"}
    await speak(stream, frames=4, variant=2)
    await stream.wait_for("mark")
    assert loud(2) in heard(stream)
    assert "OpenAI error invalid_value: audio is not valid base64" in caplog.text


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (MEDIA, "media before 'start'"),
        ({"event": "start", "start": {"callSid": "CA1"}}, "without a streamSid"),
        ({"event": "start", "streamSid": "MZ1", "start": {"streamSid": "MZ1"}},
         "without a callSid"),
        ({"event": "start", "start": "nope"}, "without a start object"),
    ],
)
async def test_bad_stream_opening_never_reaches_openai(
    make_rig: MakeRig, first: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(prewarm=False)  # the stream's own doing: no session from the webhook
    url, _ = await rig.webhook("CA" + "5" * 32)
    stream = await rig.open_stream(url)
    await stream.send_connected()
    await stream.send_raw(orjson.dumps(first).decode())
    await asyncio.wait_for(stream.closed.wait(), 2.0)
    assert stream.close_code == WSCloseCode.POLICY_VIOLATION
    assert reason in caplog.text
    await assert_healthy(rig, 3)
    assert len(rig.standin.app[STANDIN_SESSIONS]) == 1  # only the healthy call's


async def test_unknown_events_are_ignored(rig: Rig) -> None:
    stream, _ = await rig.place()
    await stream.send_raw(orjson.dumps({"event": "something-new", "x": 1}).decode())
    await speak(stream, frames=4, variant=4)
    await stream.wait_for("mark")
    assert not stream.closed.is_set()


async def test_no_start_in_time(make_rig: MakeRig) -> None:
    rig = await make_rig(stream_start_timeout=0.2)
    url, _ = await rig.webhook("CA" + "6" * 32)
    stream = await rig.open_stream(url)
    await stream.send_connected()
    await asyncio.wait_for(stream.closed.wait(), 2.0)
    assert stream.close_code == WSCloseCode.POLICY_VIOLATION
