"""A local stand-in for OpenAI GPT-Live, for trying the bridge and for its tests.

It speaks the GPT-Live protocol on `/v1/live/sessions` (`session.start` first, then audio both
ways, transcripts, usage, Responses-delegated tool calls, `session.close`) and refuses what the
service refuses (an unknown key, a change of an immutable setting, audio before the start). Its
voice is an echo assistant in GPT-Live's style:

- the output is one continuous track at real time: a `session.output_audio.delta` every
  `chunk_ms` (100 ms), silence included, from `session.started` to the end;
- it takes its own turns: an energy VAD on the caller's mu-law finds each caller turn, and once
  the caller has been quiet for `silence_ms` it plays that turn back;
- it yields on its own when the caller talks over it (`barge_in_ms` of speech): the rest of what
  it was saying is dropped, and its transcript holds only the words it got to say;
- told by `session.instructions.append` to greet the caller, or to say goodbye, it speaks (a
  `greeting_ms` tone), as does commentary.

Everything happens on the session timeline: milliseconds of caller audio received since the
start (GPT-Live's timeline also advances only while input arrives). A chunk of output goes out
once the input has covered its span of the timeline (so the output stalls when the input does),
and `pace` sets its wall-clock speed (1 = real time; 0 = as fast as the input allows, for tests
that need no real pace). Turns, barge-ins and every timestamp depend on the input alone, so the
events are the same for the same input, whatever the machine's load.

    python -m server.testing.live_standin --port 8766
    # then OPENAI_LIVE_URL=ws://127.0.0.1:8766/v1/live/sessions
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from server.testing.audio import BYTES_PER_MS, FRAME_BYTES, FRAME_MS, ULAW_SILENCE, level, tone
from server.testing.standin import EventHook, ToolCallScript, load_scenario


@dataclass(frozen=True)
class LiveStandinOptions:
    api_key: str | None = None  # when set, the handshake must carry this Bearer key (else 401)
    handshake_status: int | None = None  # refuse every handshake with this HTTP status
    models: tuple[str, ...] = ("gpt-live-1", "gpt-live-1.1")
    chunk_ms: int = 100  # audio per session.output_audio.delta
    pace: float = 1.0  # output speed against the wall clock: 1 = real time, 0 = unpaced
    vad_level: int = 500  # mean |linear sample| of a 20 ms window above which it is speech
    silence_ms: int = 500  # the caller's turn is over after this much quiet
    barge_in_ms: int = 100  # caller speech over the model's voice for this long: it yields
    reply: str = "echo"  # "echo" each caller turn, a "tone" instead, or "silent"
    greeting_ms: int = 600  # tone length when told to greet, and for commentary
    tool_reply_ms: int = 400  # tone length of the answer after the tool results
    usage_interval_ms: int = 1000  # a session.usage.updated per this much timeline
    session_lifetime_ms: int | None = None  # timeline ms; then session.closed `expired`
    expires_in: int = 3600  # seconds: `expires_at` in session.started (reported only)
    check_events: EventHook | None = None  # sees every event both ways (tests: SDK validation)
    # Delegation (see server.testing.standin.ToolCallScript): caller turn N (1-based) ...
    tool_calls: Mapping[int, ToolCallScript] = field(default_factory=dict)
    # ... or appended context / a backend user message that contains this text
    text_tool_calls: Mapping[str, ToolCallScript] = field(default_factory=dict)


LIVE_SESSIONS: web.AppKey[list[LiveStandinSession]] = web.AppKey("live_standin_sessions")
_OPTIONS: web.AppKey[LiveStandinOptions] = web.AppKey("live_standin_options")
_OPENED: web.AppKey[asyncio.Queue[LiveStandinSession]] = web.AppKey("live_standin_opened")

PCMU_8K = {"type": "audio/pcmu", "rate": 8000}
INPUT_MAX_MESSAGES = 128
INPUT_MAX_TOKENS = 8192
INSTRUCTIONS_MAX_TOKENS = 16384
APPEND_MAX_TOKENS = 500
CONTEXT_WINDOW_TOKENS = 32768  # for session.usage.updated's usage_ratio (an assumption)

# Keys each client event may carry at its top level.
EVENT_KEYS: dict[str, frozenset[str]] = {
    "session.start": frozenset({"session"}),
    "session.update": frozenset({"session"}),
    "session.input_audio.append": frozenset({"audio"}),
    "session.instructions.append": frozenset({"content", "delegation_id"}),
    "session.thinking.append": frozenset({"content", "delegation_id"}),
    "session.commentary.append": frozenset({"content", "delegation_id"}),
    "response.item.create": frozenset({"item"}),
    "response.create": frozenset(),
    "session.close": frozenset(),
}
# session.start's `session`: None = any value here (checked on its own where it matters).
START_KEYS: dict[str, Any] = {
    "model": None, "instructions": None, "input": None, "delegation": None,
    "safety_identifier": None, "store": None, "client": None, "triggers": None,
    "audio": {"format": {"type": None, "rate": None}, "output": {"voice": None}},
}
UPDATABLE = frozenset({"delegation", "triggers"})
RESPONSES_KEYS = frozenset({"model", "instructions", "max_output_tokens", "parallel_tool_calls",
                            "reasoning", "service_tier", "text", "tool_choice", "tools"})
FUNCTION_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
INPUT_PARTS = {"developer": ("input_text",), "user": ("input_text",),
               "assistant": ("output_text", "text")}
GREET = re.compile(r"\bgreet", re.IGNORECASE)
GOODBYE = re.compile(r"\bsay goodbye\b", re.IGNORECASE)


class _Refuse(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _tokens(text: str) -> int:
    """The stand-in's token count: four characters a token (the API counts rendered tokens)."""
    return (len(text) + 3) // 4


