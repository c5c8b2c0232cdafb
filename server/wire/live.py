"""The OpenAI GPT-Live side of the wire: server events in, client events out.

GPT-Live (`wss://api.openai.com/v1/live/sessions`) is a protocol of its own, not Realtime's: the
model decides turns and barge-in itself, audio flows both ways as one continuous track with no
item or response ids, transcripts are deltas on the session timeline (milliseconds of input
since the start), and tools run through Responses delegation (function calls arrive wrapped in
`response.event`). Nothing else in the server knows a GPT-Live JSON field name: server events
are decoded here into typed events (one table, a dispatch on `type`), and every client event is
encoded here, as bytes ready for the socket.

Also here, because both are about the wire's shapes and limits rather than about a call:
`history_input` (a conversation as `session.start` `input`, trimmed to the API's limits) and
`TranscriptGrouper` (the transcript deltas grouped into turns, which GPT-Live does not do).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import orjson

LIVE_URL = "wss://api.openai.com/v1/live/sessions"
LIVE_MODELS = ("gpt-live-1", "gpt-live-1.1")
PCMU_8K = {"type": "audio/pcmu", "rate": 8000}  # Twilio's audio, untouched both ways

# The bridge's own event ids: an error that names one of these refused that event.
SESSION_START_ID = "bridge_session_start"
SESSION_UPDATE_ID = "bridge_session_update"

# Error codes after which the session is of no further use to the caller.
FATAL_ERROR_CODES = frozenset(
    {"invalid_api_key", "insufficient_quota", "model_not_found", "session_expired"}
)


class LiveProtocolError(ValueError):
    """An event we cannot make sense of; the message is safe to log."""


# --- server events ---


class AudioDelta:
    """Model audio (`session.output_audio.delta`): base64 mu-law, passed on untouched.

    A plain slotted class, not a dataclass: one is made per 100 ms of every call's audio."""

    __slots__ = ("delta",)

    def __init__(self, delta: str) -> None:
        self.delta = delta


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """`session.started`: the session accepts audio and context from now on."""

    session_id: str
    expires_at: int | None  # unix seconds; the session ends (`expired`) then
    model: str


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    """`session.updated`: a `session.update` (the backend's settings) took effect."""

    session_id: str


@dataclass(frozen=True, slots=True)
class InputTranscriptDelta:
    """`session.input_transcript.delta`: words the caller said, on the session timeline."""

    speaker: ClassVar[str] = "caller"
    delta: str
    start_ms: int | None
    end_ms: int | None


@dataclass(frozen=True, slots=True)
class OutputTranscriptDelta:
    """`session.output_transcript.delta`: words the model said, on the session timeline."""

    speaker: ClassVar[str] = "assistant"
    delta: str
    start_ms: int | None
    end_ms: int | None


Transcript = InputTranscriptDelta | OutputTranscriptDelta


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A completed function call of the Responses backend (from a `response.event` wrapping
    `response.output_item.done`): run it, then `function_call_output` + `response_create`."""

    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it (may be invalid)
    item_id: str
    delegation_id: str | None


@dataclass(frozen=True, slots=True)
class BackendDone:
    """A backend response ended (`response.completed`, `.incomplete` or `.failed`, wrapped in
    `response.event`): its token usage, in the Responses API's field names."""

    response_id: str
    status: str
    usage: dict[str, Any]
    delegation_id: str | None


@dataclass(frozen=True, slots=True)
class BackendEvent:
    """Any other `response.event` (lifecycle snapshots, deltas): kept for logging."""

    type: str  # the nested event's type
    delegation_id: str | None
    summary: str = ""


@dataclass(frozen=True, slots=True)
class DelegationCreated:
    """`session.delegation.created`: the model handed a task to the backend (or the client)."""

    delegation_id: str
    target: str  # "responses" | "client" | "decisions"
    response_id: str | None
    offset_ms: int | None


