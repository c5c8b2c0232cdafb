"""The OpenAI Realtime side of the wire, GA interface only: events in, client events out.

No `OpenAI-Beta` header and no `temperature`: the GA service rejects both. Nothing else in the
server knows a Realtime JSON field name: server events are decoded here into typed events (a
dispatch on `type`), and every client event is encoded here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

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


# --- server events ---


class AudioDelta:
    """Assistant audio: base64 mu-law, passed on untouched."""

    __slots__ = ("delta", "item_id", "response_id")

    def __init__(self, response_id: str | None, item_id: str, delta: str) -> None:
        self.response_id = response_id
        self.item_id = item_id
        self.delta = delta


@dataclass(frozen=True, slots=True)
class AudioDone:
    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class SessionCreated:
    pass


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    input_format: str | None
    output_format: str | None


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str
    event_id: str | None
    fatal: bool


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    item_id: str
    audio_start_ms: int | None


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    item_id: str
    audio_end_ms: int | None


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    response_id: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    call_id: str
    name: str
    arguments: str
    response_id: str = ""
    item_id: str = ""


@dataclass(frozen=True, slots=True)
class ResponseDone:
    response_id: str
    status: str
    reason: str | None
    usage: dict[str, Any]
    function_calls: tuple[FunctionCall, ...] = ()
    transcripts: tuple[AssistantTranscript, ...] = ()  # assistant messages' words, as output


@dataclass(frozen=True, slots=True)
class AssistantTranscript:
    """`response.output_audio_transcript.done`: what the assistant said, as text."""

    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class CallerTranscript:
    """`conversation.item.input_audio_transcription.completed`: what the caller said."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class RateLimits:
    summary: str


@dataclass(frozen=True, slots=True)
class Other:
    """Any event the bridge does not act on; kept for logging."""

    type: str
    summary: str = ""


OpenAIEvent = (
    AudioDelta | AudioDone | SessionCreated | SessionUpdated | Error | SpeechStarted
    | SpeechStopped | ResponseCreated | ResponseDone | FunctionCall | AssistantTranscript
    | CallerTranscript | RateLimits | Other
)


def decode(data: bytes | str) -> OpenAIEvent:
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
        return AudioDelta(response_id if type(response_id) is str else None, item_id, delta)
    if not isinstance(kind, str):
        raise OpenAIProtocolError("event without a type")
    parse = _PARSERS.get(kind)
    if parse is None:
        return Other(kind, _summary(event))
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


def _error(e: dict[str, Any]) -> Error:
    error = e.get("error")
    if not isinstance(error, dict):
        return Error("unknown", "error event without details", None, False)
    code = str(error.get("code") or error.get("type") or "unknown")
    message = str(error.get("message") or "")
    param = error.get("param")
    if param:
        message = f"{message} (param {param})"
    event_id = error.get("event_id")
    event_id = event_id if isinstance(event_id, str) else None
    fatal = code in FATAL_ERROR_CODES or event_id == SESSION_UPDATE_ID
    return Error(code, message, event_id, fatal)


def _function_call(e: dict[str, Any]) -> FunctionCall:
    return FunctionCall(_str(e, "call_id"), _str(e, "name"), _str(e, "arguments"),
                        _str(e, "response_id"), _str(e, "item_id"))


def _response_done(e: dict[str, Any]) -> ResponseDone:
    response = _obj(e, "response")
    output = response.get("output")
    calls = tuple(
        FunctionCall(_str(item, "call_id"), _str(item, "name"), _str(item, "arguments"),
                     _str(response, "id"), _str(item, "id"))
        for item in (output if isinstance(output, list) else ())
        if isinstance(item, dict) and item.get("type") == "function_call"
    )
    transcripts = tuple(
        AssistantTranscript(_str(response, "id"), _str(item, "id"), part["transcript"])
        for item in (output if isinstance(output, list) else ())
        if isinstance(item, dict) and item.get("type") == "message"
        and item.get("role") == "assistant"
        for part in _list(item, "content")
        if isinstance(part, dict) and isinstance(part.get("transcript"), str)
    )
    reason = _obj(response, "status_details").get("reason")
    return ResponseDone(_str(response, "id"), _str(response, "status"),
                        reason if isinstance(reason, str) else None, _obj(response, "usage"),
                        calls, transcripts)


def _rate_limits(e: dict[str, Any]) -> RateLimits:
    limits = e.get("rate_limits")
    rows = [r for r in limits if isinstance(r, dict)] if isinstance(limits, list) else []
    return RateLimits(" ".join(f"{r.get('name')}={r.get('remaining')}/{r.get('limit')}"
                               for r in rows))