def _unknown_key(value: Any, allowed: Mapping[str, Any] | None, path: str) -> str | None:
    if allowed is None or not isinstance(value, dict):
        return None
    for key, inner in value.items():
        if key not in allowed:
            return f"{path}.{key}"
        found = _unknown_key(inner, allowed[key], f"{path}.{key}")
        if found:
            return found
    return None


def _words(text: str, start_ms: int, end_ms: int) -> list[tuple[str, int, int]]:
    """The text as transcript deltas ("caller", " turn", ...) spread evenly over a span."""
    words = text.split(" ")
    span = max(end_ms - start_ms, 0)
    return [((" " if i else "") + word, start_ms + span * i // len(words),
             start_ms + span * (i + 1) // len(words)) for i, word in enumerate(words)]


def backend_usage(calls: int) -> dict[str, Any]:
    """A backend response's `usage`, in the Responses API's field names. Deterministic so tests
    can assert totals: 300 input tokens (128 cached), 20 output tokens plus 15 per call."""
    output = 20 + 15 * calls
    return {"input_tokens": 300, "input_tokens_details": {"cached_tokens": 128,
                                                          "cache_write_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 8},
            "total_tokens": 300 + output}


class _Speech:
    """Something the model says, placed on the session timeline."""

    __slots__ = ("audio", "label", "start_ms", "words")

    def __init__(self, start_ms: int, audio: bytes, text: str, label: str) -> None:
        self.start_ms, self.audio, self.label = start_ms, audio, label
        self.words = deque(_words(text, start_ms, self.end_ms))

    @property
    def end_ms(self) -> int:
        return self.start_ms + len(self.audio) // BYTES_PER_MS


class LiveStandinSession:
    """One GPT-Live session. Only the connection handler reads the socket."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request,
                 options: LiveStandinOptions, number: int) -> None:
        self._ws = ws
        self._request = request
        self._options = options
        self._ids = count(1)
        self.id = f"live_standin_{number}"
        self.headers: Mapping[str, str] = request.headers
        self.received: list[dict[str, Any]] = []  # every client event (JSON objects)
        self.sent: list[dict[str, Any]] = []  # every server event but the audio deltas
        self.audio_deltas = 0  # session.output_audio.delta events sent
        self.closed = asyncio.Event()
        self.resource: dict[str, Any] | None = None  # the session, once started
        self.started = False
        self.timeline_ms = 0  # caller audio received since the start
        self.out_ms = 0  # output audio sent since the start
        self.stalled = False  # the output waits for input (the timeline stands still)
        self._heard_ms = 0  # the timeline the VAD has finished with: the output's limit
        self.barge_ins: list[int] = []  # timeline ms where the model yielded to the caller
        self.spoken: list[tuple[str, int, int]] = []  # (label, start_ms, end_ms) as played
        self.context: list[tuple[str, str, str | None]] = []  # (kind, content, delegation_id)
        self.tool_outputs: dict[str, str] = {}  # call_id -> output the client sent back
        self.pending_calls: dict[str, str] = {}  # call_id -> name, awaiting their outputs
        self.delegations: dict[str, str] = {}  # delegation id -> target
        self.close_reason: str | None = None  # once session.closed is sent
        self._ending = False
        self.turns = 0  # caller turns heard
        self._changed = asyncio.Condition()
        self._input = asyncio.Event()
        self._track: deque[_Speech] = deque()
        self._clock: asyncio.Task[None] | None = None
        self._window = bytearray()
        self._in_speech = False
        self._speech_start = 0
        self._quiet_ms = 0
        self._turn = bytearray()
        self._yielded = False  # the model already yielded to this caller turn
        self._next_usage = options.usage_interval_ms
        self._context_chars = 0
        self._delegation: str | None = None  # with calls pending
        self._backend_items: list[dict[str, Any]] = []  # user messages for the backend

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    # --- for tests ---

    async def wait_for(self, type: str, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """The count-th client event of this type, waiting for it if need be."""
        def found() -> list[dict[str, Any]]:
            return [e for e in self.received if e.get("type") == type]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(found()) >= count)
        return found()[count - 1]

    async def send(self, event: dict[str, Any], *, check: bool = True) -> None:
        """Send a server event; `check=False` exempts one a test malforms on purpose."""
        if event.get("type") != "session.output_audio.delta":  # the one without an event_id
            event.setdefault("event_id", self._id("event"))
            self.sent.append(event)
        else:
            self.audio_deltas += 1
        if check and self._options.check_events is not None:
            self._options.check_events("server", event)
        if not self._ws.closed:
            await self._ws.send_frame(orjson.dumps(event), WSMsgType.TEXT)

    async def end(self, reason: str) -> None:
        """End the session as the service does: `session.closed` with the usage, then close.
        Reasons: close_requested, expired, content, remote_hangup, connection_lost."""
        if self._ending:
            return
        self._ending = True
        await self._stop_clock()
        await self.send({"type": "session.closed", "reason": reason, "usage": self._usage(),
                         "session": self.resource or self._resource({})})
        self.close_reason = reason  # the handler stops reading (and returning closes the socket)
        await self._ws.close()

    def drop(self) -> None:
        """The connection dies: no session.closed, no close frame."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    async def close(self, code: int = 1000) -> None:
        """Close the socket with this code and nothing else."""
        await self._ws.close(code=code)

    # --- protocol ---

    async def serve(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type is WSMsgType.BINARY:
                    await self._error("invalid_json", "binary frames are not accepted: send "
                                      "each event as JSON text")
                    continue
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    event = orjson.loads(msg.data)
                    if not isinstance(event, dict):
                        raise ValueError
                except ValueError:
                    await self._error("invalid_json", "the message is not a JSON object")
                    continue
                if self._options.check_events is not None:
                    self._options.check_events("client", event)
                async with self._changed:
                    self.received.append(event)
                    self._changed.notify_all()
                event_id = event.get("event_id")
                try:
                    await self._handle(event)
                except _Refuse as r:
                    await self._error(r.code, r.message, r.param,
                                      event_id if isinstance(event_id, str) else None)
                if self.close_reason is not None:
                    break
        finally:
            try:  # a test server cancels this handler when the client drops
                await self._stop_clock()
            finally:
                self.closed.set()

    async def _error(self, code: str, message: str, param: str | None = None,
                     client_event_id: str | None = None) -> None:
        event: dict[str, Any] = {"type": "error", "error": {
            "type": "invalid_request_error", "code": code, "message": message, "param": param,
            "client_event_id": client_event_id}}
        if client_event_id is not None:
            event["client_event_id"] = client_event_id
        await self.send(event)

    def _ack_fields(self, event: Mapping[str, Any]) -> dict[str, Any]:
        event_id = event.get("event_id")
        return {"client_event_id": event_id} if isinstance(event_id, str) else {}

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if not isinstance(kind, str) or kind not in EVENT_KEYS:
            raise _Refuse("unknown_event_type", f"unknown client event {kind!r}", "type")
        for key in event:
            if key not in ("type", "event_id") and key not in EVENT_KEYS[kind]:
                raise _Refuse("unknown_parameter", f"Unknown parameter: '{key}'.", key)
        if kind == "session.start":
            await self._start(event)
            return
        if not self.started:  # nothing is taken, nothing buffered, before the start
            raise _Refuse("session_not_started",
                          "Send session.start and wait for session.started first.", "type")
        if kind == "session.input_audio.append":
            await self._audio(event.get("audio"))
        elif kind == "session.update":
            await self._update(event)
        elif kind in ("session.instructions.append", "session.thinking.append",
                      "session.commentary.append"):
            await self._append(kind, event)
        elif kind == "response.item.create":
            await self._item_create(event.get("item"))
        elif kind == "response.create":
            await self._response_create()
        elif kind == "session.close":
            await self.end("close_requested")

    # --- start and update ---

    def _resource(self, session: Mapping[str, Any]) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "id": self.id, "expires_at": int(time.time()) + self._options.expires_in,
            "model": session.get("model") or "gpt-live-1", "status": "active",
            "audio": {"format": PCMU_8K, "output": {"voice": (session.get("audio") or {})
                                                    .get("output", {}).get("voice", "marin")}},
            "instructions": session.get("instructions") or ""}
        for key in ("input", "delegation"):
            if session.get(key) is not None:
                resource[key] = session[key]
        return resource

    async def _start(self, event: dict[str, Any]) -> None:
        if self.started:
            raise _Refuse("session_already_started", "The session has already started.",
                          "type")
        session = event.get("session")
        if not isinstance(session, dict):
            raise _Refuse("missing_required_parameter",
                          "Missing required parameter: 'session'.", "session")
        unknown = _unknown_key(session, START_KEYS, "session")
        if unknown:
            raise _Refuse("unknown_parameter", f"Unknown parameter: '{unknown}'.", unknown)
        model = session.get("model")
        if not isinstance(model, str):
            raise _Refuse("missing_required_parameter",
                          "Missing required parameter: 'session.model'.", "session.model")
        if model not in self._options.models:
            raise _Refuse("model_not_found", f"The model '{model}' does not exist.",
                          "session.model")
        audio = session.get("audio")
        fmt = audio.get("format") if isinstance(audio, dict) else None
        if fmt != PCMU_8K:
            raise _Refuse("invalid_value", f"The stand-in takes audio/pcmu at 8000 Hz only "
                          f"(got {fmt!r}).", "session.audio.format")
        voice = (audio.get("output") or {}).get("voice") if isinstance(audio, dict) else None
        if voice is not None and not isinstance(voice, str):
            raise _Refuse("invalid_type", "The voice must be a string.",
                          "session.audio.output.voice")
        instructions = session.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _Refuse("invalid_type", "instructions must be a string.",
                          "session.instructions")
        if isinstance(instructions, str) and _tokens(instructions) > INSTRUCTIONS_MAX_TOKENS:
            raise _Refuse("string_above_max_length", f"instructions exceed "
                          f"{INSTRUCTIONS_MAX_TOKENS} tokens.", "session.instructions")
        self._check_input(session.get("input"))
        self._check_delegation(session.get("delegation"), "session.delegation", start=True)
        self.started = True
        self.resource = self._resource(session)
        self._context_chars = len(instructions or "") + sum(
            len(part.get("text", "")) for item in session.get("input") or ()
            for part in item["content"])
        await self.send({"type": "session.started", "session": self.resource,
                         **self._ack_fields(event)})
        self._clock = asyncio.get_running_loop().create_task(self._run_clock())

    def _check_input(self, items: Any) -> None:
        if items is None:
            return
        if not isinstance(items, list):
            raise _Refuse("invalid_type", "input must be an array.", "session.input")
        if len(items) > INPUT_MAX_MESSAGES:
            raise _Refuse("array_above_max_length", f"input has {len(items)} messages; at most "
                          f"{INPUT_MAX_MESSAGES} are accepted.", "session.input")
        total = 0
        for n, item in enumerate(items):
            where = f"session.input[{n}]"
            if not isinstance(item, dict):
                raise _Refuse("invalid_type", "an input item must be an object.", where)
            for key in item:
                if key not in ("type", "role", "content", "id", "status"):
                    raise _Refuse("unknown_parameter", f"Unknown parameter: '{where}.{key}'.",
                                  f"{where}.{key}")
            role = item.get("role")
            if item.get("type", "message") != "message" or role not in INPUT_PARTS:
                raise _Refuse("invalid_value", "input takes developer, user and assistant "
                              "messages only.", f"{where}.role")
            content = item.get("content")
            if not isinstance(content, list) or len(content) != 1 \
                    or not isinstance(content[0], dict):
                raise _Refuse("invalid_value", "an input message takes one text part.",
                              f"{where}.content")
            part = content[0]
            for key in part:
                if key not in ("type", "text"):
                    raise _Refuse("unknown_parameter", f"Unknown parameter: "
                                  f"'{where}.content[0].{key}'.", f"{where}.content[0].{key}")
            if part.get("type", INPUT_PARTS[role][0]) not in INPUT_PARTS[role] \
                    or not isinstance(part.get("text"), str):
                raise _Refuse("invalid_value", f"a {role} message takes "
                              f"{' or '.join(INPUT_PARTS[role])} text.", f"{where}.content[0]")
            total += _tokens(part["text"]) + 3  # the message's rendering
        if total > INPUT_MAX_TOKENS:
            raise _Refuse("input_too_large", f"input has about {total} tokens; at most "
                          f"{INPUT_MAX_TOKENS} are accepted.", "session.input")

    def _check_delegation(self, delegation: Any, where: str, start: bool) -> None:
        if delegation is None:
            return
        if not isinstance(delegation, dict):
            raise _Refuse("invalid_type", "delegation must be an object.", where)
        kind = delegation.get("type")
        allowed = {"type", "acknowledgement_delay_ms"} | ({"responses"} if kind == "responses"
                                                          else set())
        for key in delegation:
            if key not in allowed:
                raise _Refuse("unknown_parameter", f"Unknown parameter: '{where}.{key}'.",
                              f"{where}.{key}")
        if kind not in ("client", "responses"):
            raise _Refuse("invalid_value", f"The stand-in delegates to client or responses, "
                          f"not {kind!r}.", f"{where}.type")
        if kind == "client":
            return
        responses = delegation.get("responses")
        if not isinstance(responses, dict) or (start and not isinstance(
                responses.get("model"), str)):
            raise _Refuse("missing_required_parameter", f"Missing required parameter: "
                          f"'{where}.responses.model'.", f"{where}.responses.model")
        for key in responses:
            if key not in RESPONSES_KEYS:
                raise _Refuse("unknown_parameter", f"Unknown parameter: "
                              f"'{where}.responses.{key}'.", f"{where}.responses.{key}")
        tools = responses.get("tools", [])
        if not isinstance(tools, list):
            raise _Refuse("invalid_type", "tools must be an array.", f"{where}.responses.tools")
        for n, tool in enumerate(tools):
            at = f"{where}.responses.tools[{n}]"
            if not isinstance(tool, dict) or tool.get("type") != "function" \
                    or not isinstance(tool.get("name"), str):
                raise _Refuse("invalid_value", "The stand-in takes function tools with a name "
                              "only.", at)
            for key in tool:
                if key not in FUNCTION_KEYS:
                    raise _Refuse("unknown_parameter", f"Unknown parameter: '{at}.{key}'.",
                                  f"{at}.{key}")

    def _delegation_type(self) -> str:
        delegation = (self.resource or {}).get("delegation")
        return str(delegation.get("type")) if isinstance(delegation, dict) else "client"

    async def _update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise _Refuse("missing_required_parameter",
                          "Missing required parameter: 'session'.", "session")
        for key in session:
            if key in START_KEYS and key not in UPDATABLE:
                raise _Refuse("immutable_field_update", f"'session.{key}' cannot change after "
                              f"the session started.", f"session.{key}")
            if key not in UPDATABLE:
                raise _Refuse("unknown_parameter", f"Unknown parameter: 'session.{key}'.",
                              f"session.{key}")
        delegation = session.get("delegation")
        if delegation is not None:
            self._check_delegation(delegation, "session.delegation", start=False)
            if delegation.get("type") != self._delegation_type():
                raise _Refuse("immutable_field_update", "The delegation mode cannot change "
                              "after the session started.", "session.delegation.type")
            assert self.resource is not None
            current = self.resource.setdefault("delegation", {"type": "client"})
            if "responses" in delegation:
                current["responses"] = {**current.get("responses", {}),
                                        **delegation["responses"]}
            if "acknowledgement_delay_ms" in delegation:
                current["acknowledgement_delay_ms"] = delegation["acknowledgement_delay_ms"]
        await self.send({"type": "session.updated", "session": self.resource,
                         **self._ack_fields(event)})

    # --- audio in: the timeline, the VAD, the caller's turns ---

    async def _audio(self, payload: Any) -> None:
        try:
            audio = base64.b64decode(payload if isinstance(payload, str) else "", validate=True)
        except (binascii.Error, ValueError):
            raise _Refuse("invalid_audio", "audio is not valid base64", "audio") from None
        if not audio:
            raise _Refuse("invalid_audio", "audio is empty", "audio")
        self._window += audio
        while len(self._window) >= FRAME_BYTES:
            window = bytes(self._window[:FRAME_BYTES])
            del self._window[:FRAME_BYTES]
            self.timeline_ms += FRAME_MS
            await self._vad(window)  # before the output may play this span: deterministic
            self._heard_ms = self.timeline_ms
            self._input.set()
            while self.timeline_ms >= self._next_usage:
                await self._usage_update(self._next_usage)
                self._next_usage += self._options.usage_interval_ms
            lifetime = self._options.session_lifetime_ms
            if lifetime is not None and self.timeline_ms >= lifetime:
                await self.end("expired")
                return

    async def _vad(self, window: bytes) -> None:
        loud = level(window) > self._options.vad_level
        now = self.timeline_ms
        if loud and not self._in_speech:
            self._in_speech, self._speech_start, self._quiet_ms = True, now - FRAME_MS, 0
            self._turn = bytearray()
            self._yielded = False
        if not self._in_speech:
            return
        self._turn += window
        self._quiet_ms = 0 if loud else self._quiet_ms + FRAME_MS
        if not self._yielded and now - self._speech_start >= self._options.barge_in_ms \
                and self._quiet_ms == 0:
            self._yielded = True
            self._yield(now)
        if self._quiet_ms >= self._options.silence_ms:
            self._in_speech = False
            end = now - self._quiet_ms
            speech = bytes(self._turn[:len(self._turn) - self._quiet_ms * BYTES_PER_MS])
            await self._caller_turn(self._speech_start, end, speech)

    def _yield(self, at_ms: int) -> None:
        """The caller talks over the model: it stops, the rest of what it meant to say goes."""
        at = max(at_ms, self.out_ms)
        if not any(s.end_ms > at for s in self._track):
            return
        self.barge_ins.append(at)
        kept: deque[_Speech] = deque()
        for speech in self._track:
            if speech.start_ms >= at:
                continue
            speech.audio = speech.audio[:(at - speech.start_ms) * BYTES_PER_MS]
            while speech.words and speech.words[-1][1] >= at:
                speech.words.pop()
            kept.append(speech)
        self._track = kept

    async def _caller_turn(self, start: int, end: int, speech: bytes) -> None:
        self.turns += 1
        text = f"caller turn {self.turns} ({end - start} ms)"
        self._context_chars += len(text)
        for delta, word_start, word_end in _words(text, start, end):
            await self.send({"type": "session.input_transcript.delta", "delta": delta,
                             "start_ms": word_start, "end_ms": word_end})
        script = self._options.tool_calls.get(self.turns)
        if script is not None:
            await self._delegate(script)
        elif self._options.reply == "echo" and speech:
            self._say(speech, f"echo of caller turn {self.turns} ({end - start} ms)", "echo")
        elif self._options.reply == "tone":
            self._say(tone(600), "tone (600 ms)", "tone")

    async def _usage_update(self, at_ms: int) -> None:
        ratio = min(self._context_chars / 4 / CONTEXT_WINDOW_TOKENS, 1.0)
        await self.send({"type": "session.usage.updated", "usage": {"seconds": at_ms / 1000},
                         "context_window": {"usage_ratio": round(ratio, 6)}})

    def _usage(self) -> dict[str, Any]:
        return {"seconds": self.timeline_ms / 1000}

    # --- audio out: one continuous track ---

    def _say(self, audio: bytes, text: str, label: str) -> None:
        """Queue speech after whatever the model is saying, from the timeline's present on."""
        start = max(self.timeline_ms, self.out_ms, *(s.end_ms for s in self._track))
        self._track.append(_Speech(start, audio, text, label))
        self._context_chars += len(text)

    async def _run_clock(self) -> None:
        """A chunk per `chunk_ms` (at `pace`), once the input has covered its span."""
        loop = asyncio.get_running_loop()
        chunk_ms = self._options.chunk_ms
        step = chunk_ms / 1000 / self._options.pace if self._options.pace > 0 else 0.0
        due = loop.time()
        while True:
            while self._heard_ms < self.out_ms + chunk_ms:  # no input, no timeline, no output
                self.stalled = True
                self._input.clear()
                await self._input.wait()
                due = max(due, loop.time())
            self.stalled = False
            if step:
                await asyncio.sleep(max(due - loop.time(), 0))
                due += step
            await self._play(chunk_ms)

    async def _play(self, chunk_ms: int) -> None:
        start, end = self.out_ms, self.out_ms + chunk_ms
        out = bytearray([ULAW_SILENCE]) * (chunk_ms * BYTES_PER_MS)
        words: list[tuple[str, int, int]] = []
        for speech in self._track:
            if speech.start_ms >= end or speech.end_ms <= start:
                continue
            lo, hi = max(start, speech.start_ms), min(end, speech.end_ms)
            out[(lo - start) * BYTES_PER_MS:(hi - start) * BYTES_PER_MS] = \
                speech.audio[(lo - speech.start_ms) * BYTES_PER_MS:
                             (hi - speech.start_ms) * BYTES_PER_MS]
            while speech.words and speech.words[0][1] < end:
                words.append(speech.words.popleft())
        while self._track and self._track[0].end_ms <= end:
            done = self._track.popleft()
            self.spoken.append((done.label, done.start_ms, done.end_ms))
        self.out_ms = end
        await self.send({"type": "session.output_audio.delta",
                         "delta": base64.b64encode(out).decode()})
        for delta, word_start, word_end in words:
            await self.send({"type": "session.output_transcript.delta", "delta": delta,
                             "start_ms": word_start, "end_ms": word_end})

    async def _stop_clock(self) -> None:
        task, self._clock = self._clock, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- appended context ---

    async def _append(self, kind: str, event: dict[str, Any]) -> None:
        content, delegation_id = event.get("content"), event.get("delegation_id")
        if not isinstance(content, str):
            raise _Refuse("missing_required_parameter", "Missing required parameter: "
                          "'content'.", "content")
        if _tokens(content) > APPEND_MAX_TOKENS:
            raise _Refuse("string_above_max_length", f"content exceeds {APPEND_MAX_TOKENS} "
                          f"tokens.", "content")
        if delegation_id is not None:
            if self._delegation_type() == "responses":
                raise _Refuse("invalid_value", "Non-null delegation_id is not accepted with "
                              "Responses delegation.", "delegation_id")
            if delegation_id not in self.delegations:
                raise _Refuse("invalid_value", f"Unknown delegation_id {delegation_id!r}.",
                              "delegation_id")
        self.context.append((kind.split(".")[1], content, delegation_id))
        self._context_chars += len(content)
        await self.send({"type": kind.replace(".append", ".appended"),
                         "start_ms": self.timeline_ms, "end_ms": self.timeline_ms,
                         **self._ack_fields(event)})
        script = self._text_script(content)
        if script is not None:
            await self._delegate(script)
        elif kind == "session.instructions.append" and GREET.search(content):
            ms = self._options.greeting_ms
            self._say(tone(ms), f"greeting ({ms} ms)", "greeting")
        elif kind == "session.instructions.append" and GOODBYE.search(content):
            ms = self._options.greeting_ms
            self._say(tone(ms), f"goodbye ({ms} ms)", "goodbye")
        elif kind == "session.commentary.append":
            ms = self._options.greeting_ms
            self._say(tone(ms), f"commentary ({ms} ms)", "commentary")

    def _text_script(self, text: str) -> ToolCallScript | None:
        for needle, script in self._options.text_tool_calls.items():
            if needle in text:
                return script
        return None

    # --- delegation ---

    async def _delegate(self, script: ToolCallScript) -> None:
        """Hand a task to the backend: with Responses delegation, its function calls wrapped in
        `response.event`; with client delegation, only `session.delegation.created`."""
        if script.say_ms:
            self._say(tone(script.say_ms), f"let me check ({script.say_ms} ms)", "let me check")
        delegation_id = self._id("deleg")
        target = self._delegation_type()
        self.delegations[delegation_id] = target
        delegation: dict[str, Any] = {"id": delegation_id, "target": target,
                                      "type": "delegation"}
        if target == "client":
            await self.send({"type": "session.delegation.created", "delegation": delegation,
                             "offset_ms": self.timeline_ms})
            return
        response_id = self._id("resp")
        delegation["response_id"] = response_id
        await self.send({"type": "session.delegation.created", "delegation": delegation,
                         "offset_ms": self.timeline_ms})
        backend = _Backend(self, delegation_id, response_id)
        await backend.lifecycle("response.created", "in_progress")
        for index, (name, arguments) in enumerate(script.calls):
            args = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            call_id = self._id("call")
            await backend.function_call(index, self._id("fc"), call_id, name, args)
            self.pending_calls[call_id] = name
        await backend.lifecycle("response.completed", "completed",
                                backend_usage(len(script.calls)))
        self._delegation = delegation_id
        if not script.calls:  # nothing for the client to run: the backend answers at once
            await self._answer(delegation_id, "nothing to call")

    async def _item_create(self, item: Any) -> None:
        if self._delegation_type() != "responses":
            raise _Refuse("invalid_request", "response.item.create requires Responses "
                          "delegation.", "type")
        if not isinstance(item, dict):
            raise _Refuse("missing_required_parameter", "Missing required parameter: 'item'.",
                          "item")
        kind = item.get("type")
        if kind == "function_call_output":
            for key in item:
                if key not in ("type", "call_id", "output", "id", "status"):
                    raise _Refuse("unknown_parameter", f"Unknown parameter: 'item.{key}'.",
                                  f"item.{key}")
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise _Refuse("missing_required_parameter", "A function_call_output takes a "
                              "call_id and an output string.", "item")
            if call_id not in self.pending_calls:
                raise _Refuse("invalid_value", f"No pending function call with call_id "
                              f"{call_id!r}.", "item.call_id")
            if call_id in self.tool_outputs:
                raise _Refuse("invalid_value", f"call_id {call_id!r} already has an output.",
                              "item.call_id")
            self.tool_outputs[call_id] = output
        elif kind == "message" and item.get("role") == "user":
            self._backend_items.append(item)
        else:
            raise _Refuse("invalid_value", "The stand-in takes function_call_output items and "
                          "user messages.", "item.type")

    async def _response_create(self) -> None:
        if self._delegation_type() != "responses":
            raise _Refuse("invalid_request", "response.create requires Responses delegation.",
                          "type")
        missing = [c for c in self.pending_calls if c not in self.tool_outputs]
        answered = [c for c in self.pending_calls if c in self.tool_outputs]
        if missing:
            raise _Refuse("invalid_value", f"Function calls without an output: "
                          f"{', '.join(missing)}.", "type")
        items, self._backend_items = self._backend_items, []
        texts = " ".join(str(part.get("text", "")) for item in items
                         for part in item.get("content") or () if isinstance(part, dict))
        script = self._text_script(texts) if texts else None
        if script is not None:
            await self._delegate(script)
            return
        if not answered and not items:
            raise _Refuse("invalid_value", "Nothing new for the backend: send function call "
                          "outputs or a user message first.", "type")
        answer = "; ".join(f"{self.pending_calls[c]} -> {self.tool_outputs[c][:60]}"
                           for c in answered) or f"noted {len(items)} message(s)"
        for call_id in answered:
            del self.pending_calls[call_id]
        await self._answer(self._delegation or self._id("deleg"), answer)

    async def _answer(self, delegation_id: str, answer: str) -> None:
        """The backend's final message, then the model says it (a tone, with the words)."""
        ms = self._options.tool_reply_ms
        text = f"answer ({ms} ms): {answer}"
        backend = _Backend(self, delegation_id, self._id("resp"))
        await backend.lifecycle("response.created", "in_progress")
        await backend.message(self._id("msg"), text)
        await backend.lifecycle("response.completed", "completed", backend_usage(0))
        self._say(tone(ms), text, "answer")


class _Backend:
    """One Responses response of the backend, sent as `response.event`s."""

    def __init__(self, session: LiveStandinSession, delegation_id: str,
                 response_id: str) -> None:
        self.session, self.delegation_id, self.response_id = session, delegation_id, response_id
        self._sequence = count(0)

    async def _send(self, nested: dict[str, Any]) -> None:
        await self.session.send({"type": "response.event", "delegation_id": self.delegation_id,
                                 "event": {**nested, "sequence_number": next(self._sequence)}})

    async def lifecycle(self, kind: str, status: str,
                        usage: dict[str, Any] | None = None) -> None:
        """A snapshot: as GPT-Live sends them, with no instructions, tools or output."""
        response: dict[str, Any] = {
            "id": self.response_id, "object": "response", "created_at": int(time.time()),
            "model": _backend_model(self.session), "status": status, "instructions": None,
            "output": [], "tools": [], "tool_choice": "auto", "parallel_tool_calls": True}
        if usage is not None:
            response["usage"] = usage
        await self._send({"type": kind, "response": response})

    async def function_call(self, index: int, item_id: str, call_id: str, name: str,
                            arguments: str) -> None:
        item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
                "arguments": "", "status": "in_progress"}
        await self._send({"type": "response.output_item.added", "output_index": index,
                          "item": item})
        await self._send({"type": "response.function_call_arguments.done", "item_id": item_id,
                          "output_index": index, "arguments": arguments})
        await self._send({"type": "response.output_item.done", "output_index": index,
                          "item": {**item, "arguments": arguments, "status": "completed"}})

    async def message(self, item_id: str, text: str) -> None:
        item = {"type": "message", "id": item_id, "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        await self._send({"type": "response.output_item.done", "output_index": 0,
                          "item": item})


def _backend_model(session: LiveStandinSession) -> str:
    delegation = (session.resource or {}).get("delegation") or {}
    model = (delegation.get("responses") or {}).get("model")
    return model if isinstance(model, str) else "unknown"


async def _live(request: web.Request) -> web.StreamResponse:
    options = request.app[_OPTIONS]
    if options.handshake_status:
        return web.Response(status=options.handshake_status, text="refused by the stand-in\n")
    if options.api_key and request.headers.get("Authorization") != f"Bearer {options.api_key}":
        return web.json_response({"error": {"type": "invalid_request_error",
                                            "code": "invalid_api_key",
                                            "message": "Incorrect API key provided."}},
                                 status=401)
    if request.query:  # GPT-Live takes no query parameters (the model is in session.start)
        key = next(iter(request.query))
        return web.json_response({"error": {"type": "invalid_request_error",
                                            "code": "unknown_parameter",
                                            "message": f"Unknown parameter: '{key}'.",
                                            "param": key}}, status=400)
    ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=16 << 20)
    await ws.prepare(request)
    sessions = request.app[LIVE_SESSIONS]
    session = LiveStandinSession(ws, request, options, len(sessions) + 1)
    sessions.append(session)
    request.app[_OPENED].put_nowait(session)
    await session.serve()
    return ws


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"name": "live-standin",
                              "sessions": len(request.app[LIVE_SESSIONS])})