@dataclass(frozen=True, slots=True)
class UsageUpdated:
    """`session.usage.updated`: a cumulative snapshot (keep the last one, never add them)."""

    seconds: float | None
    usage_ratio: float | None  # how full the context window is, 0..1


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """`session.closed`: the last event of a session, with the final billed seconds."""

    reason: str  # close_requested | expired | content | remote_hangup | connection_lost
    seconds: float | None


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    type: str
    message: str
    param: str | None
    client_event_id: str | None
    fatal: bool  # the session is of no further use (bad key, quota, a refused session.start)


@dataclass(frozen=True, slots=True)
class Appended:
    """An ack (`session.instructions.appended`, `.thinking.appended`,
    `.commentary.appended`): where the appended context landed on the timeline."""

    type: str
    start_ms: int | None
    end_ms: int | None
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class Other:
    """Any event the bridge does not act on; kept for logging."""

    type: str
    summary: str = ""


LiveEvent = (
    AudioDelta | SessionStarted | SessionUpdated | InputTranscriptDelta | OutputTranscriptDelta
    | FunctionCall | BackendDone | BackendEvent | DelegationCreated | UsageUpdated
    | SessionClosed | Error | Appended | Other
)


def decode(data: bytes | str) -> LiveEvent:
    """One server event -> one typed event; LiveProtocolError when it is not one."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise LiveProtocolError("event is not JSON") from None
    if type(event) is not dict:
        raise LiveProtocolError("event is not a JSON object")
    kind = event.get("type")
    if kind == "session.output_audio.delta":  # the fast path: ten of these a second
        delta = event.get("delta")
        if type(delta) is not str:
            raise LiveProtocolError("audio delta without a delta string")
        return AudioDelta(delta)
    if not isinstance(kind, str):
        raise LiveProtocolError("event without a type")
    parse = _PARSERS.get(kind)
    if parse is None:
        return Other(kind, _summary(event))
    return parse(event)


def _obj(parent: Mapping[str, Any], key: str) -> dict[str, Any]:
    """parent[key] if it is an object, else {}: events from the network may be any shape."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _str(parent: Mapping[str, Any], key: str) -> str:
    value = parent.get(key)
    return value if isinstance(value, str) else ""


def _opt_str(parent: Mapping[str, Any], key: str) -> str | None:
    value = parent.get(key)
    return value if isinstance(value, str) else None


def _int(parent: Mapping[str, Any], key: str) -> int | None:
    value = parent.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(parent: Mapping[str, Any], key: str) -> float | None:
    value = parent.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _session_started(e: dict[str, Any]) -> SessionStarted:
    session = _obj(e, "session")
    return SessionStarted(_str(session, "id"), _int(session, "expires_at"),
                          _str(session, "model"))


def _error(e: dict[str, Any]) -> Error:
    error = e.get("error")
    if not isinstance(error, dict):
        return Error("unknown", "", "error event without details", None,
                     _opt_str(e, "client_event_id"), False)
    code = str(error.get("code") or error.get("type") or "unknown")
    client_event_id = _opt_str(error, "client_event_id") or _opt_str(e, "client_event_id")
    fatal = code in FATAL_ERROR_CODES or client_event_id == SESSION_START_ID
    return Error(code, _str(error, "type"), str(error.get("message") or ""),
                 _opt_str(error, "param"), client_event_id, fatal)


_BACKEND_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _response_event(e: dict[str, Any]) -> FunctionCall | BackendDone | BackendEvent:
    """Unwrap a backend (Responses) event: function calls come from the item events, token
    usage from the response's end; lifecycle snapshots carry no output."""
    delegation_id = _opt_str(e, "delegation_id")
    nested = e.get("event")
    if not isinstance(nested, dict):
        return BackendEvent("", delegation_id, "response.event without a nested event")
    kind = _str(nested, "type")
    if kind == "response.output_item.done":
        item = _obj(nested, "item")
        if item.get("type") == "function_call" and item.get("status", "completed") == "completed":
            return FunctionCall(_str(item, "call_id"), _str(item, "name"),
                                _str(item, "arguments"), _str(item, "id"), delegation_id)
    elif kind in _BACKEND_DONE:
        response = _obj(nested, "response")
        return BackendDone(_str(response, "id"), _str(response, "status"),
                           _obj(response, "usage"), delegation_id)
    return BackendEvent(kind, delegation_id, _summary(nested))


