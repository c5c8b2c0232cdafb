"""The OpenAI Realtime side of the wire, GA interface only: events in, client events out.

No `OpenAI-Beta` header and no `temperature`: the GA service rejects both. Nothing else in the
server knows a Realtime JSON field name: server events are decoded here into typed events (a
dispatch on `type`), and every client event is encoded here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from server.models import events as ev
from server.models.session import ToolSpec
from server.settings import Settings

SESSION_UPDATE_ID = "bridge_session_update"
PCMU = {"type": "audio/pcmu"}

# Error codes after which the session is of no further use to the caller.
FATAL_ERROR_CODES = frozenset(
    {
        "session_expired",
        "beta_api_shape_disabled",
        "invalid_api_key",
        "insufficient_quota",
        "model_not_found",
    }
)


class OpenAIProtocolError(ValueError):
    """An event we cannot make sense of; the message is safe to log."""


# --- server events -> the model boundary's typed events (server.models.events) ---


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    """`session.updated`: the formats the service confirmed (the session checks them)."""

    input_format: str | None
    output_format: str | None


@dataclass(frozen=True, slots=True)
class RateLimits:
    summary: str


RealtimeEvent = ev.ModelEvent | SessionUpdated | RateLimits


def decode(data: bytes | str) -> RealtimeEvent:
    """One server event -> one typed event; OpenAIProtocolError when it is not one."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise OpenAIProtocolError("event is not JSON") from None
    if type(event) is not dict:
        raise OpenAIProtocolError("event is not a JSON object")
    kind = event.get("type")
    if kind == "response.output_audio.delta":  # the fast path
        delta, item_id = event.get("delta"), event.get("item_id")
        if type(delta) is not str or type(item_id) is not str:
            raise OpenAIProtocolError("audio delta without a delta or item_id string")
        response_id = event.get("response_id")
        return ev.AudioDelta(response_id if type(response_id) is str else None, item_id, delta)
    if not isinstance(kind, str):
        raise OpenAIProtocolError("event without a type")
    parse = _PARSERS.get(kind)
    if parse is None:
        return ev.Other(kind, _summary(event))
    return parse(event)


