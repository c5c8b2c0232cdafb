"""OpenAI Realtime (GA) behind the `ModelSession` interface.

Opens the WebSocket (Authorization only: no beta header), sends the GA `session.update` first
and the conversation so far as items, relays audio both ways (base64 untouched), and turns the
service's events into the boundary's typed events. `session.updated` must confirm mu-law both
ways; fatal errors end the session for good (`ModelFailed`), `session_expired` and a closed
socket are a lost session (`ModelLost`: the call opens a new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from server.call.conversation import (
    AssistantTurn,
    CallerTurn,
    Entry,
    Keypad,
    OperatorTurn,
    ToolCall,
    Whisper,
    json_text,
)
from server.models import events as ev
from server.models.session import (
    AudioHandler,
    EventHandler,
    ModelFailed,
    ModelLost,
    ModelUnavailable,
    SessionConfig,
)
from server.models.socket import ModelSocket, audio_sender, open_socket, send_text, why_lost
from server.settings import Settings
from server.wire import realtime as rt

TEXT = WSMsgType.TEXT
RENEWABLE_ERRORS = frozenset({"session_expired"})  # a new session continues the call
MAX_ITEMS = 200  # the most recent conversation entries carried into a new session
_CLOSE_WITHIN = 1.0
_HANDSHAKE_HINTS = {
    403: "the key has no access to the Realtime API",
    404: "check OPENAI_REALTIME_URL and OPENAI_REALTIME_MODEL",
}


async def open_model_socket(settings: Settings, http: aiohttp.ClientSession,
                            model: str | None = None) -> ModelSocket:
    """A Realtime WebSocket (GA: Authorization only); ModelUnavailable when it cannot be had
    within OPENAI_CONNECT_TIMEOUT."""
    s = settings
    try:
        async with asyncio.timeout(s.openai_connect_timeout):
            return await open_socket(http, rt.realtime_url(s, model), rt.auth_headers(s),
                                     what="OpenAI", hints=_HANDSHAKE_HINTS)
    except TimeoutError:
        raise ModelUnavailable(f"OpenAI did not accept the session within "
                               f"{s.openai_connect_timeout:g} s") from None


def conversation_items(entries: Iterable[Entry], limit: int = MAX_ITEMS) -> list[bytes]:
    """Client events that recreate a conversation in a new session, oldest first: caller and
    assistant turns as text, keypad entries, tool calls with their outputs, operator turns and
    whispers. Audio is never replayed."""
    items: list[bytes] = []
    for entry in list(entries)[-limit:]:
        if isinstance(entry, CallerTurn) and entry.text:
            items.append(rt.user_text(entry.text))
        elif isinstance(entry, AssistantTurn) and entry.text:
            text = entry.text
            if entry.interrupted:
                text += f" [the caller interrupted after {entry.heard_ms or 0} ms]"
            items.append(rt.assistant_text(text))
        elif isinstance(entry, Keypad) and entry.digits:
            items.append(rt.user_text(f"The caller typed {' '.join(entry.digits)} on the keypad."))
        elif isinstance(entry, ToolCall) and entry.call_id and entry.name:
            items.append(rt.function_call_item(entry.call_id, entry.name,
                                               json_text(entry.arguments or {})))
            result = entry.result if entry.outcome == "ok" else {"error": entry.result}
            items.append(rt.function_call_output(entry.call_id, json_text(result)))
        elif isinstance(entry, OperatorTurn) and entry.text:
            items.append(rt.user_text(f"(A person from the business, {entry.operator}, said to "
                                      f"the caller:) {entry.text}"))
        elif isinstance(entry, Whisper) and entry.text:
            items.append(rt.system_text(entry.text))
    return items


class RealtimeSession:
    api = "realtime"
    decides_turns = False
    prewarm = "session"  # billed by tokens: an open, idle session costs nothing

    def __init__(self, settings: Settings, http: aiohttp.ClientSession,
                 log: logging.LoggerAdapter[logging.Logger] | logging.Logger) -> None:
        self._settings = settings
        self._http = http
        self._log = log
        self._logged = settings.log_event_types
        self._ws: ModelSocket | None = None
        self._ready = False
        self._lost_because: str | None = None
        self.received = 0
        # The caller's audio to the model: a closure over the socket once it is open.
        self.send_audio: Callable[[str], Awaitable[None]] = self._not_open

    async def open(self, config: SessionConfig, conversation: Sequence[Entry]) -> None:
        ws = await open_model_socket(self._settings, self._http, config.model)
        self._ws = ws
        self.send_audio = audio_sender(ws, rt.append_audio)
        prompt = {"prompt": config.prompt} if config.prompt else (
            {"instructions": config.instructions} if config.instructions is not None else {})
        try:
            await ws.send_frame(rt.session_update(self._settings, prompt, config.tools,
                                                  model=config.model, voice=config.voice), TEXT)
            for item in conversation_items(conversation):
                await ws.send_frame(item, TEXT)
        except (ConnectionError, aiohttp.ClientError) as e:
            await self.close()
            raise ModelUnavailable(f"the new session closed at once: {e}") from None

    @staticmethod
    async def _not_open(payload: str) -> None:
        raise ConnectionError("the session is not open")

    async def run(self, on_audio: AudioHandler, on_event: EventHandler) -> None:
        ws = self._ws
        assert ws is not None
        receive = ws.receive
        decode = rt.decode
        delta_type = ev.AudioDelta
        while True:
            msg = await receive()
            self.received += 1
            if msg.type is not TEXT:
                if msg.type is WSMsgType.PONG:
                    continue
                if msg.type is WSMsgType.PING:
                    await ws.pong(msg.data)
                    continue
                raise self._lost(msg)
            try:
                event = decode(msg.data)
            except rt.OpenAIProtocolError as e:
                raise ModelFailed(f"malformed event from OpenAI: {e}") from None
            if type(event) is delta_type:
                await on_audio(event)
                continue
            await self._on_event(event, on_event)

    async def _on_event(self, event: rt.RealtimeEvent, on_event: EventHandler) -> None:
        kind = rt.type_of(event)
        if kind in self._logged and kind != "error":
            self._log.info("openai %s %s", kind, rt.describe(event))
        if isinstance(event, rt.SessionUpdated):
            formats = [event.input_format, event.output_format]
            if any(f not in (None, "audio/pcmu") for f in formats):
                raise ModelFailed(f"OpenAI session is not in audio/pcmu (got {formats})")
            if not self._ready:
                self._ready = True
                await on_event(ev.SessionReady())
            return
        if isinstance(event, rt.RateLimits):
            return
        if isinstance(event, ev.ModelError):
            await on_event(event)  # features see it first (metrics, the conversation)
            if event.code in RENEWABLE_ERRORS:
                raise ModelLost(f"OpenAI error {event.code}: {event.message}")
            if event.fatal:
                raise ModelFailed(f"OpenAI error {event.code}: {event.message}")
            self._log.warning("OpenAI error %s: %s", event.code, event.message)
            return
        await on_event(event)

    def _lost(self, msg: Any) -> Exception:
        because, self._lost_because = self._lost_because, None
        return why_lost(msg, self._ws, because, "OpenAI")

    async def _send(self, frame: bytes) -> None:
        await send_text(self._ws, frame)

    async def add_tool_result(self, call_id: str, output: str) -> None:
        await self._send(rt.function_call_output(call_id, output))

    async def add_text(self, role: str, text: str) -> None:
        await self._send(rt.system_text(text) if role == "system" else rt.user_text(text))

    async def create_response(self, instructions: str | None, event_id: str) -> None:
        await self._send(rt.response_create(instructions, event_id))

    async def truncate(self, item_id: str, heard_ms: int) -> None:
        await self._send(rt.truncate(item_id, heard_ms))

    async def listen_only(self, on: bool) -> None:
        await self._send(rt.listen_only(self._settings, on))

    async def lose(self, reason: str) -> None:
        """The watchdog gave up on this socket: close it; `run` then raises ModelLost(reason)."""
        self._lost_because = reason
        await self.close()

    async def finish(self) -> None:
        """Nothing to ask for at the end: usage came with each response."""

    async def ping(self) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await ws.ping()  # if the socket is gone, `run` sees it close

    async def close(self) -> None:
        ws = self._ws
        if ws is not None:
            await self._close_quietly(ws)

    @staticmethod
    async def _close_quietly(ws: ModelSocket) -> None:
        try:
            async with asyncio.timeout(_CLOSE_WITHIN):
                await ws.close()
        except (TimeoutError, ConnectionError, aiohttp.ClientError):
            pass

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed
