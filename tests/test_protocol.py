"""What we put on each wire: the GA session.update, and Twilio's outbound frames and TwiML."""

from __future__ import annotations

import logging
from dataclasses import replace

import orjson

from server.logs import JsonFormatter, TextFormatter
from server.openai_protocol import SESSION_UPDATE_ID, is_fatal, realtime_url, session_update
from server.prompts import Prompt
from server.settings import Settings
from server.twilio_protocol import (
    busy_twiml,
    clear_frame,
    connect_twiml,
    is_base64,
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
                "interrupt_response": True}},
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


def test_url_and_fatal_errors() -> None:
    assert realtime_url(BASE) == "wss://api.openai.com/v1/realtime?model=gpt-realtime-mini"
    assert is_fatal({"type": "error", "error": {"code": "session_expired"}})
    assert is_fatal({"type": "error", "error": {"code": "x", "event_id": SESSION_UPDATE_ID}})
    assert not is_fatal({"type": "error", "error": {"code": "invalid_value"}})
    assert not is_fatal({"type": "error"})


def test_twilio_frames_have_exactly_the_accepted_keys() -> None:
    assert orjson.loads(media_frame("MZ1", "AAAA")) == {
        "event": "media", "streamSid": "MZ1", "media": {"payload": "AAAA"}}
    assert orjson.loads(mark_frame("MZ1", "7")) == {
        "event": "mark", "streamSid": "MZ1", "mark": {"name": "7"}}
    assert orjson.loads(clear_frame("MZ1")) == {"event": "clear", "streamSid": "MZ1"}


def test_base64_check() -> None:
    for good in ("", "AAAA", "AAA=", "AA==", "/+9a" * 54):
        assert is_base64(good), good
    for bad in ("A", "AAA", "A===", "AA=A", "AAAA====", "AA AA", 'AA"}', "AAA\n"):
        assert not is_base64(bad), bad


def test_twiml_escapes_and_caps_parameters() -> None:
    xml = connect_twiml("wss://h/media-stream", {"caller": '<"&>', "long": "x" * 900}, "Bye")
    assert "&lt;&quot;&amp;&gt;" in xml
    assert "x" * 500 in xml and "x" * 501 not in xml
    assert "<Hangup" in busy_twiml("busy")


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