def _obj(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """parent[key] if it is an object, else {}: events from the network may be any shape."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _list(parent: dict[str, Any], key: str) -> list[Any]:
    value = parent.get(key)
    return value if isinstance(value, list) else []


def _str(parent: dict[str, Any], key: str) -> str:
    value = parent.get(key)
    return value if isinstance(value, str) else ""


def _int(parent: dict[str, Any], key: str) -> int | None:
    value = parent.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _session_updated(e: dict[str, Any]) -> SessionUpdated:
    audio = _obj(_obj(e, "session"), "audio")
    formats = [_obj(_obj(audio, side), "format").get("type") for side in ("input", "output")]
    return SessionUpdated(*(f if isinstance(f, str) else None for f in formats))


def _error(e: dict[str, Any]) -> ev.ModelError:
    error = e.get("error")
    if not isinstance(error, dict):
        return ev.ModelError("unknown", "error event without details", None, False)
    code = str(error.get("code") or error.get("type") or "unknown")
    message = str(error.get("message") or "")
    param = error.get("param")
    if param:
        message = f"{message} (param {param})"
    event_id = error.get("event_id")
    event_id = event_id if isinstance(event_id, str) else None
    fatal = code in FATAL_ERROR_CODES or event_id == SESSION_UPDATE_ID
    return ev.ModelError(code, message, event_id, fatal)


def _function_call(e: dict[str, Any]) -> ev.FunctionCall:
    return ev.FunctionCall(_str(e, "call_id"), _str(e, "name"), _str(e, "arguments"),
                        _str(e, "response_id"), _str(e, "item_id"))


def _response_done(e: dict[str, Any]) -> ev.ResponseDone:
    response = _obj(e, "response")
    output = response.get("output")
    calls = tuple(
        ev.FunctionCall(_str(item, "call_id"), _str(item, "name"), _str(item, "arguments"),
                     _str(response, "id"), _str(item, "id"))
        for item in (output if isinstance(output, list) else ())
        if isinstance(item, dict) and item.get("type") == "function_call"
    )
    transcripts = tuple(
        ev.AssistantTranscript(_str(response, "id"), _str(item, "id"), part["transcript"])
        for item in (output if isinstance(output, list) else ())
        if isinstance(item, dict) and item.get("type") == "message"
        and item.get("role") == "assistant"
        for part in _list(item, "content")
        if isinstance(part, dict) and isinstance(part.get("transcript"), str)
    )
    reason = _obj(response, "status_details").get("reason")
    return ev.ResponseDone(_str(response, "id"), _str(response, "status"),
                        reason if isinstance(reason, str) else None, _obj(response, "usage"),
                        calls, transcripts)


def _rate_limits(e: dict[str, Any]) -> RateLimits:
    limits = e.get("rate_limits")
    rows = [r for r in limits if isinstance(r, dict)] if isinstance(limits, list) else []
    return RateLimits(" ".join(f"{r.get('name')}={r.get('remaining')}/{r.get('limit')}"
                               for r in rows))


# Every event the bridge decodes: its wire type, its class, how to read it. One table, so the
# dispatch by `type` and the way back (`type_of`, for LOG_EVENT_TYPES) cannot disagree.
_EVENTS: tuple[tuple[str, type, Callable[[dict[str, Any]], RealtimeEvent]], ...] = (
    ("response.output_audio.done", ev.AudioDone,
     lambda e: ev.AudioDone(_str(e, "response_id"), _str(e, "item_id"))),
    ("session.created", ev.Other, lambda e: ev.Other("session.created")),
    ("session.updated", SessionUpdated, _session_updated),
    ("error", ev.ModelError, _error),
    ("input_audio_buffer.speech_started", ev.SpeechStarted,
     lambda e: ev.SpeechStarted(_str(e, "item_id"), _int(e, "audio_start_ms"))),
    ("input_audio_buffer.speech_stopped", ev.SpeechStopped,
     lambda e: ev.SpeechStopped(_str(e, "item_id"), _int(e, "audio_end_ms"))),
    ("response.created", ev.ResponseCreated,
     lambda e: ev.ResponseCreated(_str(_obj(e, "response"), "id"))),
    ("response.done", ev.ResponseDone, _response_done),
    ("response.function_call_arguments.done", ev.FunctionCall, _function_call),
    ("response.output_audio_transcript.done", ev.AssistantTranscript,
     lambda e: ev.AssistantTranscript(_str(e, "response_id"), _str(e, "item_id"),
                                      _str(e, "transcript"))),
    ("conversation.item.input_audio_transcription.completed", ev.CallerTranscript,
     lambda e: ev.CallerTranscript(_str(e, "item_id"), _str(e, "transcript"))),
    ("response.output_audio_transcript.delta", ev.TranscriptDelta,
     lambda e: ev.TranscriptDelta("assistant", _str(e, "item_id"), _str(e, "delta"))),
    ("conversation.item.input_audio_transcription.delta", ev.TranscriptDelta,
     lambda e: ev.TranscriptDelta("caller", _str(e, "item_id"), _str(e, "delta"))),
    ("rate_limits.updated", RateLimits, _rate_limits),
)
_PARSERS = {name: parse for name, _, parse in _EVENTS}


def _summary(event: dict[str, Any]) -> str:
    """A short, readable line for a logged event (never whole audio or output arrays)."""
    return " ".join(f"{k}={v}" for k, v in event.items()
                    if k not in ("type", "event_id", "delta", "audio")
                    and isinstance(v, (str, int, float)))[:300]


def describe(event: RealtimeEvent) -> str:
    """The log line for an event listed in LOG_EVENT_TYPES."""
    if isinstance(event, ev.ResponseDone):
        usage = event.usage
        return (f"status={event.status}" + (f" reason={event.reason}" if event.reason else "")
                + f" tokens in={usage.get('input_tokens')} out={usage.get('output_tokens')}")
    if isinstance(event, (RateLimits, ev.Other)):
        return event.summary
    if isinstance(event, (ev.AssistantTranscript, ev.CallerTranscript, ev.TranscriptDelta)):
        return f"item_id={event.item_id}"  # the words themselves go to the record, not the log
    if isinstance(event, ev.FunctionCall):
        return f"name={event.name} call_id={event.call_id}"
    return " ".join(f"{k}={v}" for k, v in _fields(event) if v is not None)[:300]


def _fields(event: Any) -> list[tuple[str, Any]]:
    return [(name, getattr(event, name)) for name in getattr(event, "__slots__", ())]


EVENT_TYPES: dict[type, str] = {
    ev.AudioDelta: "response.output_audio.delta",  # decoded on the fast path, not in _EVENTS
    **{cls: name for name, cls, _ in _EVENTS if cls not in (ev.Other, ev.TranscriptDelta)},
}


def type_of(event: RealtimeEvent) -> str:
    """The wire `type` of a decoded event (for LOG_EVENT_TYPES)."""
    if isinstance(event, ev.Other):
        return event.type
    if isinstance(event, ev.TranscriptDelta):
        return ("response.output_audio_transcript.delta" if event.role == "assistant"
                else "conversation.item.input_audio_transcription.delta")
    return EVENT_TYPES[type(event)]


# --- client events ---


def realtime_url(settings: Settings, model: str | None = None) -> str:
    return (f"{settings.openai_realtime_url}?model="
            f"{quote(model or settings.openai_model, safe='')}")


def auth_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.openai_api_key}"}


def turn_detection(settings: Settings) -> dict[str, Any]:
    common = {"create_response": True, "interrupt_response": True}
    if settings.turn_detection == "semantic_vad":
        return {"type": "semantic_vad", "eagerness": settings.vad_eagerness, **common}
    return {
        "type": "server_vad",
        "threshold": settings.vad_threshold,
        "prefix_padding_ms": settings.vad_prefix_padding_ms,
        "silence_duration_ms": settings.vad_silence_ms,
        **common,
    }


def tool_wire(spec: ToolSpec) -> dict[str, Any]:
    """A function the model may call, as `session.update` declares it."""
    return {"type": "function", "name": spec.name, "description": spec.description,
            "parameters": spec.parameters or {"type": "object", "properties": {}}}


def session_update(
    settings: Settings, prompt_fields: dict[str, Any], tools: Sequence[ToolSpec] = (), *,
    model: str | None = None, voice: str | None = None,
) -> bytes:
    """The first event on every session: mu-law both ways, before any audio is appended.
    `model` and `voice` are the call's (its plan's); the app's settings otherwise."""
    audio_input: dict[str, Any] = {"format": PCMU, "turn_detection": turn_detection(settings)}
    if settings.noise_reduction != "off":
        audio_input["noise_reduction"] = {"type": settings.noise_reduction}
    if settings.transcription_model:
        audio_input["transcription"] = {"model": settings.transcription_model}
    session: dict[str, Any] = {
        "type": "realtime",
        "model": model or settings.openai_model,
        "output_modalities": ["audio"],
        "audio": {"input": audio_input,
                  "output": {"format": PCMU, "voice": voice or settings.voice}},
        **prompt_fields,
    }
    if tools:
        session["tools"] = [tool_wire(t) for t in tools]
        session["tool_choice"] = "auto"
    return orjson.dumps(
        {"type": "session.update", "event_id": SESSION_UPDATE_ID, "session": session}
    )