def _delegation_created(e: dict[str, Any]) -> DelegationCreated:
    delegation = _obj(e, "delegation")
    return DelegationCreated(_str(delegation, "id"), _str(delegation, "target"),
                             _opt_str(delegation, "response_id"), _int(e, "offset_ms"))


def _appended(e: dict[str, Any]) -> Appended:
    return Appended(_str(e, "type"), _int(e, "start_ms"), _int(e, "end_ms"),
                    _opt_str(e, "client_event_id"))


# Every event the bridge decodes: its wire type, its classes, how to read it. One table, so the
# dispatch by `type` and the way back (`type_of`, for LOG_EVENT_TYPES) cannot disagree.
_EVENTS: tuple[tuple[str, tuple[type, ...], Callable[[dict[str, Any]], LiveEvent]], ...] = (
    ("session.started", (SessionStarted,), _session_started),
    ("session.updated", (SessionUpdated,),
     lambda e: SessionUpdated(_str(_obj(e, "session"), "id"))),
    ("session.input_transcript.delta", (InputTranscriptDelta,),
     lambda e: InputTranscriptDelta(_str(e, "delta"), _int(e, "start_ms"), _int(e, "end_ms"))),
    ("session.output_transcript.delta", (OutputTranscriptDelta,),
     lambda e: OutputTranscriptDelta(_str(e, "delta"), _int(e, "start_ms"), _int(e, "end_ms"))),
    ("response.event", (FunctionCall, BackendDone, BackendEvent), _response_event),
    ("session.delegation.created", (DelegationCreated,), _delegation_created),
    ("session.usage.updated", (UsageUpdated,),
     lambda e: UsageUpdated(_num(_obj(e, "usage"), "seconds"),
                            _num(_obj(e, "context_window"), "usage_ratio"))),
    ("session.closed", (SessionClosed,),
     lambda e: SessionClosed(_str(e, "reason"), _num(_obj(e, "usage"), "seconds"))),
    ("error", (Error,), _error),
    ("session.instructions.appended", (), _appended),
    ("session.thinking.appended", (), _appended),
    ("session.commentary.appended", (), _appended),
)
_PARSERS = {name: parse for name, _, parse in _EVENTS}


def _summary(event: Mapping[str, Any]) -> str:
    """A short, readable line for a logged event (never audio, words or whole objects)."""
    return " ".join(f"{k}={v}" for k, v in event.items()
                    if k not in ("type", "event_id", "delta", "audio", "text", "content",
                                 "transcript", "arguments", "output")
                    and isinstance(v, (str, int, float)))[:300]


def describe(event: LiveEvent) -> str:
    """The log line for an event listed in LOG_EVENT_TYPES (no audio, no caller's words)."""
    if isinstance(event, AudioDelta):
        return f"bytes={len(event.delta) * 3 // 4}"
    if isinstance(event, (InputTranscriptDelta, OutputTranscriptDelta)):
        return f"start_ms={event.start_ms} end_ms={event.end_ms}"  # words go to the record
    if isinstance(event, FunctionCall):
        return f"name={event.name} call_id={event.call_id} delegation_id={event.delegation_id}"
    if isinstance(event, BackendDone):
        usage = event.usage
        return (f"response_id={event.response_id} status={event.status} "
                f"tokens in={usage.get('input_tokens')} out={usage.get('output_tokens')}")
    if isinstance(event, (BackendEvent, Other)):
        return f"{event.type} {event.summary}".strip()
    return " ".join(f"{k}={v}" for k, v in _fields(event) if v is not None)[:300]


def _fields(event: Any) -> list[tuple[str, Any]]:
    return [(name, getattr(event, name)) for name in getattr(event, "__slots__", ())]


EVENT_TYPES: dict[type, str] = {
    AudioDelta: "session.output_audio.delta",  # decoded on the fast path, not in _EVENTS
    **{cls: name for name, classes, _ in _EVENTS for cls in classes},
}


def type_of(event: LiveEvent) -> str:
    """The wire `type` of a decoded event (for LOG_EVENT_TYPES)."""
    if isinstance(event, (Appended, Other)):
        return event.type
    return EVENT_TYPES[type(event)]


