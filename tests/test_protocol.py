"""What we put on each wire: the GA session.update, and Twilio's outbound frames and TwiML."""

from __future__ import annotations

import logging
from dataclasses import replace

import orjson

from server.logs import JsonFormatter, TextFormatter
from server.models import events as ev
from server.prompts import Prompt
from server.settings import Settings
from server.wire import realtime as oai
from server.wire import twilio as tw
from server.wire.realtime import SESSION_UPDATE_ID, realtime_url, session_update
from server.wire.twilio import (
    busy_twiml,
    clear_frame,
    connect_twiml,
    mark_frame,
    media_frame,
)

BASE = Settings(openai_api_key="sk-abcdef123456", openai_model="gpt-realtime-mini")


def update(settings: Settings, fields: dict[str, object]) -> dict[str, object]:
    event = orjson.loads(session_update(settings, fields))
    assert event["type"] == "session.update" and event["event_id"] == SESSION_UPDATE_ID
    session: dict[str, object] = event["session"]
    return session


def test_ga_session_update_defaults() -> None:
    session = update(BASE, {"instructions": "Be kind."})
    assert session == {
        "type": "realtime",
        "model": "gpt-realtime-mini",
        "output_modalities": ["audio"],
        "instructions": "Be kind.",
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {
                "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                "silence_duration_ms": 500, "create_response": True,
                "interrupt_response": True},
                "transcription": {"model": "gpt-4o-mini-transcribe"}},
            "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"},
        },
    }


def test_semantic_vad_noise_reduction_transcription() -> None:
    settings = replace(BASE, turn_detection="semantic_vad", vad_eagerness="low",
                       noise_reduction="near_field", transcription_model="gpt-4o-mini-transcribe",
                       voice="marin")
    audio = update(settings, {})["audio"]
    assert isinstance(audio, dict)
    assert audio["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "low",
                                                "create_response": True,
                                                "interrupt_response": True}
    assert audio["input"]["noise_reduction"] == {"type": "near_field"}
    assert audio["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert audio["output"]["voice"] == "marin"


def test_hosted_prompt_replaces_instructions() -> None:
    prompt = Prompt("pmpt_123", "4", "OpenAI hosted prompt", hosted=True)
    session = update(BASE, prompt.session_fields({"caller": "+1"}))
    assert session["prompt"] == {"id": "pmpt_123", "version": "4"}
    assert "instructions" not in session


def is_fatal(event: dict[str, object]) -> bool:
    decoded = oai.decode(orjson.dumps(event))
    assert isinstance(decoded, ev.ModelError)
    return decoded.fatal


def test_url_and_fatal_errors() -> None:
    assert realtime_url(BASE) == "wss://api.openai.com/v1/realtime?model=gpt-realtime-mini"
    assert is_fatal({"type": "error", "error": {"code": "session_expired"}})
    assert is_fatal({"type": "error", "error": {"code": "x", "event_id": SESSION_UPDATE_ID}})
    assert not is_fatal({"type": "error", "error": {"code": "invalid_value"}})
    assert not is_fatal({"type": "error"})


def test_openai_events_decode_to_types() -> None:
    def dec(event: dict[str, object]) -> oai.RealtimeEvent:
        return oai.decode(orjson.dumps(event))

    delta = dec({"type": "response.output_audio.delta", "response_id": "r", "item_id": "i",
                 "delta": "AAAA"})
    assert isinstance(delta, ev.AudioDelta) and delta.delta == "AAAA"
    assert dec({"type": "session.updated", "session": {"audio": {
        "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcm"}}
    }}}) == oai.SessionUpdated("audio/pcmu", "audio/pcm")
    done = dec({"type": "response.done", "response": {"id": "r2", "status": "completed",
                "output": [{"type": "function_call", "id": "it", "call_id": "c1", "name": "f",
                            "arguments": "{}"}, {"type": "message"}],
                "usage": {"input_tokens": 3}}})
    assert isinstance(done, ev.ResponseDone)
    assert done.function_calls == (ev.FunctionCall("c1", "f", "{}", "r2", "it"),)
    assert done.usage == {"input_tokens": 3}
    assert dec({"type": "brand.new", "x": 1}) == ev.Other("brand.new", "x=1")
    for bad in (b"nope", b"[]", b'{"type": 3}',
                b'{"type": "response.output_audio.delta", "delta": 1, "item_id": "i"}'):
        try:
            oai.decode(bad)
        except oai.OpenAIProtocolError:
            continue
        raise AssertionError(f"{bad!r} decoded")


