"""A whole call over real loopback sockets: relay, session set-up, barge-in, endings."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest
from aiohttp import WSCloseCode

from server.testing.inbox import wait_until
from server.testing.standin import StandinOptions
from tests.conftest import API_KEY, SILENCE, MakeRig, Rig, heard, loud, speak

WAIT = 10.0  # a bound for events that come at once; never a timing claim (that is the bench's)


async def test_session_update_is_ga_and_first(rig: Rig) -> None:
    stream, session = await rig.place()
    assert session.received[0]["type"] == "session.update"
    assert "OpenAI-Beta" not in session.headers
    assert session.headers["Authorization"] == f"Bearer {API_KEY}"
    assert session.model == "gpt-realtime"
    update = session.received[0]["session"]
    assert update["type"] == "realtime"
    assert update["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert update["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "alloy"}
    detection = update["audio"]["input"]["turn_detection"]
    assert detection["type"] == "server_vad" and detection["interrupt_response"] is True
    assert "temperature" not in update and "voice" not in update
    assert "+15550001111" in update["instructions"]  # {{caller}} filled from the call
    await stream.send_media(SILENCE)
    await session.wait_for("input_audio_buffer.append")
    assert session.received[1]["type"] == "input_audio_buffer.append"
    # The service accepted the update whole (an unknown key would have rejected all of it).
    assert session.session["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert session.session["audio"]["input"]["format"] == {"type": "audio/pcmu"}


async def test_audio_relayed_both_ways_with_marks(rig: Rig) -> None:
    stream, session = await rig.place()
    spoken = await speak(stream, frames=10)
    await session.wait_for("input_audio_buffer.append", count=18)
    appended = b"".join(base64.b64decode(e["audio"]) for e in session.received
                        if e["type"] == "input_audio_buffer.append")
    assert appended == spoken * 10 + SILENCE * 8  # every frame, in order, untouched
    # The echo assistant answers with the caller's own audio: 200 ms = 1600 bytes.
    done = await stream.wait_for("mark", count=2)
    assert done["mark"]["name"]
    media = [m for m in stream.received if m["event"] == "media"]
    assert heard(stream) == spoken * 10  # the turn, relayed back byte for byte
    assert len(media) >= 2
    # After every media frame comes a mark naming how far playback has got.
    kinds = [m["event"] for m in stream.received]
    assert kinds[:4] == ["media", "mark", "media", "mark"]
    assert stream.violations == []


async def test_barge_in_clears_and_truncates_at_heard_audio(rig: Rig) -> None:
    stream, session = await rig.place()
    await speak(stream, frames=50)  # 1 s of speech -> 1 s echo in 100 ms deltas
    await session.wait_for("input_audio_buffer.append", count=58)
    tenth = await stream.wait_for("mark", count=10)
    marks = [m["mark"]["name"] for m in stream.received if m["event"] == "mark"]
    # Twilio has played the first three deltas (300 ms) ...
    for name in marks[:3]:
        await stream.send_mark(name)
    await stream.send_media(SILENCE)  # ordered after the marks: proves they were read
    await session.wait_for("input_audio_buffer.append", count=59)
    # ... when the caller starts talking.
    await session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1500,
                        "item_id": "item_caller2"})
    clear = await stream.wait_for("clear")
    assert clear == {"event": "clear", "streamSid": stream.stream_sid}
    truncate = await session.wait_for("conversation.item.truncate")
    assert truncate["audio_end_ms"] == 300
    assert truncate["content_index"] == 0
    assert truncate["item_id"].startswith("item_")
    assert tenth
    # Twilio echoes every cleared mark at once; they must not count as heard audio.
    for name in marks[3:]:
        await stream.send_mark(name)
    await stream.send_media(SILENCE)
    await session.wait_for("input_audio_buffer.append", count=60)
    await session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1600,
                        "item_id": "item_caller3"})
    await stream.send_media(SILENCE)
    await session.wait_for("input_audio_buffer.append", count=61)
    await session.send({"type": "rate_limits.updated", "rate_limits": []})
    # Nothing is playing now: no second clear, no second truncate.
    assert sum(1 for m in stream.received if m["event"] == "clear") == 1
    assert sum(1 for e in session.received if e["type"] == "conversation.item.truncate") == 1
    assert not any(e.get("type") == "error" for e in session.received)


async def test_barge_in_end_to_end_with_server_vad(make_rig: MakeRig) -> None:
    # The stand-in streams in real time, so the reply is still being generated when the
    # caller talks over it: the service cancels it and the bridge cuts playback.
    rig = await make_rig(StandinOptions(api_key=API_KEY, pace=1.0, chunk_ms=20))
    stream, session = await rig.place()
    await speak(stream, frames=40)
    await stream.wait_for("mark", count=3)
    await stream.send_mark(
        [m["mark"]["name"] for m in stream.received if m["event"] == "mark"][1])
    await speak(stream, frames=5, variant=3, silence=0)  # caller talks over the reply
    await stream.wait_for("clear")
    truncate = await session.wait_for("conversation.item.truncate")
    assert truncate["audio_end_ms"] == 240  # two marks, 120 ms of audio each, were heard
    # No error from the service: the truncation was within the generated audio.
    assert not [e for e in session.received if e["type"] == "error"]


async def test_concurrent_calls_do_not_mix_audio(rig: Rig) -> None:
    calls = [await rig.place() for _ in range(4)]
    for i, (stream, _) in enumerate(calls):
        await speak(stream, frames=6, variant=i + 1)
    for stream, _ in calls:
        await stream.wait_for("mark", count=1)
    for i, (stream, _) in enumerate(calls):
        audio = heard(stream)
        assert loud(i + 1) in audio
        for j in range(4):
            if j != i:
                assert loud(j + 1) not in audio


async def test_stop_closes_openai(rig: Rig) -> None:
    stream, session = await rig.place()
    await stream.send_stop()
    await asyncio.wait_for(session.closed.wait(), WAIT)
    await asyncio.wait_for(stream.closed.wait(), WAIT)


async def test_twilio_socket_drop_closes_openai(rig: Rig) -> None:
    stream, session = await rig.place()
    await stream.close()
    await asyncio.wait_for(session.closed.wait(), WAIT)


async def test_nothing_left_running_after_a_call(rig: Rig) -> None:
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    await speak(stream, frames=3)
    await stream.wait_for("mark")
    tasks = call.tasks
    assert {t.get_name() for t in tasks} >= {"relay-twilio", "relay-model", "watchdog"}
    await stream.send_stop()
    await asyncio.wait_for(call.finished.wait(), WAIT)
    assert all(t.done() for t in tasks) and call.tasks == ()
    assert call.sockets_closed
    assert call.ending is not None and call.ending.kind == "caller_hung_up"
    assert call.ending.reason == "Twilio stopped the stream (call over)"
    await asyncio.wait_for(session.closed.wait(), WAIT)
    assert not set(tasks) & asyncio.all_tasks()
    assert rig.live_calls() == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (StandinOptions(api_key="another-key"), "HTTP 401 (check OPENAI_API_KEY)"),
        (StandinOptions(handshake_status=503), "HTTP 503 (OpenAI unavailable)"),
        (StandinOptions(handshake_delay=5.0), "did not accept the session within 0.3 s"),
    ],
)
async def test_openai_refusal_ends_the_stream(
    make_rig: MakeRig, options: StandinOptions, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(options, openai_connect_timeout=0.3)
    url, params = await rig.webhook("CA" + "3" * 32)
    stream = await rig.open_stream(url)
    await stream.send_connected()
    await stream.send_start(call_sid="CA" + "3" * 32, stream_sid="MZ" + "3" * 32,
                            custom_parameters=params)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    ended = [r for r in caplog.records if r.getMessage().startswith("call ended")]
    assert len(ended) == 1 and expected in ended[0].getMessage()
    assert ended[0].levelno == logging.ERROR
    assert ended[0].__dict__["call_sid"] == "CA" + "3" * 32
    assert API_KEY not in caplog.text and "another-key" not in caplog.text


async def test_openai_drop_ends_the_stream(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(reconnect_attempts=0)
    stream, session = await rig.place()
    await session.close(code=1011)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.INTERNAL_ERROR
    assert "OpenAI closed the session (code 1011)" in caplog.text


async def test_fatal_openai_error_ends_the_stream(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    stream, session = await rig.place()
    await session.send({"type": "error", "error": {
        "type": "invalid_request_error", "code": "insufficient_quota",
        "message": "You exceeded your current quota."}})
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    await asyncio.wait_for(session.closed.wait(), WAIT)
    assert "OpenAI error insufficient_quota" in caplog.text


async def test_recoverable_openai_error_keeps_the_call(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    stream, session = await rig.place()
    await session.send({"type": "error", "error": {"type": "invalid_request_error",
                                                    "code": "invalid_value", "message": "meh"}})
    await speak(stream, frames=4)
    await stream.wait_for("mark")
    assert not stream.closed.is_set()
    assert "OpenAI error invalid_value: meh" in caplog.text


async def test_configured_events_logged_with_call_ids(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stream, session = await rig.place()
    await speak(stream, frames=4)
    await stream.wait_for("mark")
    await session.wait_for("input_audio_buffer.append", count=12)
    lines = [r for r in caplog.records if r.getMessage().startswith("openai ")]
    kinds = {r.getMessage().split()[1] for r in lines}
    assert {"session.created", "session.updated"} <= kinds
    assert "response.output_audio.delta" not in kinds
    assert all(getattr(r, "call_sid", "").startswith("CA") for r in lines)
    # The session was opened at the webhook (pre-warmed), before the stream had an id: from
    # the stream's start on, its lines carry that id too.
    later = [r for r in lines if r.getMessage().split()[1] not in ("session.created",
                                                                  "session.updated")]
    assert later and all(getattr(r, "stream_sid", "").startswith("MZ") for r in later)


async def test_odd_shaped_openai_events_do_not_break_the_call(rig: Rig) -> None:
    stream, session = await rig.place()
    for event in ({"type": "response.created", "response": "x"},
                  {"type": "response.done", "response": {"usage": 5}},
                  {"type": "rate_limits.updated", "rate_limits": 3},
                  {"type": "session.updated", "session": []},
                  {"type": "error", "error": "x"},
                  {"type": "something.new"}):
        await session.send(event, check=False)  # deliberately not what the SDK accepts
    await speak(stream, frames=4, variant=6)
    await stream.wait_for("mark")
    assert loud(6) in heard(stream)
    assert not stream.closed.is_set()


async def test_malformed_openai_frame_ends_the_call(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    stream, session = await rig.place()
    await session.send({"type": "response.output_audio.delta", "delta": "AAAA"},  # no item_id
                       check=False)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.INTERNAL_ERROR
    assert "malformed event from OpenAI: audio delta without" in caplog.text
    await asyncio.wait_for(session.closed.wait(), WAIT)


async def test_long_deltas_are_marked_every_120_ms(make_rig: MakeRig) -> None:
    # A service that sends 500 ms deltas: truncation must still be precise to 120 ms.
    rig = await make_rig(StandinOptions(api_key=API_KEY, chunk_ms=500))
    stream, session = await rig.place()
    await speak(stream, frames=25)  # 500 ms of speech -> one 500 ms delta back
    await stream.wait_for("mark", count=5)
    sizes = [len(base64.b64decode(m["media"]["payload"])) for m in stream.received
             if m["event"] == "media"]
    assert sizes == [960, 960, 960, 960, 160]
    marks = [m["mark"]["name"] for m in stream.received if m["event"] == "mark"]
    await stream.send_mark(marks[1])  # 240 ms played
    await stream.send_media(SILENCE)
    await session.wait_for("input_audio_buffer.append", count=34)
    await session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 700,
                        "item_id": "item_u"})
    assert (await session.wait_for("conversation.item.truncate"))["audio_end_ms"] == 240


async def test_idle_stream_is_ended_by_the_watchdog(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(stream_idle_timeout=1.0)
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    await speak(stream, frames=2)  # frames keep it alive ...
    await stream.wait_for("mark")
    await asyncio.wait_for(stream.closed.wait(), WAIT)  # ... silence does not
    assert stream.close_code == WSCloseCode.GOING_AWAY
    assert call.ending is not None and call.ending.kind == "idle"
    assert "no frames from Twilio for 1 s" in caplog.text
    await asyncio.wait_for(session.closed.wait(), WAIT)


async def test_half_open_openai_socket_ends_the_call(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    # The service stops answering pings (a dead peer behind a NAT, say): without a heartbeat
    # the caller would sit in silence until they hang up.
    rig = await make_rig(StandinOptions(api_key=API_KEY, answer_pings=False),
                         openai_heartbeat=0.2, reconnect_attempts=0)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.INTERNAL_ERROR
    assert call.ending is not None and call.ending.kind == "openai_error"
    assert call.ending.decision is None  # Twilio speaks the fallback
    assert "call ended: OpenAI" in caplog.text


async def test_session_not_in_pcmu_ends_the_call(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    stream, session = await rig.place()
    await session.send({"type": "session.updated", "session": {
        "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                      "output": {"format": {"type": "audio/pcmu"}}}}},
                       check=False)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.INTERNAL_ERROR
    assert "OpenAI session is not in audio/pcmu" in caplog.text


async def test_late_audio_of_an_interrupted_response_is_dropped(rig: Rig) -> None:
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    base = {"type": "response.output_audio.delta", "response_id": "resp_x", "item_id": "item_x",
            "output_index": 0, "content_index": 0}
    await session.send({"type": "response.created", "response": {
        "id": "resp_x", "object": "realtime.response", "status": "in_progress", "output": []}})
    first = base64.b64encode(loud(1)).decode()
    await session.send({**base, "delta": first})
    await stream.wait_for("media")
    await session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0,
                        "item_id": "item_u"})
    await stream.wait_for("clear")
    # The service's cancellation is still in flight: its audio must not reach the caller.
    await session.send({**base, "delta": base64.b64encode(loud(2)).decode()})
    await session.send({"type": "response.done", "response": {
        "id": "resp_x", "object": "realtime.response", "status": "cancelled",
        "status_details": {"type": "cancelled", "reason": "turn_detected"}, "output": []}})
    await speak(stream, frames=4, variant=3)  # the next reply still plays
    await stream.wait_for("media", count=2)
    audio = heard(stream)
    assert loud(1) in audio and loud(2) not in audio and loud(3) in audio
    # 20 ms frames relayed: what the caller heard, not the dropped delta
    await wait_until(lambda: len(heard(stream)) >= 160 * call.record.frames_out, WAIT,
                     "every frame counted reached the caller")
    assert call.record.frames_out == len(heard(stream)) // 160


async def test_caller_numbers_are_masked_unless_log_pii(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig = await make_rig()
    stream, _ = await rig.place()
    await stream.send_stop()
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert "+1555***1111" in caplog.text and "+15550001111" not in caplog.text
    caplog.clear()
    rig = await make_rig(log_pii=True)
    stream, _ = await rig.place()
    await stream.send_stop()
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert "caller=+15550001111" in caplog.text


async def test_caller_gone_while_audio_flows_is_a_hang_up(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    # The model is talking (a frame every 20 ms) when the caller's socket goes away.
    rig = await make_rig(StandinOptions(api_key=API_KEY, reply="stream"))
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    await stream.wait_for("media", count=3)
    await stream.close()
    await asyncio.wait_for(call.finished.wait(), WAIT)
    assert call.ending is not None and call.ending.kind == "caller_hung_up"
    assert call.ending.level == logging.INFO
    assert "socket lost" not in caplog.text
    await session.stop_streaming()