# --- client events ---


def auth_headers(api_key: str) -> dict[str, str]:
    """The only handshake header GPT-Live needs (no model in the URL, no beta header)."""
    return {"Authorization": f"Bearer {api_key}"}


class Tool(Protocol):
    """A function the backend may call: the Realtime side's ToolSpec fits as it is."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def parameters(self) -> Mapping[str, Any]: ...


def tool_wire(tool: Tool) -> dict[str, Any]:
    """A function tool as `delegation.responses.tools` declares it."""
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": dict(tool.parameters) or {"type": "object", "properties": {}}}


def _responses(model: str | None, instructions: str | None,
               tools: Sequence[Tool] | None) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if model:
        responses["model"] = model
    if instructions:
        responses["instructions"] = instructions
    if tools is not None:
        responses["tools"] = [tool_wire(t) for t in tools]
    return responses


def session_start(
    model: str,
    instructions: str,
    voice: str,
    history: Sequence[Mapping[str, Any]] = (),
    *,
    tools: Sequence[Tool] = (),
    backend_model: str | None = None,
    backend_instructions: str | None = None,
) -> bytes:
    """The first event on every session: mu-law 8 kHz both ways, the voice, the history to
    restore (`history_input`, as `input`), and with a backend model, Responses delegation to
    it with the tools. No backend model: the client's delegation (the API's default)."""
    session: dict[str, Any] = {"model": model, "instructions": instructions,
                               "audio": {"format": PCMU_8K, "output": {"voice": voice}}}
    if history:
        session["input"] = list(history)
    if tools and not backend_model:
        raise ValueError("tools need a backend model (Responses delegation)")
    if backend_model:
        session["delegation"] = {"type": "responses", "responses": _responses(
            backend_model, backend_instructions, tools or None)}
    return orjson.dumps({"type": "session.start", "event_id": SESSION_START_ID,
                         "session": session})


def session_update(*, backend_model: str | None = None,
                   backend_instructions: str | None = None,
                   tools: Sequence[Tool] | None = None) -> bytes:
    """Change the backend's settings: the only thing GPT-Live lets change after the start."""
    return orjson.dumps({"type": "session.update", "event_id": SESSION_UPDATE_ID, "session": {
        "delegation": {"type": "responses", "responses": _responses(
            backend_model, backend_instructions, tools)}}})


def append_audio(payload: str) -> bytes:
    """Caller audio: base64 mu-law, as Twilio sent it. The hot path: nothing but one dumps."""
    return orjson.dumps({"type": "session.input_audio.append", "audio": payload})


def _append(kind: str, content: str, delegation_id: str | None,
            event_id: str | None) -> bytes:
    event: dict[str, Any] = {"type": kind, "content": content, "delegation_id": delegation_id}
    if event_id:
        event["event_id"] = event_id
    return orjson.dumps(event)


def instructions_append(content: str, delegation_id: str | None = None,
                        event_id: str | None = None) -> bytes:
    """Steer the model from now on (greet now, a whisper, the bridge cut the audio)."""
    return _append("session.instructions.append", content, delegation_id, event_id)


def thinking_append(content: str, delegation_id: str | None = None,
                    event_id: str | None = None) -> bytes:
    """Silent context the model may use (keypad entries, a client task's progress)."""
    return _append("session.thinking.append", content, delegation_id, event_id)


def commentary_append(content: str, delegation_id: str | None = None,
                      event_id: str | None = None) -> bytes:
    """Context the model paraphrases aloud (a client task's result)."""
    return _append("session.commentary.append", content, delegation_id, event_id)


def function_call_output(call_id: str, output: str, event_id: str | None = None) -> bytes:
    """A tool's result for the backend; send `response_create` once every call has one."""
    event: dict[str, Any] = {"type": "response.item.create", "item": {
        "type": "function_call_output", "call_id": call_id, "output": output}}
    if event_id:
        event["event_id"] = event_id
    return orjson.dumps(event)


def response_create(event_id: str | None = None) -> bytes:
    """Let the backend go on with the tool results (never a turn of the voice model)."""
    event: dict[str, Any] = {"type": "response.create"}
    if event_id:
        event["event_id"] = event_id
    return orjson.dumps(event)


