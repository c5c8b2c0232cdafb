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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from server.testing.audio import level, tone

BYTES_PER_MS = 8
WINDOW = 160  # 20 ms of mu-law


@dataclass(frozen=True)
class StandinOptions:
    api_key: str | None = None  # when set, the handshake must carry this Bearer key (else 401)
    handshake_status: int | None = None  # refuse every handshake with this HTTP status
    handshake_delay: float = 0.0  # seconds before answering a handshake
    chunk_ms: int = 100  # audio per response.output_audio.delta
    pace: float = 0.0  # 0: as fast as possible; x > 0: x times real time
    vad_level: int = 500  # mean |linear sample| of a 20 ms window above which it is speech
    reply: str = "echo"  # "echo" the caller's turn, "tone", or "stream" (see below)
    # "stream" (for load tests): from session.updated on, send `stream_frame()` every 20 ms of
    # real time as one delta, forever, with no VAD; `on_audio` sees every appended chunk.
    stream_frame: Callable[[], bytes] | None = None
    on_audio: Callable[[bytes], None] | None = None
    greeting_ms: int = 600  # tone length for a response.create with nothing to echo


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
            "type": "realtime", "object": "realtime.session", "id": f"sess_{id(self):x}",
            "model": self.model, "output_modalities": ["audio"], "instructions": "",
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
        self._response: asyncio.Task[None] | None = None
        self._response_id: str | None = None
        self._streamer: asyncio.Task[None] | None = None
        self.updated_at: float | None = None  # loop time of the first session.updated

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

    async def send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", self._id("event"))
        if not self._ws.closed:
            await self._ws.send_frame(orjson.dumps(event), WSMsgType.TEXT)

    async def close(self, code: int = 1000) -> None:
        await self._ws.close(code=code)

    # --- protocol ---

    async def serve(self) -> None:
        if "OpenAI-Beta" in self.headers:  # the GA service refuses the beta shape outright
            await self._error("beta_api_shape_disabled",
                              "The beta Realtime API shape is disabled; use the GA interface.")
            await self._ws.close(code=4000)
            self.closed.set()
            return
        await self.send({"type": "session.created", "session": self.session})
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
                await self._record(event)
                try:
                    await self._handle(event)
                except _Reject as r:
                    await self._error(r.code, r.message, r.param, event.get("event_id"))
        finally:
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
            if self._streamer is not None:
                return
            if self._detection() and self.session["audio"]["input"]["format"] == FORMATS[0]:
                await self._vad(audio)
        elif kind == "response.create":
            if self._response_id is not None:
                raise _Reject("conversation_already_has_active_response",
                              f"Conversation already has an active response in progress: "
                              f"{self._response_id}")
            self._start_response(bytes(self._turn) or tone(self._options.greeting_ms))
        elif kind == "response.cancel":
            if self._response_id is None:
                raise _Reject("response_cancel_not_active", "no active response")
            await self._stop_response("client_cancelled")
        elif kind == "conversation.item.truncate":
            await self._truncate(event)
        elif kind == "conversation.item.create":
            item = dict(event.get("item") or {})
            item.setdefault("id", self._id("item"))
            await self.send({"type": "conversation.item.added", "item": item,
                             "previous_item_id": self._last_item})
            self._last_item = item["id"]
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
        """Load-test voice: one 20 ms delta every 20 ms of real time, drift-free."""
        make = self._options.stream_frame or (lambda: bytes([0xFF]) * WINDOW)
        response_id, item = self._id("resp"), self._id("item")
        self._audio_ms[item] = 0
        base = {"type": "response.output_audio.delta", "response_id": response_id,
                "item_id": item, "output_index": 0, "content_index": 0}
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            await self.send({**base, "delta": base64.b64encode(make()).decode()})
            self._audio_ms[item] += 20
            due += 0.02
            await asyncio.sleep(max(due - loop.time(), 0))

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
                await self._end_turn(received_ms, detection)

    async def _end_turn(self, end_ms: int, detection: dict[str, Any]) -> None:
        self._speaking = False
        item = self._user_item
        await self.send({"type": "input_audio_buffer.speech_stopped",
                         "audio_end_ms": end_ms, "item_id": item})
        await self.send({"type": "input_audio_buffer.committed", "item_id": item,
                         "previous_item_id": self._last_item})
        self._last_item = item
        speech = bytes(self._turn[: len(self._turn) - self._silent_ms * BYTES_PER_MS])
        if detection.get("create_response", True) and self._response_id is None:
            reply = speech if self._options.reply == "echo" else tone(600)
            self._start_response(reply)

    def _start_response(self, audio: bytes) -> None:
        self._response_id = self._id("resp")
        self._response = asyncio.get_running_loop().create_task(
            self._stream(self._response_id, audio))

    async def _stop_response(self, reason: str | None) -> None:
        """Cancel the response task; with a reason, tell the client it was cancelled."""
        task, response_id = self._response, self._response_id
        self._response = self._response_id = None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if reason and response_id:
            await self.send({"type": "response.done", "response": {
                "id": response_id, "object": "realtime.response", "status": "cancelled",
                "status_details": {"type": "cancelled", "reason": reason}, "output": [],
                "usage": _usage(0)}})

    async def _stream(self, response_id: str, audio: bytes) -> None:
        item = self._id("item")
        self._audio_ms[item] = 0
        base = {"response_id": response_id, "item_id": item, "output_index": 0,
                "content_index": 0}
        await self.send({"type": "response.created", "response": {
            "id": response_id, "object": "realtime.response", "status": "in_progress",
            "output": []}})
        message: dict[str, Any] = {"id": item, "type": "message", "role": "assistant",
                                   "status": "in_progress",
                   "content": []}
        await self.send({"type": "response.output_item.added", "response_id": response_id,
                         "output_index": 0, "item": message})
        transcript = f"(echo of {len(audio) // BYTES_PER_MS} ms)"
        await self.send({"type": "response.output_audio_transcript.delta", **base,
                         "delta": transcript})
        chunk = self._options.chunk_ms * BYTES_PER_MS
        loop = asyncio.get_running_loop()
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
        message = {**message, "status": "completed",
                   "content": [{"type": "output_audio", "transcript": transcript}]}
        await self.send({"type": "response.output_item.done", "response_id": response_id,
                         "output_index": 0, "item": message})
        self._response = self._response_id = None
        self._last_item = item
        await self.send({"type": "response.done", "response": {
            "id": response_id, "object": "realtime.response", "status": "completed",
            "output": [message], "usage": _usage(self._audio_ms[item])}})

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