def append_audio(payload: str) -> bytes:
    return orjson.dumps({"type": "input_audio_buffer.append", "audio": payload})


def truncate(item_id: str, audio_end_ms: int) -> bytes:
    return orjson.dumps(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": audio_end_ms,
        }
    )


def response_create(instructions: str | None = None, event_id: str | None = None) -> bytes:
    """`event_id` comes back in an `error` that refuses it (the response gate retries on it)."""
    event: dict[str, Any] = {"type": "response.create"}
    if event_id:
        event["event_id"] = event_id
    if instructions:
        event["response"] = {"instructions": instructions}
    return orjson.dumps(event)


def function_call_output(call_id: str, output: str) -> bytes:
    return orjson.dumps({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": call_id, "output": output}})


def user_text(text: str) -> bytes:
    """A user message in text: keypad entries, and caller turns carried into a new session."""
    return orjson.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})


def assistant_text(text: str) -> bytes:
    """An assistant turn carried into a new session (text only: audio is never replayed)."""
    return orjson.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "output_text", "text": text}]}})


def function_call_item(call_id: str, name: str, arguments: str) -> bytes:
    """A past function call carried into a new session, so its output has a call to answer."""
    return orjson.dumps({"type": "conversation.item.create", "item": {
        "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}})


def system_text(text: str) -> bytes:
    """A system message: an operator's whisper, or a note the caller never hears."""
    return orjson.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "system", "content": [{"type": "input_text", "text": text}]}})


def listen_only(settings: Settings, on: bool) -> bytes:
    """Take-over: the model keeps listening (transcribing, remembering) but creates no
    responses of its own and is not interrupted; `on=False` restores turn detection."""
    detection = turn_detection(settings)
    if on:
        detection = {**detection, "create_response": False, "interrupt_response": False}
    return orjson.dumps({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"turn_detection": detection}}}})