def session_close(event_id: str | None = None) -> bytes:
    """Ask for `session.closed` (with the final usage); keep reading until it comes."""
    event: dict[str, Any] = {"type": "session.close"}
    if event_id:
        event["event_id"] = event_id
    return orjson.dumps(event)


# --- the history given to a new session ---

HISTORY_MAX_MESSAGES = 128
HISTORY_MAX_TOKENS = 8192
MESSAGE_TOKENS = 4  # a message's own cost beside its text, in the estimate
_ROLES = {"user": ("user", "input_text"), "assistant": ("assistant", "output_text"),
          "developer": ("developer", "input_text"), "system": ("developer", "input_text")}


def estimate_tokens(text: str) -> int:
    """A cautious token count for one message: a UTF-8 byte per quarter token (English runs
    about four characters a token; other scripts use more bytes, so they are not undercounted),
    plus the message's own overhead."""
    return (len(text.encode("utf-8")) + 3) // 4 + MESSAGE_TOKENS


def _message(role: str, text: str) -> dict[str, Any]:
    wire_role, part = _ROLES[role]
    return {"type": "message", "role": wire_role, "content": [{"type": part, "text": text}]}


def _cut_note(dropped: int) -> str:
    return (f"Earlier in this call: {dropped} older message{'s' if dropped != 1 else ''} "
            f"left out here to fit the context limit.")


def history_input(entries: Iterable[tuple[str, str]], *,
                  max_messages: int = HISTORY_MAX_MESSAGES,
                  max_tokens: int = HISTORY_MAX_TOKENS) -> list[dict[str, Any]]:
    """(role, text) pairs, oldest first, as `session.start` `input`, within the API's limits
    (128 messages, 8,192 tokens by `estimate_tokens`): the oldest go first, and one developer
    line at the start says how many were cut. Roles: user, assistant, developer (or system);
    empty texts are skipped. A newest message too long on its own keeps its end."""
    kept = [(role, text) for role, text in entries if text.strip()]
    for role, _ in kept:
        if role not in _ROLES:
            raise ValueError(f"history role {role!r} is not one of {', '.join(_ROLES)}")
    costs = [estimate_tokens(text) for _, text in kept]
    if len(kept) <= max_messages and sum(costs) <= max_tokens:
        return [_message(role, text) for role, text in kept]
    # Something must go, so room is left for the note (sized for the largest count it may say).
    room_messages = max_messages - 1
    room_tokens = max_tokens - estimate_tokens(_cut_note(len(kept)))
    start = len(kept)
    used = 0
    while start > 0 and len(kept) - start < room_messages \
            and used + costs[start - 1] <= room_tokens:
        start -= 1
        used += costs[start]
    messages = [_message(role, text) for role, text in kept[start:]]
    if not messages and kept and room_messages > 0:  # the newest alone is too long: its end
        role, text = kept[-1]
        room_bytes = max((room_tokens - MESSAGE_TOKENS) * 4 - 3 - 4, 0)  # 4: "… " in UTF-8
        tail = text.encode("utf-8")[-room_bytes:].decode("utf-8", "ignore") if room_bytes else ""
        messages = [_message(role, "… " + tail)]
        start = len(kept) - 1
    return [_message("developer", _cut_note(start)), *messages]


# --- transcript deltas -> turns ---


@dataclass(frozen=True, slots=True)
class TurnDelta:
    """Words added to a turn (`text` of a `transcript` event with `final: false`)."""

    speaker: str  # "caller" | "assistant"
    turn_id: str
    delta: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class TurnDone:
    """A whole turn, its words in timeline order (a `transcript` event with `final: true`)."""

    speaker: str
    turn_id: str
    text: str
    start_ms: int
    end_ms: int


class _Turn:
    __slots__ = ("end_ms", "pieces", "speaker", "start_ms", "turn_id")

    def __init__(self, speaker: str, turn_id: str, start_ms: int, end_ms: int) -> None:
        self.speaker, self.turn_id = speaker, turn_id
        self.start_ms, self.end_ms = start_ms, end_ms
        self.pieces: list[tuple[int, int, str]] = []  # (start_ms, arrival, text)