def test_twilio_frames_decode_to_types() -> None:
    def dec(frame: dict[str, object]) -> tw.TwilioEvent:
        return tw.decode(orjson.dumps(frame))

    media = dec({"event": "media", "media": {"payload": "AAAA"}})
    assert media == "AAAA"  # a tw.Media is the payload itself
    assert dec({"event": "mark", "mark": {"name": "7"}}) == tw.Mark("7")
    assert dec({"event": "dtmf", "dtmf": {"digit": "5"}}) == tw.Dtmf("5")
    assert dec({"event": "stop"}) == tw.Stop()
    assert dec({"event": "what"}) == tw.Unknown("what")
    start = dec({"event": "start", "start": {"streamSid": "MZ", "callSid": "CA",
                                             "customParameters": {"a": 1}}})
    assert start == tw.Start("MZ", "CA", "", {"a": "1"})


def test_twilio_frames_have_exactly_the_accepted_keys() -> None:
    assert orjson.loads(media_frame("MZ1", "AAAA")) == {
        "event": "media", "streamSid": "MZ1", "media": {"payload": "AAAA"}}
    assert orjson.loads(mark_frame("MZ1", "7")) == {
        "event": "mark", "streamSid": "MZ1", "mark": {"name": "7"}}
    assert orjson.loads(clear_frame("MZ1")) == {"event": "clear", "streamSid": "MZ1"}


def test_twiml_escapes_and_caps_parameters() -> None:
    xml = connect_twiml("wss://h/media-stream", {"caller": '<"&>', "long": "x" * 900},
                        "https://h/connect-action")
    assert "&lt;&quot;&amp;&gt;" in xml
    assert "x" * 500 in xml and "x" * 501 not in xml
    assert '<Connect action="https://h/connect-action" method="POST">' in xml
    assert "<Say" not in xml  # what follows the stream is decided per call, by the action
    assert "<Hangup" in busy_twiml("busy")


def test_decisions_become_twiml() -> None:
    assert tw.decision_twiml(tw.HANGUP).endswith("<Response><Hangup /></Response>")
    dial = tw.decision_twiml(tw.dial("+15550001111"))
    assert "<Dial timeout=\"20\"><Number>+15550001111</Number></Dial><Hangup />" in dial
    sip = tw.decision_twiml(tw.dial("sip:desk@example.com"))
    assert "<Sip>sip:desk@example.com</Sip>" in sip
    assert "<Say>Sorry</Say><Hangup />" in tw.decision_twiml(tw.say("Sorry"))
    assert tw.Decision.from_dict(tw.dial("+1", "+2").to_dict()) == tw.dial("+1", "+2")


def record(msg: str, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("server.call", logging.INFO, __file__, 1, msg, (), None)
    r.__dict__.update(extra)
    return r


def test_log_formats_carry_call_ids_and_scrub_secrets() -> None:
    secret = "sk-abcdef123456"
    text = TextFormatter([secret]).format(record(f"key {secret}", call_sid="CA1",
                                                 stream_sid="MZ1"))
    assert text.endswith("key [redacted] [call_sid=CA1 stream_sid=MZ1]")
    line = JsonFormatter([secret]).format(record(f"oops {secret}", call_sid="CA1"))
    entry = orjson.loads(line)
    assert entry["msg"] == "oops [redacted]" and entry["call_sid"] == "CA1"
    assert entry["level"] == "INFO" and "\n" not in line


def test_json_log_carries_the_call_record() -> None:
    r = record("call ended", call_sid="CA1", call={"reason": "x", "frames_in": 3})
    entry = orjson.loads(JsonFormatter([]).format(r))
    assert entry["call"] == {"reason": "x", "frames_in": 3}