def _usage(audio_ms: int) -> dict[str, Any]:
    """Plausible token counts: audio output is about 20 tokens a second."""
    audio_out = audio_ms // 50
    return {"total_tokens": 120 + audio_out + 10, "input_tokens": 120,
            "output_tokens": audio_out + 10,
            "input_token_details": {"text_tokens": 100, "audio_tokens": 20, "cached_tokens": 0},
            "output_token_details": {"text_tokens": 10, "audio_tokens": audio_out}}


async def _realtime(request: web.Request) -> web.StreamResponse:
    options = request.app[_OPTIONS]
    if options.handshake_delay:
        await asyncio.sleep(options.handshake_delay)
    if options.handshake_status:
        return web.Response(status=options.handshake_status, text="refused by the stand-in\n")
    if options.api_key and request.headers.get("Authorization") != f"Bearer {options.api_key}":
        return web.json_response({"error": {"type": "invalid_request_error",
                                            "code": "invalid_api_key",
                                            "message": "Incorrect API key provided."}},
                                 status=401)
    ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=16 << 20)
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
    args = parser.parse_args(argv)
    options = StandinOptions(api_key=args.api_key, chunk_ms=args.chunk_ms, pace=args.pace,
                             reply=args.reply)
    announce(f"Realtime stand-in: OPENAI_REALTIME_URL=ws://{args.host}:{args.port}/v1/realtime")
    web.run_app(create_standin_app(options), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
