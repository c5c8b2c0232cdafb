"""One phone call: the Twilio media stream joined to one OpenAI Realtime session.

The call owns both sockets and both relay tasks. Whatever ends first (caller hangs up, OpenAI
fails, bad input, shutdown) ends the call: the other task is cancelled and both sockets are closed
before `run()` returns, so nothing of the call is left running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from server import openai_protocol as oai
from server import twilio_protocol as tw
from server.barge_in import MARK_CHARS, BargeIn, decoded_length, split
from server.logs import CallLog
from server.prompts import Prompt
from server.settings import Settings
from server.stream_tokens import StreamTokens

log = logging.getLogger("server.call")

TEXT = WSMsgType.TEXT
OpenAISocket = aiohttp.ClientWebSocketResponse[Literal[False]]
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
OPENAI_MAX_MSG = 16 * 1024 * 1024
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0)
_CLOSE_WITHIN = 1.0
_HANDSHAKE_HINTS = {
    401: "check OPENAI_API_KEY",
    403: "the key has no access to the Realtime API",
    404: "check OPENAI_REALTIME_URL and OPENAI_REALTIME_MODEL",
    429: "rate limited or out of quota",
}


@dataclass(frozen=True, slots=True)
class CallDeps:
    """What every call shares; owned by the app."""

    settings: Settings
    http: aiohttp.ClientSession
    prompt: Prompt
    tokens: StreamTokens | None


class _End(Exception):
    """Ends the call from anywhere inside it; carries the one line that says why."""

    def __init__(self, reason: str, code: int = WSCloseCode.OK, level: int = logging.INFO):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.level = level


class Call:
    def __init__(self, deps: CallDeps, twilio: web.WebSocketResponse, peer: str) -> None:
        self._deps = deps
        self._settings = deps.settings
        self._twilio = twilio
        self._openai: OpenAISocket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.log = CallLog(log, {"peer": peer})
        self.stream_sid = ""
        self.call_sid = ""
        self.barge_in = BargeIn()
        self.frames_in = 0
        self.frames_out = 0
        self.started = time.monotonic()
        self.session_ready_ms: float | None = None
        self.usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        self.end_reason: str | None = None
        self._runner: asyncio.Task[Any] | None = None
        self.finished = asyncio.Event()
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "input_audio_buffer.speech_started": self._on_speech_started,
            "response.created": self._on_response_created,
            "response.done": self._on_response_done,
            "session.updated": self._on_session_updated,
            "error": self._on_error,
        }

    # --- lifecycle ---

    async def run(self) -> None:
        self._runner = asyncio.current_task()
        end = _End("call ended")
        try:
            await self._run()
        except _End as e:
            end = e
        except asyncio.CancelledError:
            end = _End("server shutting down", WSCloseCode.GOING_AWAY)
            raise
        except Exception:
            self.log.exception("call failed: internal error")
            end = _End("internal error", WSCloseCode.INTERNAL_ERROR, logging.ERROR)
        finally:
            # The clean-up must finish even if this task is cancelled again meanwhile (a second
            # shutdown signal, or a test server cancelling handlers when the client drops).
            await asyncio.shield(self._close(end))

    def shutdown(self) -> None:
        """Server is stopping: end this call now; its sockets close with GOING_AWAY."""
        if self._runner is not None:
            self._runner.cancel()

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        return tuple(self._tasks)

    @property
    def sockets_closed(self) -> bool:
        return self._twilio.closed and (self._openai is None or self._openai.closed)

    async def _run(self) -> None:
        start = await self._receive_start()
        self.stream_sid, self.call_sid = start.stream_sid, start.call_sid
        self.log = CallLog(log, {**(self.log.extra or {}), "call_sid": start.call_sid,
                                 "stream_sid": start.stream_sid})
        self._authorize(start)
        values = {
            "caller": start.parameters.get("caller", "unknown"),
            "called": start.parameters.get("called", "unknown"),
            "call_sid": start.call_sid,
        }
        self._openai = openai = await self._connect_openai()
        await openai.send_frame(
            oai.session_update(self._settings, self._deps.prompt.session_fields(values)), TEXT
        )
        self.log.info("call started: caller=%s called=%s", values["caller"], values["called"])
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._guard(self._relay_twilio())),
            loop.create_task(self._guard(self._relay_openai())),
        ]
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # raises the _End that finished it

    async def _guard(self, relay: Awaitable[None]) -> None:
        """Turns the ways a relay can stop into one _End."""
        try:
            await relay
        except (ConnectionError, aiohttp.ClientError) as e:
            raise _End(f"socket lost: {type(e).__name__}: {e}", WSCloseCode.INTERNAL_ERROR) from e

    async def _close(self, end: _End) -> None:
        self.end_reason = end.reason
        record = {
            "reason": end.reason,
            "seconds": round(time.monotonic() - self.started, 1),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "interruptions": self.barge_in.interruptions,
            "session_ready_ms": round(self.session_ready_ms or 0),
            **self.usage,
        }
        self.log.log(
            end.level,
            "call ended: %(reason)s (%(seconds).1f s, %(frames_in)d frames in, "
            "%(frames_out)d frames out, %(interruptions)d interruptions, "
            "tokens in=%(input_tokens)d out=%(output_tokens)d)",
            record,
            extra={"call": record},
        )
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        closing = [self._twilio.close(code=end.code)]
        if self._openai is not None:
            closing.append(self._openai.close())
        try:
            async with asyncio.timeout(_CLOSE_WITHIN):
                await asyncio.gather(*closing, return_exceptions=True)
        except TimeoutError:
            self.log.warning("sockets did not close within %.0f s; dropped", _CLOSE_WITHIN)
        self.finished.set()

    # --- before the relay ---

    async def _receive_start(self) -> tw.StreamStart:
        deadline = time.monotonic() + self._settings.stream_start_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = await self._twilio.receive(timeout=max(remaining, 0.001))
            except TimeoutError:
                raise _End("no 'start' from Twilio in time", WSCloseCode.POLICY_VIOLATION,
                           logging.WARNING) from None
            frame = self._parse_twilio(msg)
            event = frame.get("event")
            if event == "start":
                try:
                    return tw.parse_start(frame)
                except tw.TwilioProtocolError as e:
                    raise self._protocol_error(str(e)) from None
            if event == "media":
                raise self._protocol_error("media before 'start'")
            if event == "stop":
                raise _End("stream stopped before it started")

    def _authorize(self, start: tw.StreamStart) -> None:
        tokens = self._deps.tokens
        if tokens is None:
            return
        problem = tokens.check(start.parameters.get("token"), start.call_sid)
        if problem:
            raise _End(f"rejected stream: {problem}", WSCloseCode.POLICY_VIOLATION,
                       logging.WARNING)

    async def _connect_openai(self) -> OpenAISocket:
        s = self._settings
        host = urlsplit(s.openai_realtime_url).netloc
        why: str
        try:
            async with asyncio.timeout(s.openai_connect_timeout):
                return await self._deps.http.ws_connect(
                    oai.realtime_url(s),
                    headers=oai.auth_headers(s),
                    timeout=_WS_TIMEOUT,
                    max_msg_size=OPENAI_MAX_MSG,
                    decode_text=False,
                    autoclose=True,
                )
        except aiohttp.WSServerHandshakeError as e:
            hint = _HANDSHAKE_HINTS.get(e.status, "OpenAI unavailable" if e.status >= 500 else "")
            why = f"OpenAI refused the session: HTTP {e.status}" + (f" ({hint})" if hint else "")
        except TimeoutError:
            why = f"OpenAI did not accept the session within {s.openai_connect_timeout:g} s"
        except (aiohttp.ClientError, OSError) as e:
            why = f"could not reach OpenAI at {host}: {type(e).__name__}: {e}"
        raise _End(why, WSCloseCode.INTERNAL_ERROR, logging.ERROR)

    # --- the relay: Twilio -> OpenAI ---

    async def _relay_twilio(self) -> None:
        twilio = self._twilio
        assert self._openai is not None
        send = self._openai.send_frame
        barge_in = self.barge_in
        append = oai.append_audio
        is_base64 = tw.is_base64
        while True:
            try:
                msg = await twilio.receive()
            except TimeoutError:
                raise _End(
                    f"no frames from Twilio for {self._settings.stream_idle_timeout:g} s",
                    WSCloseCode.GOING_AWAY, logging.WARNING,
                ) from None
            frame = self._parse_twilio(msg)
            event = frame.get("event")
            if event == "media":
                try:
                    payload = frame["media"]["payload"]
                except (KeyError, TypeError):
                    raise self._protocol_error("media event without media.payload") from None
                if type(payload) is not str or not is_base64(payload):
                    raise self._protocol_error("media payload is not base64")
                await send(append(payload), TEXT)
                self.frames_in += 1
            elif event == "mark":
                mark = frame.get("mark")
                if isinstance(mark, dict):
                    barge_in.on_mark(str(mark.get("name")))
            elif event == "stop":
                raise _End("Twilio stopped the stream (call over)")
            elif event == "dtmf":
                dtmf = frame.get("dtmf")
                self.log.info("caller pressed %s", dtmf.get("digit") if isinstance(dtmf, dict)
                              else "?")
            elif event in ("connected", "start"):
                self.log.warning("ignored a repeated %r event", event)
            else:
                self.log.debug("ignored Twilio event %r", event)

    def _parse_twilio(self, msg: aiohttp.WSMessage) -> dict[str, Any]:
        if msg.type is not TEXT:
            if msg.type in _CLOSED:
                raise _End(f"Twilio closed the stream (code {self._twilio.close_code})")
            if msg.type is WSMsgType.ERROR:
                raise _End(f"Twilio socket error: {msg.data}", WSCloseCode.POLICY_VIOLATION,
                           logging.WARNING)
            raise self._protocol_error(f"{msg.type.name.lower()} frame (Twilio sends only text)")
        try:
            frame = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            raise self._protocol_error("frame is not JSON") from None
        if not isinstance(frame, dict):
            raise self._protocol_error("frame is not a JSON object")
        return frame

    def _protocol_error(self, what: str) -> _End:
        return _End(f"bad frame from Twilio: {what}", WSCloseCode.POLICY_VIOLATION,
                    logging.WARNING)

    # --- the relay: OpenAI -> Twilio ---

    async def _relay_openai(self) -> None:
        openai = self._openai
        assert openai is not None
        send = self._twilio.send_frame
        barge_in = self.barge_in
        stream_sid = self.stream_sid
        media, mark_frame = tw.media_frame, tw.mark_frame
        handlers = self._handlers
        logged = self._settings.log_event_types
        while True:
            msg = await openai.receive()
            if msg.type is not TEXT:
                if msg.type in _CLOSED:
                    raise _End(f"OpenAI closed the session (code {openai.close_code})",
                               WSCloseCode.INTERNAL_ERROR, logging.ERROR)
                if msg.type is WSMsgType.ERROR:
                    raise _End(f"OpenAI socket error: {msg.data}", WSCloseCode.INTERNAL_ERROR,
                               logging.ERROR)
                raise _End("OpenAI sent a non-text frame", WSCloseCode.INTERNAL_ERROR,
                           logging.ERROR)
            try:
                event = orjson.loads(msg.data)
                kind = event["type"]
                if kind == "response.output_audio.delta":
                    delta, item_id = event["delta"], event["item_id"]
                    if type(delta) is not str:
                        raise TypeError
                    response_id = event.get("response_id")
                    # Long deltas go out in pieces, each with its mark, so what the caller
                    # heard is known to within MARK_CHARS of audio whatever the delta size.
                    for piece in (delta,) if len(delta) <= MARK_CHARS else split(delta):
                        mark = barge_in.on_audio(response_id, item_id, decoded_length(piece))
                        if mark is None:
                            break
                        await send(media(stream_sid, piece), TEXT)
                        await send(mark_frame(stream_sid, mark), TEXT)
                    self.frames_out += 1
                    continue
            except (ValueError, KeyError, TypeError) as e:
                raise _End(f"malformed event from OpenAI: {type(e).__name__}",
                           WSCloseCode.INTERNAL_ERROR, logging.ERROR) from None
            if kind in logged and kind != "error":
                self.log.info("openai %s %s", kind, _summary(event))
            handler = handlers.get(kind)
            if handler is not None:
                await handler(event)

    async def _on_speech_started(self, event: dict[str, Any]) -> None:
        cut = self.barge_in.on_speech_started()
        if cut is None:
            return
        await self._twilio.send_frame(tw.clear_frame(self.stream_sid), TEXT)
        assert self._openai is not None
        await self._openai.send_frame(oai.truncate(cut.item_id, cut.audio_end_ms), TEXT)
        self.log.info("barge-in: cleared playback, truncated %s at %d ms",
                      cut.item_id, cut.audio_end_ms)

    async def _on_response_created(self, event: dict[str, Any]) -> None:
        self.barge_in.on_response_created(str(_obj(event, "response").get("id")))

    async def _on_response_done(self, event: dict[str, Any]) -> None:
        response = _obj(event, "response")
        self.barge_in.on_response_done(str(response.get("id")))
        usage = _obj(response, "usage")
        for key in self.usage:
            value = usage.get(key)
            if isinstance(value, int):
                self.usage[key] += value

    async def _on_session_updated(self, event: dict[str, Any]) -> None:
        if self.session_ready_ms is not None:
            return
        self.session_ready_ms = (time.monotonic() - self.started) * 1000
        audio = _obj(_obj(event, "session"), "audio")
        formats = [_obj(_obj(audio, side), "format").get("type") for side in ("input", "output")]
        if any(f not in (None, "audio/pcmu") for f in formats):
            raise _End(f"OpenAI session is not in audio/pcmu (got {formats})",
                       WSCloseCode.INTERNAL_ERROR, logging.ERROR)
        self.log.info("session ready %.0f ms after the stream opened", self.session_ready_ms)

    async def _on_error(self, event: dict[str, Any]) -> None:
        code, message = oai.error_summary(event)
        if oai.is_fatal(event):
            raise _End(f"OpenAI error {code}: {message}", WSCloseCode.INTERNAL_ERROR,
                       logging.ERROR)
        self.log.warning("OpenAI error %s: %s", code, message)


def _obj(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """parent[key] if it is an object, else {}: events from the network may be any shape."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _summary(event: dict[str, Any]) -> str:
    """A short, readable line for a logged event (never whole audio or output arrays)."""
    if event.get("type") == "response.done":
        response = _obj(event, "response")
        usage = _obj(response, "usage")
        reason = _obj(response, "status_details").get("reason")
        return (f"status={response.get('status')}" + (f" reason={reason}" if reason else "")
                + f" tokens in={usage.get('input_tokens')} out={usage.get('output_tokens')}")
    if event.get("type") == "rate_limits.updated":
        limits = event.get("rate_limits")
        rows = [r for r in limits if isinstance(r, dict)] if isinstance(limits, list) else []
        return " ".join(f"{r.get('name')}={r.get('remaining')}/{r.get('limit')}" for r in rows)
    return " ".join(f"{k}={v}" for k, v in event.items()
                    if k not in ("type", "event_id") and isinstance(v, (str, int, float)))[:300]