class TranscriptGrouper:
    """GPT-Live's transcript deltas grouped into turns, by speaker change and time gaps.

    GPT-Live sends words with their place on the session timeline and never says when a turn
    is over; both sides may talk at once (full duplex), and a transcript may arrive after the
    other side's later words. So each speaker has at most one open turn, and a turn ends when:
    - the same speaker goes on after more than `gap_ms` of silence, or after the other side
      spoke in between (a new turn begins);
    - the other side has spoken for `settle_ms` past the turn's last word (a speaker change;
      the wait lets late words of the turn still join it);
    - the timeline (`advance`, or any later word) is more than `gap_ms` past its last word;
    - `flush()` (the session ends).
    Words that arrive out of order still join their turn; the final text is in timeline order.
    """

    def __init__(self, *, gap_ms: int = 1200, settle_ms: int = 400, id_prefix: str = "") -> None:
        self.gap_ms, self.settle_ms, self.id_prefix = gap_ms, settle_ms, id_prefix
        self._open: dict[str, _Turn] = {}
        self._recent: dict[str, deque[_Turn]] = {"caller": deque(maxlen=8),
                                                  "assistant": deque(maxlen=8)}
        self._turns = 0
        self._arrivals = 0
        self.horizon_ms = 0  # the latest point of the timeline any word reached

    def add(self, event: Transcript) -> list[TurnDelta | TurnDone]:
        """One delta in; out: the speaker's turn it ends (if any), the delta as part of its
        turn, then the turns its words complete (a delta always comes before its turn's end)."""
        speaker = event.speaker
        turn = self._open.get(speaker)
        start = event.start_ms
        if start is None:
            start = turn.end_ms if turn is not None else self.horizon_ms
        end = max(event.end_ms if event.end_ms is not None else start, start)
        out: list[TurnDelta | TurnDone] = []
        if turn is not None and not self._continues(turn, start):
            out.append(self._close(turn))
            turn = None
        if turn is None:
            self._turns += 1
            turn = _Turn(speaker, f"{self.id_prefix}{speaker}_{self._turns}", start, end)
            self._open[speaker] = turn
            self._recent[speaker].append(turn)
        self._arrivals += 1
        turn.pieces.append((start, self._arrivals, event.delta))
        turn.start_ms, turn.end_ms = min(turn.start_ms, start), max(turn.end_ms, end)
        self.horizon_ms = max(self.horizon_ms, end)
        out.append(TurnDelta(speaker, turn.turn_id, event.delta, start, end))
        out.extend(self._settle())
        return out

    def advance(self, timeline_ms: int) -> list[TurnDone]:
        """The timeline reached this point (e.g. the input audio sent): close what is over."""
        self.horizon_ms = max(self.horizon_ms, timeline_ms)
        return self._settle()

    def flush(self) -> list[TurnDone]:
        """Every open turn, done (the session ended)."""
        return [self._close(t) for t in sorted(self._open.values(), key=lambda t: t.start_ms)]

    def _continues(self, turn: _Turn, start: int) -> bool:
        if start <= turn.end_ms:  # a late word inside the turn's own span
            return True
        if start - turn.end_ms > self.gap_ms:
            return False
        other = "assistant" if turn.speaker == "caller" else "caller"
        # the other side spoke between this turn's last word and this one: a new turn
        return not any(t.start_ms < start and t.end_ms > turn.end_ms
                       for t in self._recent[other])

    def _settle(self) -> list[TurnDone]:
        done = []
        for turn in sorted(self._open.values(), key=lambda t: t.start_ms):
            other = self._open.get("assistant" if turn.speaker == "caller" else "caller")
            if self.horizon_ms - turn.end_ms > self.gap_ms or (
                    other is not None and other.end_ms - turn.end_ms >= self.settle_ms):
                done.append(self._close(turn))
        return done

    def _close(self, turn: _Turn) -> TurnDone:
        del self._open[turn.speaker]
        text = "".join(piece for _, _, piece in sorted(turn.pieces)).strip()
        return TurnDone(turn.speaker, turn.turn_id, text, turn.start_ms, turn.end_ms)