# Every event the bridge decodes: its wire type, its class, how to read it. One table, so the
# dispatch by `type` and the way back (`type_of`, for LOG_EVENT_TYPES) cannot disagree.
_EVENTS: tuple[tuple[str, type, Callable[[dict[str, Any]], OpenAIEvent]], ...] = (
    ("response.output_audio.done", AudioDone,
     lambda e: AudioDone(_str(e, "response_id"), _str(e, "item_id"))),
    ("session.created", SessionCreated, lambda e: SessionCreated()),
    ("session.updated", SessionUpdated, _session_updated),
    ("error", Error, _error),
    ("input_audio_buffer.speech_started", SpeechStarted,
     lambda e: SpeechStarted(_str(e, "item_id"), _int(e, "audio_start_ms"))),
    ("input_audio_buffer.speech_stopped", SpeechStopped,
     lambda e: SpeechStopped(_str(e, "item_id"), _int(e, "audio_end_ms"))),
    ("response.created", ResponseCreated,
     lambda e: ResponseCreated(_str(_obj(e, "response"), "id"))),
    ("response.done", ResponseDone, _response_done),
    ("response.function_call_arguments.done", FunctionCall, _function_call),
    ("response.output_audio_transcript.done", AssistantTranscript,
     lambda e: AssistantTranscript(_str(e, "response_id"), _str(e, "item_id"),
                                   _str(e, "transcript"))),
    ("conversation.item.input_audio_transcription.completed", CallerTranscript,
     lambda e: CallerTranscript(_str(e, "item_id"), _str(e, "transcript"))),
    ("rate_limits.updated", RateLimits, _rate_limits),
)
_PARSERS = {name: parse for name, _, parse in _EVENTS}


def _summary(event: dict[str, Any]) -> str:
    """A short, readable line for a logged event (never whole audio or output arrays)."""
    return " ".join(f"{k}={v}" for k, v in event.items()
                    if k not in ("type", "event_id", "delta", "audio")
                    and isinstance(v, (str, int, float)))[:300]


def describe(event: OpenAIEvent) -> str:
    """The log line for an event listed in LOG_EVENT_TYPES."""
    if isinstance(event, ResponseDone):
        usage = event.usage
        return (f"status={event.status}" + (f" reason={event.reason}" if event.reason else "")
                + f" tokens in={usage.get('input_tokens')} out={usage.get('output_tokens')}")
    if isinstance(event, (RateLimits, Other)):
        return event.summary
    if isinstance(event, (AssistantTranscript, CallerTranscript)):
        return f"item_id={event.item_id}"  # the words themselves go to the record, not the log
    if isinstance(event, FunctionCall):
        return f"name={event.name} call_id={event.call_id}"
    return " ".join(f"{k}={v}" for k, v in _fields(event) if v is not None)[:300]


def _fields(event: Any) -> list[tuple[str, Any]]:
    return [(name, getattr(event, name)) for name in getattr(event, "__slots__", ())]


EVENT_TYPES: dict[type, str] = {
    AudioDelta: "response.output_audio.delta",  # decoded on the fast path, not in _EVENTS
    **{cls: name for name, cls, _ in _EVENTS},
}


def type_of(event: OpenAIEvent) -> str:
    """The wire `type` of a decoded event (for LOG_EVENT_TYPES)."""
    return event.type if isinstance(event, Other) else EVENT_TYPES[type(event)]


# --- client events ---


def realtime_url(settings: Settings) -> str:
    return f"{settings.openai_realtime_url}?model={quote(settings.openai_model, safe='')}"


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


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call, as declared in `session.update`."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters or {"type": "object", "properties": {}}}


def session_update(
    settings: Settings, prompt_fields: dict[str, Any], tools: Sequence[ToolSpec] = ()
) -> bytes:
    """The first event on every session: mu-law both ways, before any audio is appended."""
    audio_input: dict[str, Any] = {"format": PCMU, "turn_detection": turn_detection(settings)}
    if settings.noise_reduction != "off":
        audio_input["noise_reduction"] = {"type": settings.noise_reduction}
    if settings.transcription_model:
        audio_input["transcription"] = {"model": settings.transcription_model}
    session: dict[str, Any] = {
        "type": "realtime",
        "model": settings.openai_model,
        "output_modalities": ["audio"],
        "audio": {"input": audio_input, "output": {"format": PCMU, "voice": settings.voice}},
        **prompt_fields,
    }
    if tools:
        session["tools"] = [t.wire() for t in tools]
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
