"""A local stand-in for OpenAI Realtime (GA), for trying the bridge and for its tests.

It speaks the subset of the GA protocol the bridge uses, and rejects what the real service
rejects (an `OpenAI-Beta` header, unknown session keys such as `temperature`, a truncation past the
generated audio). Its voice is an echo assistant: after each caller turn it answers with the
caller's own audio, so a person hears turn-taking and barge-in work.

VAD runs in audio time (bytes received), not wall time, so tests are deterministic.

    python -m server.testing.standin --port 8765   # then OPENAI_REALTIME_URL=ws://127.0.0.1:8765/v1/realtime
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Literal

import orjson
from aiohttp import WSMsgType, web

from server.testing.audio import BYTES_PER_MS, FRAME_BYTES, FRAME_MS, level, tone

WINDOW = FRAME_BYTES  # 20 ms of mu-law

# ("server", event) for each event the stand-in sends, ("client", event) for each JSON object it
# receives; e.g. server.testing.sdk_check.EventChecker(). It should collect, not raise.
EventHook = Callable[[Literal["server", "client"], Mapping[str, Any]], None]


@dataclass(frozen=True)
class StandinOptions:
    api_key: str | None = None  # when set, the handshake must carry this Bearer key (else 401)
    handshake_status: int | None = None  # refuse every handshake with this HTTP status
    handshake_delay: float = 0.0  # seconds before answering a handshake
    first_audio_delay: float = 0.0  # seconds from a response's start to its first audio
    answer_pings: bool = True  # False: a half-open connection (pings never get a pong)
    accept_sessions: int | None = None  # refuse (503) every handshake after this many sessions
    session_lifetime: float | None = None  # then `session_expired` and close 1001, as OpenAI
    chunk_ms: int = 100  # audio per response.output_audio.delta
    pace: float = 0.0  # 0: as fast as possible; x > 0: x times real time
    vad_level: int = 500  # mean |linear sample| of a 20 ms window above which it is speech
    reply: str = "echo"  # "echo" the caller's turn, "tone", or "stream" (see below)
    # "stream" (for load tests): from session.updated on, send `stream_frame()` every 20 ms of
    # real time as one delta, forever, with no VAD, on a clock of its own random phase (many
    # sessions do not send in lockstep); `on_audio` sees every appended chunk, `stream_late`
    # how late (s) each delta went out behind its clock. `stream_keep_audio=False` keeps no
    # append event and skips its base64 check: nothing per frame beyond the hook (the bench).
    stream_frame: Callable[[], bytes] | None = None
    on_audio: Callable[[bytes], None] | None = None
    stream_late: Callable[[float], None] | None = None
    stream_keep_audio: bool = True
    greeting_ms: int = 600  # tone length for a response.create with nothing to echo
    check_events: EventHook | None = None  # sees every event both ways (tests: SDK validation)
    # Function calling (see ToolCallScript): the response to caller turn N (1-based) ...
    tool_calls: Mapping[int, ToolCallScript] = field(default_factory=dict)
    # ... and the response.create that follows a user text item containing this text ("" = any)
    text_tool_calls: Mapping[str, ToolCallScript] = field(default_factory=dict)
    tool_reply_ms: int = 400  # tone length of the answer after function_call_output items


@dataclass(frozen=True)
class ToolCallScript:
    """A response that calls functions: `say_ms` of audio first ("let me check", or a goodbye
    before end_call), then each (name, arguments) as a function_call item; arguments that are
    not a str are sent as JSON, a str as is (so a test can send invalid JSON)."""

    calls: tuple[tuple[str, Any], ...]
    say_ms: int = 0


def tool_call(name: str, arguments: Any = None, say_ms: int = 0) -> ToolCallScript:
    """One function call in a response: `tool_call("lookup_order", {"order_id": "1"})`."""
    return ToolCallScript(((name, {} if arguments is None else arguments),), say_ms)


def load_scenario(path: str) -> dict[str, Any]:
    """StandinOptions fields from a JSON scenario file:
    `{"turns": {"1": {"say_ms": 600, "calls": [["lookup_order", {"order_id": "1234"}]]}},
      "text": {"1 2 3 4": {"calls": [["lookup_order", {"order_id": "1234"}]]}},
      "tool_reply_ms": 800}`"""
    with open(path, encoding="utf-8") as f:
        data = orjson.loads(f.read())

    def script(entry: Mapping[str, Any]) -> ToolCallScript:
        return ToolCallScript(tuple((str(n), a) for n, a in entry.get("calls", ())),
                              int(entry.get("say_ms", 0)))

    options: dict[str, Any] = {
        "tool_calls": {int(turn): script(e) for turn, e in data.get("turns", {}).items()},
        "text_tool_calls": {str(text): script(e) for text, e in data.get("text", {}).items()},
    }
    if "tool_reply_ms" in data:
        options["tool_reply_ms"] = int(data["tool_reply_ms"])
    return options


STANDIN_SESSIONS: web.AppKey[list[StandinSession]] = web.AppKey("standin_sessions")
_OPTIONS: web.AppKey[StandinOptions] = web.AppKey("standin_options")
_OPENED: web.AppKey[asyncio.Queue[StandinSession]] = web.AppKey("standin_opened")

ALLOWED_SESSION = {
    "type": None, "model": None, "output_modalities": None, "instructions": None,
    "tools": None, "tool_choice": None, "prompt": None, "max_output_tokens": None,
    "tracing": None, "truncation": None, "include": None,
    "audio": {
        "input": {"format": None, "turn_detection": None, "noise_reduction": None,
                  "transcription": None},
        "output": {"format": None, "voice": None, "speed": None},
    },
}
FORMATS = ({"type": "audio/pcmu"}, {"type": "audio/pcma"}, {"type": "audio/pcm", "rate": 24000})


class _Reject(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


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


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge the containers (audio, input, output); every setting inside is replaced whole."""
    for key, value in update.items():
        if key in ("audio", "input", "output") and isinstance(value, dict) \
                and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class StandinSession:
    """One Realtime session. Only the connection handler reads the socket."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request,
                 options: StandinOptions) -> None:
        self._ws = ws
        self._options = options
        self._ids = count(1)
        self.headers: Mapping[str, str] = request.headers
        self.model: str | None = request.query.get("model")
        self.received: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self.audio_bytes_received = 0
        self.session: dict[str, Any] = {
            "type": "realtime", "model": self.model, "output_modalities": ["audio"],
            "instructions": "",
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000},
                          "turn_detection": {"type": "server_vad", "threshold": 0.5,
                                             "prefix_padding_ms": 300,
                                             "silence_duration_ms": 200,
                                             "create_response": True,
                                             "interrupt_response": True}},
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
            },
        }
        self._changed = asyncio.Condition()
        self._window = bytearray()
        self._turn = bytearray()  # the caller's audio since speech started
        self._speaking = False
        self._silent_ms = 0
        self._user_item: str | None = None
        self._last_item: str | None = None
        self._audio_ms: dict[str, int] = {}  # assistant item -> ms of audio generated
        self.call_ids: set[str] = set()  # function calls the model issued (seen in sent events)
        self._turns = 0  # caller turns committed, numbered in their transcripts
        self._reply: dict[str, Any] | None = None  # the response's message item, once added
        self._reply_transcript = ""
        self.tool_outputs: dict[str, str] = {}  # call_id -> output the client sent back
        self._last_client_item: dict[str, Any] | None = None  # the last item the client created
        self._response: asyncio.Task[None] | None = None
        self._response_id: str | None = None
        self._streamer: asyncio.Task[None] | None = None
        self.updated_at: float | None = None  # loop time of the first session.updated
        self.errors: list[dict[str, Any]] = []  # every error event it sent (code, message)

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
        event.setdefault("event_id", self._id("event"))
        if check and self._options.check_events is not None:
            self._options.check_events("server", event)
        call_id = _issued_call(event)
        if call_id is not None:
            self.call_ids.add(call_id)
        if not self._ws.closed:
            await self._ws.send_frame(orjson.dumps(event), WSMsgType.TEXT)

    async def close(self, code: int = 1000) -> None:
        await self._ws.close(code=code)

    async def expire(self) -> None:
        """What OpenAI does at the 60-minute limit: `session_expired`, then close 1001."""
        await self._error("session_expired",
                          "Your session hit the maximum duration of 60 minutes.")
        await self._ws.close(code=1001)

    # --- protocol ---

    async def serve(self) -> None:
        if "OpenAI-Beta" in self.headers:  # the GA service refuses the beta shape outright
            await self._error("beta_api_shape_disabled",
                              "The beta Realtime API shape is disabled; use the GA interface.")
            await self._ws.close(code=4000)
            self.closed.set()
            return
        await self.send({"type": "session.created", "session": self.session})
        expiry = None
        if self._options.session_lifetime is not None:
            expiry = asyncio.get_running_loop().call_later(
                self._options.session_lifetime,
                lambda: asyncio.ensure_future(self.expire()))
        try:
            async for msg in self._ws:
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
                if self._options.reply == "stream" and not self._options.stream_keep_audio \
                        and event.get("type") == "input_audio_buffer.append":
                    self._streamed_audio(event)
                    continue
                await self._record(event)
                try:
                    await self._handle(event)
                except _Reject as r:
                    await self._error(r.code, r.message, r.param, event.get("event_id"))
        finally:
            if expiry is not None:
                expiry.cancel()
            try:  # a test server cancels this handler when the client drops
                await self._stop_response(None)
                await self.stop_streaming()
            finally:
                self.closed.set()

    async def _record(self, event: dict[str, Any]) -> None:
        async with self._changed:
            self.received.append(event)
            self._changed.notify_all()

    async def _error(self, code: str, message: str, param: str | None = None,
                     event_id: str | None = None) -> None:
        self.errors.append({"code": code, "message": message, "event_id": event_id})
        await self.send({"type": "error", "error": {
            "type": "invalid_request_error", "code": code, "message": message,
            "param": param, "event_id": event_id}})

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "session.update":
            await self._update(event.get("session"))
        elif kind == "input_audio_buffer.append":
            try:
                audio = base64.b64decode(str(event.get("audio", "")), validate=True)
            except (binascii.Error, ValueError):
                raise _Reject("invalid_value", "audio is not valid base64", "audio") from None
            self.audio_bytes_received += len(audio)
            if self._options.on_audio is not None:
                self._options.on_audio(audio)
            if self._options.reply == "stream":  # no VAD, before, during or after streaming
                return
            if self._detection() and self.session["audio"]["input"]["format"] == FORMATS[0]:
                await self._vad(audio)
        elif kind == "response.create":
            _check_response(event.get("response"))
            if self._response_id is not None:
                raise _Reject("conversation_already_has_active_response",
                              f"Conversation already has an active response in progress: "
                              f"{self._response_id}")
            last, self._last_client_item = self._last_client_item, None
            script = self._text_script(last)
            if script is not None:
                self._start_calls(script)
            elif last is not None and last.get("type") == "function_call_output":
                self._start_response(tone(self._options.tool_reply_ms), "answer")
            elif self._turn:
                self._start_response(bytes(self._turn), "echo")
            else:
                self._start_response(tone(self._options.greeting_ms), "tone")
        elif kind == "response.cancel":
            if self._response_id is None:
                raise _Reject("response_cancel_not_active", "no active response")
            await self._stop_response("client_cancelled")
        elif kind == "conversation.item.truncate":
            await self._truncate(event)
        elif kind == "conversation.item.create":
            await self._create_item(event)
        else:
            raise _Reject("unknown_event_type", f"unknown client event {kind!r}", "type")

    async def _update(self, update: Any) -> None:
        if not isinstance(update, dict):
            raise _Reject("missing_required_parameter", "missing session", "session")
        if update.get("type") != "realtime":
            raise _Reject("missing_required_parameter",
                          "session.type must be 'realtime'", "session.type")
        unknown = _unknown_key(update, ALLOWED_SESSION, "session")
        if unknown:
            raise _Reject("unknown_parameter", f"Unknown parameter: '{unknown}'.", unknown)
        for side in ("input", "output"):
            fmt = (update.get("audio") or {}).get(side, {}).get("format")
            if fmt is not None and fmt not in FORMATS:
                raise _Reject("invalid_value", f"unsupported format {fmt}",
                              f"session.audio.{side}.format")
        _merge(self.session, update)
        await self.send({"type": "session.updated", "session": self.session})
        loop = asyncio.get_running_loop()
        if self.updated_at is None:
            self.updated_at = loop.time()
            if self._options.reply == "stream":
                self._streamer = loop.create_task(self._stream_forever())

    async def _stream_forever(self) -> None:
        """Load-test voice: one 20 ms delta every 20 ms of real time, drift-free, the first at
        once, then at a random phase. Each delta is written as ready-made JSON (with a
        `check_events` hook it is built as an event and checked, as every other event is)."""
        make = self._options.stream_frame or (lambda: bytes([0xFF]) * WINDOW)
        response_id, item = self._id("resp"), self._id("item")
        self._audio_ms[item] = 0
        base = {"type": "response.output_audio.delta", "response_id": response_id,
                "item_id": item, "output_index": 0, "content_index": 0}
        head = orjson.dumps(base)[:-1] + b',"delta":"'
        tail = f'","event_id":"event_{item}_'.encode()
        check, late, ws = self._options.check_events, self._options.stream_late, self._ws
        loop = asyncio.get_running_loop()
        due = loop.time()
        sent = 0
        while True:
            sent += 1
            delta = base64.b64encode(make())
            if check is not None:
                check("server", {**base, "delta": delta.decode(),
                                 "event_id": f"event_{item}_{sent}"})
            if not ws.closed:
                await ws.send_frame(head + delta + tail + b"%d\"}" % sent, WSMsgType.TEXT)
            self._audio_ms[item] += FRAME_MS
            # the first delta at once, then on a clock of this session's own random phase
            due += FRAME_MS / 1000 * (1 + random.random() if sent == 1 else 1)
            await asyncio.sleep(max(due - loop.time(), 0))
            if late is not None:
                late(max(loop.time() - due, 0.0))

    def _streamed_audio(self, event: dict[str, Any]) -> None:
        """Stream mode, lean: hand the audio to the hook, keep nothing."""
        audio = base64.b64decode(event.get("audio") or b"")
        self.audio_bytes_received += len(audio)
        if self._options.on_audio is not None:
            self._options.on_audio(audio)

    async def stop_streaming(self) -> None:
        task, self._streamer = self._streamer, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _detection(self) -> dict[str, Any] | None:
        detection = self.session["audio"]["input"].get("turn_detection")
        return detection if isinstance(detection, dict) else None

    async def _vad(self, audio: bytes) -> None:
        self._window += audio
        detection = self._detection() or {}
        while len(self._window) >= WINDOW:
            window = bytes(self._window[:WINDOW])
            del self._window[:WINDOW]
            received_ms = (self.audio_bytes_received - len(self._window)) // BYTES_PER_MS
            loud = level(window) > self._options.vad_level
            if loud and not self._speaking:
                self._speaking, self._silent_ms = True, 0
                self._turn = bytearray()
                self._user_item = self._id("item")
                start = max(received_ms - 20 - int(detection.get("prefix_padding_ms", 300)), 0)
                await self.send({"type": "input_audio_buffer.speech_started",
                                 "audio_start_ms": start, "item_id": self._user_item})
                if self._response_id and detection.get("interrupt_response", True):
                    await self._stop_response("turn_detected")
            if not self._speaking:
                continue
            self._turn += window
            self._silent_ms = 0 if loud else self._silent_ms + 20
            if self._silent_ms >= int(detection.get("silence_duration_ms", 500)):
                # audio_end_ms: where the speech itself stopped, before the silence window
                await self._end_turn(received_ms - self._silent_ms, detection)

    async def _end_turn(self, end_ms: int, detection: dict[str, Any]) -> None:
        self._speaking = False
        item = self._user_item or self._id("item")
        previous, self._last_item = self._last_item, item
        await self.send({"type": "input_audio_buffer.speech_stopped",
                         "audio_end_ms": end_ms, "item_id": item})
        await self.send({"type": "input_audio_buffer.committed", "item_id": item,
                         "previous_item_id": previous})
        speech = bytes(self._turn[: len(self._turn) - self._silent_ms * BYTES_PER_MS])
        await self._user_turn(item, previous, speech)
        self._last_client_item = None
        if detection.get("create_response", True) and self._response_id is None:
            script = self._options.tool_calls.get(self._turns)
            if script is not None:
                self._start_calls(script)
            elif self._options.reply == "echo":
                self._start_response(speech, "echo")
            else:
                self._start_response(tone(600), "tone")

    async def _user_turn(self, item_id: str, previous: str | None, speech: bytes) -> None:
        """The committed turn as a conversation item, then its transcript if transcription is on.

        The transcript is deterministic ("caller turn 2 (1200 ms)") so tests can assert on it.
        """
        self._turns += 1
        item = {"id": item_id, "type": "message", "object": "realtime.item", "role": "user",
                "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self.send({"type": kind, "item": item, "previous_item_id": previous})
        if not isinstance(self.session["audio"]["input"].get("transcription"), dict):
            return
        ms = len(speech) // BYTES_PER_MS
        audio_tokens = max(ms // 100, 1)  # about 10 tokens a second of input audio
        await self.send({
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0,
            "transcript": f"caller turn {self._turns} ({ms} ms)",
            "usage": {"type": "tokens", "input_tokens": audio_tokens, "output_tokens": 6,
                      "total_tokens": audio_tokens + 6,
                      "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens}}})

    async def _create_item(self, event: dict[str, Any]) -> None:
        """Add a client item: a tool result, or a user/assistant turn carried into a new session."""
        item = event.get("item")
        if not isinstance(item, dict):
            raise _Reject("missing_required_parameter", "Missing required parameter: 'item'.",
                          "item")
        _check_item(item)
        if item["type"] == "function_call_output" and item["call_id"] not in self.call_ids:
            raise _Reject("invalid_value", f"Invalid value: '{item['call_id']}'. No tool call "
                          f"with this call_id was found in the conversation.", "item.call_id")
        if item["type"] == "function_call" and isinstance(item.get("call_id"), str):
            self.call_ids.add(item["call_id"])
        added = {**item, "id": item.get("id") or self._id("item"), "object": "realtime.item",
                 "status": "completed"}
        self._last_client_item = added
        if item["type"] == "function_call_output":
            self.tool_outputs[item["call_id"]] = item["output"]
        previous = event.get("previous_item_id")
        if not isinstance(previous, str) or previous == self._last_item:
            previous, self._last_item = self._last_item, added["id"]
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self.send({"type": kind, "item": added, "previous_item_id": previous})

    def _start_response(self, audio: bytes, label: str) -> None:
        """Answer with this audio; its transcript says what it is ("echo of 1200 ms")."""
        self._response_id = self._id("resp")
        transcript = f"{label} of {len(audio) // BYTES_PER_MS} ms"
        self._response = asyncio.get_running_loop().create_task(
            self._stream(self._response_id, audio, transcript))

    async def _stop_response(self, reason: str | None) -> None:
        """Cancel the response task; with a reason, tell the client it was cancelled."""
        task, response_id = self._response, self._response_id
        self._response = self._response_id = None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        reply, self._reply = self._reply, None
        if reason and response_id:
            output: list[dict[str, Any]] = []
            audio_ms = 0
            if reply is not None:
                audio_ms = self._audio_ms.get(reply["id"], 0)
                output = [{**reply, "status": "incomplete", "content": [
                    {"type": "output_audio", "transcript": self._reply_transcript}]}]
            await self.send({"type": "response.done", "response": {
                "id": response_id, "object": "realtime.response", "status": "cancelled",
                "status_details": {"type": "cancelled", "reason": reason}, "output": output,
                "output_modalities": ["audio"], "usage": usage_for(audio_ms)}})

    async def _stream(self, response_id: str, audio: bytes, transcript: str) -> None:
        item = self._id("item")
        self._audio_ms[item] = 0
        base = {"response_id": response_id, "item_id": item, "output_index": 0,
                "content_index": 0}
        await self.send({"type": "response.created", "response": {
            "id": response_id, "object": "realtime.response", "status": "in_progress",
            "output": [], "output_modalities": ["audio"]}})
        message, previous = await self._open_message(response_id, item, transcript)
        await self.send({"type": "response.content_part.added", **base,
                         "part": {"type": "audio", "transcript": ""}})
        words = transcript.split(" ")
        for n, word in enumerate(words):  # "echo ", "of ", "1200 ", "ms"
            await self.send({"type": "response.output_audio_transcript.delta", **base,
                             "delta": word if n == len(words) - 1 else word + " "})
        chunk = self._options.chunk_ms * BYTES_PER_MS
        loop = asyncio.get_running_loop()
        if self._options.first_audio_delay:  # the model's time to first audio
            await asyncio.sleep(self._options.first_audio_delay)
        started = loop.time()
        for offset in range(0, len(audio), chunk):
            piece = audio[offset:offset + chunk]
            await self.send({"type": "response.output_audio.delta", **base,
                             "delta": base64.b64encode(piece).decode()})
            self._audio_ms[item] += len(piece) // BYTES_PER_MS
            if self._options.pace > 0:
                due = started + self._audio_ms[item] / 1000 / self._options.pace
                await asyncio.sleep(max(due - loop.time(), 0))
            else:
                await asyncio.sleep(0)
        await self.send({"type": "response.output_audio.done", **base})
        await self.send({"type": "response.output_audio_transcript.done", **base,
                         "transcript": transcript})
        await self.send({"type": "response.content_part.done", **base,
                         "part": {"type": "audio", "transcript": transcript}})
        message = await self._close_message(response_id, message, transcript, previous)
        self._response = self._response_id = self._reply = None
        await self.send({"type": "response.done", "response": {
            "id": response_id, "object": "realtime.response", "status": "completed",
            "output": [message], "output_modalities": ["audio"],
            "usage": usage_for(self._audio_ms[item])}})

    # --- function calling ---

    def _text_script(self, item: Mapping[str, Any] | None) -> ToolCallScript | None:
        """The scripted calls for a user text item (a keypad entry), if any match."""
        if item is None or item.get("type") != "message" or item.get("role") != "user":
            return None
        text = " ".join(str(p.get("text", "")) for p in item.get("content") or ()
                        if isinstance(p, dict))
        for needle, script in self._options.text_tool_calls.items():
            if needle in text:
                return script
        return None

    def _start_calls(self, script: ToolCallScript) -> None:
        self._response_id = self._id("resp")
        self._response = asyncio.get_running_loop().create_task(
            self._stream_calls(self._response_id, script))

    async def _stream_calls(self, response_id: str, script: ToolCallScript) -> None:
        """A response with optional audio, then function_call items, in the GA event shapes."""
        await self.send({"type": "response.created", "response": {
            "id": response_id, "object": "realtime.response", "status": "in_progress",
            "output": [], "output_modalities": ["audio"]}})
        output: list[dict[str, Any]] = []
        audio_ms = 0
        if script.say_ms:
            output.append(await self._say(response_id, tone(script.say_ms)))
            audio_ms = script.say_ms
        for name, arguments in script.calls:
            args = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            output.append(await self._function_call(response_id, len(output), name, args))
        self._response = self._response_id = self._reply = None
        await self.send({"type": "response.done", "response": {
            "id": response_id, "object": "realtime.response", "status": "completed",
            "output": output, "output_modalities": ["audio"], "usage": usage_for(audio_ms)}})

    async def _open_message(self, response_id: str, item: str,
                            transcript: str) -> tuple[dict[str, Any], str | None]:
        """An assistant message item starts: added to the response and the conversation.
        Returns it and the item before it."""
        message: dict[str, Any] = {"id": item, "type": "message", "object": "realtime.item",
                                   "role": "assistant", "status": "in_progress", "content": []}
        previous, self._last_item = self._last_item, item
        self._reply, self._reply_transcript = message, transcript
        await self.send({"type": "response.output_item.added", "response_id": response_id,
                         "output_index": 0, "item": message})
        await self.send({"type": "conversation.item.added", "item": message,
                         "previous_item_id": previous})
        return message, previous

    async def _close_message(self, response_id: str, message: dict[str, Any], transcript: str,
                             previous: str | None) -> dict[str, Any]:
        """The assistant message item is complete: done in the response and the conversation.
        Returns the completed item."""
        message = {**message, "status": "completed",
                   "content": [{"type": "output_audio", "transcript": transcript}]}
        await self.send({"type": "response.output_item.done", "response_id": response_id,
                         "output_index": 0, "item": message})
        await self.send({"type": "conversation.item.done", "item": message,
                         "previous_item_id": previous})
        return message

    async def _say(self, response_id: str, audio: bytes) -> dict[str, Any]:
        """One spoken message item inside a response; returns the completed item."""
        item = self._id("item")
        self._audio_ms[item] = 0
        transcript = f"let me check ({len(audio) // BYTES_PER_MS} ms)"
        base = {"response_id": response_id, "item_id": item, "output_index": 0,
                "content_index": 0}
        message, previous = await self._open_message(response_id, item, transcript)
        chunk = self._options.chunk_ms * BYTES_PER_MS
        for offset in range(0, len(audio), chunk):
            piece = audio[offset:offset + chunk]
            await self.send({"type": "response.output_audio.delta", **base,
                             "delta": base64.b64encode(piece).decode()})
            self._audio_ms[item] += len(piece) // BYTES_PER_MS
            await asyncio.sleep(0)
        await self.send({"type": "response.output_audio.done", **base})
        await self.send({"type": "response.output_audio_transcript.done", **base,
                         "transcript": transcript})
        message = await self._close_message(response_id, message, transcript, previous)
        self._reply = None
        return message

    async def _function_call(self, response_id: str, index: int, name: str,
                             arguments: str) -> dict[str, Any]:
        """One function_call item: added, argument deltas, done; returns the completed item."""
        item_id, call_id = self._id("item"), self._id("call")
        item: dict[str, Any] = {"id": item_id, "type": "function_call", "object": "realtime.item",
                                "status": "in_progress", "name": name, "call_id": call_id,
                                "arguments": ""}
        previous, self._last_item = self._last_item, item_id
        base = {"response_id": response_id, "item_id": item_id, "output_index": index,
                "call_id": call_id}
        await self.send({"type": "response.output_item.added", "response_id": response_id,
                         "output_index": index, "item": item})
        await self.send({"type": "conversation.item.added", "item": item,
                         "previous_item_id": previous})
        half = len(arguments) // 2
        for delta in (arguments[:half], arguments[half:]):
            if delta:
                await self.send({"type": "response.function_call_arguments.delta", **base,
                                 "delta": delta})
        await self.send({"type": "response.function_call_arguments.done", **base,
                         "name": name, "arguments": arguments})
        item = {**item, "status": "completed", "arguments": arguments}
        await self.send({"type": "response.output_item.done", "response_id": response_id,
                         "output_index": index, "item": item})
        await self.send({"type": "conversation.item.done", "item": item,
                         "previous_item_id": previous})
        return item

    async def _truncate(self, event: dict[str, Any]) -> None:
        item, end_ms = event.get("item_id"), event.get("audio_end_ms")
        if not isinstance(item, str) or item not in self._audio_ms:
            raise _Reject("invalid_value", f"item {item!r} is not an assistant audio item",
                          "item_id")
        if not isinstance(end_ms, int) or not 0 <= end_ms <= self._audio_ms[item]:
            raise _Reject("invalid_value",
                          f"audio_end_ms {end_ms} exceeds the audio duration "
                          f"{self._audio_ms[item]} ms of item {item}", "audio_end_ms")
        await self.send({"type": "conversation.item.truncated", "item_id": item,
                         "content_index": event.get("content_index", 0),
                         "audio_end_ms": end_ms})


def usage_for(audio_ms: int) -> dict[str, Any]:
    """The `usage` of a response with this much audio, in OpenAI's field names.

    Deterministic so tests can assert totals: input is always 140 tokens (100 text + 40 audio,
    64 of them cached), output is 10 text tokens plus 20 audio tokens a second of audio.
    """
    audio_out = audio_ms // 50
    return {"total_tokens": 140 + 10 + audio_out, "input_tokens": 140,
            "output_tokens": 10 + audio_out,
            "input_token_details": {"text_tokens": 100, "audio_tokens": 40, "cached_tokens": 64,
                                    "cached_tokens_details": {"text_tokens": 48,
                                                              "audio_tokens": 16}},
            "output_token_details": {"text_tokens": 10, "audio_tokens": audio_out}}


def _issued_call(event: Mapping[str, Any]) -> str | None:
    """The call_id of a function call this server event issues, if it issues one."""
    item = event.get("item")
    if isinstance(item, dict) and item.get("type") == "function_call":
        call_id = item.get("call_id")
    elif event.get("type") == "response.function_call_arguments.done":
        call_id = event.get("call_id")
    else:
        return None
    return call_id if isinstance(call_id, str) else None


RESPONSE_KEYS = frozenset({
    "audio", "conversation", "input", "instructions", "max_output_tokens", "metadata",
    "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice", "tools"})
ITEM_KEYS = {  # per item type: required keys (str values unless "content"), then optional ones
    "message": (("role", "content"), ()),
    "function_call": (("name", "arguments"), ("call_id",)),
    "function_call_output": (("call_id", "output"), ()),
}
CONTENT_TYPES = {"user": ("input_text", "input_audio", "input_image"),
                 "assistant": ("output_text", "output_audio"), "system": ("input_text",)}
CONTENT_KEYS = frozenset({"type", "text", "audio", "transcript", "image_url", "detail"})


def _check_response(response: Any) -> None:
    """`response.create` may carry response settings (instructions, ...), nothing else."""
    if response is None:
        return
    if not isinstance(response, dict):
        raise _Reject("invalid_type", "response must be an object", "response")
    for key in response:
        if key not in RESPONSE_KEYS:
            raise _Reject("unknown_parameter", f"Unknown parameter: 'response.{key}'.",
                          f"response.{key}")


def _check_item(item: dict[str, Any]) -> None:
    """Refuse what the service refuses in `conversation.item.create`."""
    kind = item.get("type")
    if not isinstance(kind, str) or kind not in ITEM_KEYS:
        raise _Reject("invalid_value", f"Invalid value: {kind!r}. Supported values are: "
                      f"{', '.join(ITEM_KEYS)}.", "item.type")
    required, optional = ITEM_KEYS[kind]
    for key in item:
        if key not in ("id", "type", "object", "status", *required, *optional):
            raise _Reject("unknown_parameter", f"Unknown parameter: 'item.{key}'.", f"item.{key}")
    for key in required:
        if key != "content" and not isinstance(item.get(key), str):
            raise _Reject("missing_required_parameter",
                          f"Missing required parameter: 'item.{key}'.", f"item.{key}")
    if kind != "message":
        return
    allowed = CONTENT_TYPES.get(item["role"])
    if allowed is None:
        raise _Reject("invalid_value", f"Invalid value: '{item['role']}'.", "item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise _Reject("missing_required_parameter", "Missing required parameter: "
                      "'item.content'.", "item.content")
    for n, part in enumerate(content):
        where = f"item.content[{n}]"
        if not isinstance(part, dict) or part.get("type") not in allowed:
            got = part.get("type") if isinstance(part, dict) else part
            raise _Reject("invalid_value", f"Invalid value: {got!r}. A {item['role']} message "
                          f"takes {', '.join(allowed)}.", f"{where}.type")
        unknown = sorted(set(part) - CONTENT_KEYS)
        if unknown:
            raise _Reject("unknown_parameter", f"Unknown parameter: '{where}.{unknown[0]}'.",
                          f"{where}.{unknown[0]}")
        if part["type"] in ("input_text", "output_text") and not isinstance(part.get("text"),
                                                                             str):
            raise _Reject("missing_required_parameter",
                          f"Missing required parameter: '{where}.text'.", f"{where}.text")


async def _realtime(request: web.Request) -> web.StreamResponse:
    options = request.app[_OPTIONS]
    if options.handshake_delay:
        await asyncio.sleep(options.handshake_delay)
    if options.handshake_status:
        return web.Response(status=options.handshake_status, text="refused by the stand-in\n")
    if options.accept_sessions is not None and \
            len(request.app[STANDIN_SESSIONS]) >= options.accept_sessions:
        return web.Response(status=503, text="no more sessions (stand-in accept_sessions)\n")
    if options.api_key and request.headers.get("Authorization") != f"Bearer {options.api_key}":
        return web.json_response({"error": {"type": "invalid_request_error",
                                            "code": "invalid_api_key",
                                            "message": "Incorrect API key provided."}},
                                 status=401)
    ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=16 << 20,
                               autoping=options.answer_pings)
    await ws.prepare(request)
    session = StandinSession(ws, request, options)
    request.app[STANDIN_SESSIONS].append(session)
    request.app[_OPENED].put_nowait(session)
    await session.serve()
    return ws


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"name": "realtime-standin",
                              "sessions": len(request.app[STANDIN_SESSIONS])})


async def next_session(app: web.Application, timeout: float = 5.0) -> StandinSession:
    """The next session opened on this app that no earlier call returned."""
    async with asyncio.timeout(timeout):
        return await app[_OPENED].get()


def create_standin_app(options: StandinOptions | None = None) -> web.Application:
    app = web.Application()
    app[_OPTIONS] = options or StandinOptions()
    app[STANDIN_SESSIONS] = []
    app[_OPENED] = asyncio.Queue()
    app.router.add_get("/v1/realtime", _realtime)
    app.router.add_get("/", _status)
    return app


def main(argv: list[str] | None = None, announce: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.standin",
                                     description="Local OpenAI Realtime (GA) stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--reply", choices=("echo", "tone"), default="echo")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--handshake-delay", type=float, default=0.0,
                        help="seconds before answering each handshake (a real network's TLS)")
    parser.add_argument("--first-audio-delay", type=float, default=0.0,
                        help="seconds from a response's start to its first audio")
    parser.add_argument("--scenario", default=None,
                        help="JSON file: function calls to make on given turns / keypad texts")
    args = parser.parse_args(argv)
    scripted = load_scenario(args.scenario) if args.scenario else {}
    options = StandinOptions(api_key=args.api_key, chunk_ms=args.chunk_ms, pace=args.pace,
                             reply=args.reply, handshake_delay=args.handshake_delay,
                             first_audio_delay=args.first_audio_delay, **scripted)
    announce(f"Realtime stand-in: OPENAI_REALTIME_URL=ws://{args.host}:{args.port}/v1/realtime")
    web.run_app(create_standin_app(options), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