async def next_live_session(app: web.Application, timeout: float = 5.0) -> LiveStandinSession:
    """The next session opened on this app that no earlier call returned."""
    async with asyncio.timeout(timeout):
        return await app[_OPENED].get()


def create_live_standin_app(options: LiveStandinOptions | None = None) -> web.Application:
    app = web.Application()
    app[_OPTIONS] = options or LiveStandinOptions()
    app[LIVE_SESSIONS] = []
    app[_OPENED] = asyncio.Queue()
    app.router.add_get("/v1/live/sessions", _live)
    app.router.add_get("/", _status)
    return app


def main(argv: list[str] | None = None, announce: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.live_standin",
                                     description="Local OpenAI GPT-Live stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument("--pace", type=float, default=1.0)
    parser.add_argument("--silence-ms", type=int, default=500)
    parser.add_argument("--reply", choices=("echo", "tone", "silent"), default="echo")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--scenario", default=None,
                        help="JSON file: tool calls to delegate on given turns / texts "
                             "(the Realtime stand-in's format)")
    args = parser.parse_args(argv)
    scripted = load_scenario(args.scenario) if args.scenario else {}
    options = LiveStandinOptions(api_key=args.api_key, chunk_ms=args.chunk_ms, pace=args.pace,
                                 silence_ms=args.silence_ms, reply=args.reply, **scripted)
    announce(f"GPT-Live stand-in: OPENAI_LIVE_URL=ws://{args.host}:{args.port}/v1/live/sessions")
    web.run_app(create_live_standin_app(options), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
