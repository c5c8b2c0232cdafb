"""One phone call: the Twilio media stream joined to an OpenAI Realtime session.

The call is an orchestrator. It owns both sockets, the two relay tasks, the tasks its features
start, the call's record and the one decision of how it ends. Audio takes the direct path
(Twilio media -> `input_audio_buffer.append`; audio deltas -> the barge-in feature, which sends
them on with their marks); every other event is decoded by the wire modules and dispatched to the
features that declared its type. Whatever ends first (caller hangs up, a feature ends the call,
OpenAI fails, bad input, idle stream, shutdown) ends the call: every task is cancelled and both
sockets closed before `run()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from server.call.features import base
from server.call.features.base import Ending, Feature
from server.call.gate import ResponseGate
from server.call.latency import FRAME_MS, TurnLatency
from server.call.model_link import GapBuffer, conversation_items
from server.call.playback import BargeIn
from server.call.record import CallRecord, iso, utc_now
from server.fleet.tokens import StreamTokens
from server.logs import CallLog, mask_number
from server.metrics import REFUSED_BAD_TOKEN
from server.models.realtime import ModelUnavailable, OpenAISocket, open_model_socket
from server.prompts import Prompt
from server.settings import Settings
from server.wire import realtime as oai
from server.wire import twilio as tw

log = logging.getLogger("server.call")

TEXT = WSMsgType.TEXT
FeatureFactory = Callable[[base.CallControl], Feature | None]
T = TypeVar("T")
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
_CLOSE_WITHIN = 1.0
RENEWABLE_ERRORS = frozenset({"session_expired"})  # a new session continues the call
WARNINGS_SHOWN = 3  # of each warning a call's input causes; the rest are counted
MAX_WARNING_KINDS = 32


class CallHooks(Protocol):
    """What the app does around a call (the registry implements it)."""

    async def admit(self, call: Call, token: str | None) -> base.Refusal | None:
        """The stream started: claim its token, capacity and call. Why to refuse, or None."""

    async def resume(self, call: Call) -> dict[str, Any] | None:
        """A call handed over from another instance: its saved context (restores the record),
        or None if there is none."""

    def started(self, call: Call) -> None:
        """The model session is open and the call is relaying."""

    async def ended(self, call: Call, ending: Ending) -> None:
        """The call is over: its sockets are closed; store the decision and the record."""


@dataclass(frozen=True)
class CallDeps:
    """What every call shares; owned by the app."""

    settings: Settings
    http: aiohttp.ClientSession
    prompt: Prompt
    tokens: StreamTokens | None
    hooks: CallHooks | None = None
    features: Sequence[FeatureFactory] = field(default_factory=tuple)


class _ModelLost(Exception):
    """The model session is gone (socket closed, heartbeat missed, session_expired); a new one
    may continue the call."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _close_quietly(ws: OpenAISocket) -> None:
    try:
        async with asyncio.timeout(_CLOSE_WITHIN):
            await ws.close()
    except (TimeoutError, ConnectionError, aiohttp.ClientError):
        pass


class _End(Exception):
    """Ends the call from inside a relay; carries the Ending."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason)
        self.ending = ending


def _fail(kind: str, reason: str, code: int = WSCloseCode.INTERNAL_ERROR,
          level: int = logging.ERROR) -> _End:
    """An abnormal ending: Twilio speaks the fallback (decision None), then hangs up."""
    return _End(Ending(kind, reason, None, code, level))


def _bad_input(what: str) -> _End:
    return _fail(base.BAD_INPUT, f"bad frame from Twilio: {what}", WSCloseCode.POLICY_VIOLATION,
                 logging.WARNING)


class Call:
    """One call; implements `CallControl` for its features."""

    # A call lives as long as the phone call and there are hundreds: no per-instance dict.
    __slots__ = (
        "__weakref__",
        "_deps",
        "_ending",
        "_frames_base",
        "_gap",
        "_logged",
        "_lost_because",
        "_model_received",
        "_model_send",
        "_notice_dispatch",
        "_openai",
        "_openai_dispatch",
        "_owned",
        "_received",
        "_relays",
        "_resumed",
        "_session_ready",
        "_twilio",
        "_twilio_dispatch",
        "_warnings",
        "barge_in",
        "call_sid",
        "called",
        "caller",
        "ending",
        "features",
        "features_built",
        "finished",
        "gate",
        "http",
        "latency",
        "log",
        "record",
        "refusal",
        "settings",
        "started",
        "stream_sid",
    )

    def __init__(self, deps: CallDeps, twilio: web.WebSocketResponse, peer: str) -> None:
        self._deps = deps
        self.settings = deps.settings
        self.http = deps.http
        self._twilio = twilio
        self._openai: OpenAISocket | None = None
        # Where caller audio goes: the model socket's send_frame, or a GapBuffer while a new
        # session is being opened. Rebound, never checked, on the media fast path.
        self._model_send: Callable[[bytes, WSMsgType], Awaitable[None]] | None = None
        self._gap: GapBuffer | None = None
        self._resumed: dict[str, Any] | None = None  # context of a call handed over to us
        self._relays: list[asyncio.Task[None]] = []
        self._owned: set[asyncio.Task[None]] = set()
        self.log = CallLog(log, {"peer": peer})
        self.stream_sid = ""
        self.call_sid = ""
        self.caller = ""
        self.called = ""
        self.record = CallRecord(model=deps.settings.openai_model, prompt=deps.prompt.describe())
        self.started = time.monotonic()
        self._received = 0  # every Twilio frame: the watchdog's counter
        self._model_received = 0  # every OpenAI message: the watchdog's counter
        self._lost_because: str | None = None  # why the watchdog gave up the model socket
        self._ending: asyncio.Future[Ending] | None = None
        self._session_ready = False
        self.finished = asyncio.Event()
        self.barge_in = BargeIn(self)
        self.gate = ResponseGate(self)
        self.features: list[Feature] = [self.barge_in, self.gate]
        self._twilio_dispatch: dict[type, list[Feature]] = {}
        self._openai_dispatch: dict[type, list[Feature]] = {}
        self._notice_dispatch: dict[type, list[Feature]] = {}
        self._logged = deps.settings.log_event_types
        self.ending: Ending | None = None
        self.features_built = False
        self.refusal: base.Refusal | None = None  # why the stream was not admitted
        self._warnings: dict[str, int] = {}  # warning -> times seen (see `warn`)
        self.latency = TurnLatency()
        self._frames_base = 0  # record.frames_in when the model session's audio began

    # --- CallControl ---

    async def send_to_caller(self, frame: bytes) -> None:
        if not self._twilio.closed:
            with contextlib.suppress(ConnectionError):  # gone: the Twilio relay ends the call
                await self._twilio.send_frame(frame, TEXT)

    async def send_to_model(self, frame: bytes) -> None:
        openai = self._openai
        if openai is not None and not openai.closed:
            with contextlib.suppress(ConnectionError):  # lost: the model relay replaces it
                await openai.send_frame(frame, TEXT)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._owned_task(coro, name), name=name)
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)
        # Cancelled before it ever ran, the task never awaited `coro`: close it, no warning.
        task.add_done_callback(lambda _task: coro.close())
        return task

    def end(self, ending: Ending) -> None:
        if self._ending is not None and not self._ending.done():
            self._ending.set_result(ending)

    def notify(self, notice: object) -> None:
        for feature in self._notice_dispatch.get(type(notice), ()):
            try:
                feature.on_notice(notice)
            except Exception:
                self.log.exception("feature %s failed on %s", feature.name,
                                   type(notice).__name__)

    def warn(self, message: str) -> None:
        """A warning caused by this call's input: the first few are logged, the rest counted
        and reported once when the call ends (a peer repeating a fault cannot flood the log)."""
        seen = self._warnings.get(message, 0) + 1
        self._warnings[message] = seen
        if seen <= WARNINGS_SHOWN:
            self.log.warning("%s", message)
        elif len(self._warnings) > MAX_WARNING_KINDS:  # distinct messages are bounded too
            self._warnings.pop(message)

    async def request_response(self, reason: str, instructions: str | None = None) -> None:
        await self.gate.request(reason, instructions)

    def reply_latency(self) -> float | None:
        return self.latency.reply_started()

    @property
    def playback_idle(self) -> bool:
        return self.barge_in.idle

    async def wait_played(self, timeout: float) -> bool:
        return await self.barge_in.wait_played(timeout)

    # --- lifecycle ---

    async def run(self) -> None:
        self._ending = asyncio.get_running_loop().create_future()
        ending = Ending(base.CALLER_HUNG_UP, "call ended", tw.HANGUP)
        try:
            ending = await self._run()
        except _End as e:
            ending = e.ending
        except asyncio.CancelledError:
            # Shutdown ends calls through `end()`; aiohttp cancels a handler only when its
            # connection is gone (or a shutdown timed out): treat it as the caller leaving.
            ending = Ending(base.CALLER_HUNG_UP, "the stream's connection was dropped",
                            tw.HANGUP, WSCloseCode.GOING_AWAY)
            raise
        except Exception:
            self.log.exception("call failed: internal error")
            ending = Ending(base.INTERNAL_ERROR, "internal error", None,
                            WSCloseCode.INTERNAL_ERROR, logging.ERROR)
        finally:
            # The clean-up must finish even if this task is cancelled again meanwhile (a second
            # shutdown signal, or a test server cancelling handlers when the client drops).
            await asyncio.shield(self._close(ending))

    def shutdown(self, ending: Ending | None = None) -> None:
        """Server is stopping: end this call now (by default with GOING_AWAY and the spoken
        fallback). Only the call's own tasks are cancelled, never aiohttp's handler."""
        self.end(ending or Ending(base.SHUTDOWN, "server shutting down", None,
                                  WSCloseCode.GOING_AWAY))

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        return (*self._relays, *self._owned)

    @property
    def sockets_closed(self) -> bool:
        return self._twilio.closed and (self._openai is None or self._openai.closed)

    async def _run(self) -> Ending:
        start = await self._or_ended(self._receive_start())
        self.stream_sid, self.call_sid = start.stream_sid, start.call_sid
        self.caller = start.parameters.get("caller", "")
        self.called = start.parameters.get("called", "")
        rec = self.record
        rec.call_sid, rec.stream_sid, rec.caller, rec.called = (
            self.call_sid, self.stream_sid, self.caller, self.called)
        self.log = CallLog(log, {**(self.log.extra or {}), "call_sid": start.call_sid,
                                 "stream_sid": start.stream_sid})
        await self._or_ended(self._admit(start))
        self._build_features()
        hooks = self._deps.hooks
        if start.parameters.get("resume") and hooks is not None:
            self._resumed = await hooks.resume(self)
        self._openai = await self._or_ended(self._connect_openai())
        self._model_send = self._openai.send_frame
        await self._start_session(self._openai)
        self._begin_session("call started" if self._resumed is None else "handed over")
        self.barge_in.attach(self._twilio.send_frame)
        show = self.settings.log_pii
        self.log.info("call started: caller=%s called=%s", mask_number(self.caller, show),
                      mask_number(self.called, show))
        if hooks is not None:
            hooks.started(self)
        loop = asyncio.get_running_loop()
        self._relays = [
            loop.create_task(self._guard(self._relay_twilio()), name="relay-twilio"),
            loop.create_task(self._guard(self._model_loop()), name="relay-openai"),
            loop.create_task(self._guard(self._watch()), name="watchdog"),
        ]
        assert self._ending is not None
        return await self._ending

    async def _or_ended(self, step: Coroutine[Any, Any, T]) -> T:
        """Run a set-up step unless the call is ended meanwhile (shutdown before the relay)."""
        assert self._ending is not None
        task = asyncio.ensure_future(step)
        waiters: list[asyncio.Future[Any]] = [task, self._ending]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _End(self._ending.result())

    async def _guard(self, relay: Awaitable[None]) -> None:
        """Turns the ways a relay can stop into one Ending."""
        try:
            await relay
        except _End as e:
            self.end(e.ending)
        except (ConnectionError, aiohttp.ClientError) as e:
            self.end(Ending(base.INTERNAL_ERROR, f"socket lost: {type(e).__name__}: {e}", None,
                            WSCloseCode.INTERNAL_ERROR, logging.WARNING))
        except Exception:
            self.log.exception("relay failed: internal error")
            self.end(Ending(base.INTERNAL_ERROR, "internal error", None,
                            WSCloseCode.INTERNAL_ERROR, logging.ERROR))

    async def _owned_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("call task %s failed", name)

    async def _close(self, ending: Ending) -> None:
        self.ending = ending
        rec = self.record
        rec.ended_at = utc_now()
        rec.end_kind, rec.end_reason = ending.kind, ending.reason
        if rec.sessions and "ended_because" not in rec.sessions[-1]:
            self._end_session(ending.reason)
        for feature in self.features:
            try:
                await feature.on_end(ending)
            except Exception:
                self.log.exception("feature %s failed at the end of the call", feature.name)
        rec.version += 1
        summary = {
            "reason": ending.reason,
            "end": ending.kind,
            "seconds": round(time.monotonic() - self.started, 1),
            "frames_in": rec.frames_in,
            "frames_out": rec.frames_out,
            "interruptions": self.barge_in.state.interruptions,
            "input_tokens": int(rec.usage.get("input_tokens", 0)),
            "output_tokens": int(rec.usage.get("output_tokens", 0)),
        }
        for message, seen in self._warnings.items():
            if seen > WARNINGS_SHOWN:
                self.log.warning("%s (%d more times)", message, seen - WARNINGS_SHOWN)
        self.log.log(
            ending.level,
            "call ended: %(reason)s (%(seconds).1f s, %(frames_in)d frames in, "
            "%(frames_out)d frames out, %(interruptions)d interruptions, "
            "tokens in=%(input_tokens)d out=%(output_tokens)d)",
            summary,
            extra={"call": summary},
        )
        tasks = self.tasks
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._relays = []
        closing = [self._twilio.close(code=ending.code)]
        if self._openai is not None:
            closing.append(self._openai.close())
        try:
            async with asyncio.timeout(_CLOSE_WITHIN):
                await asyncio.gather(*closing, return_exceptions=True)
        except TimeoutError:
            self.log.warning("sockets did not close within %.0f s; dropped", _CLOSE_WITHIN)
        if self._deps.hooks is not None and self.call_sid:
            try:
                await self._deps.hooks.ended(self, ending)
            except Exception:
                self.log.exception("recording the end of the call failed")
        self.finished.set()

    # --- before the relay ---

    async def _receive_start(self) -> tw.Start:
        deadline = time.monotonic() + self.settings.stream_start_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = await self._twilio.receive(timeout=max(remaining, 0.001))
            except TimeoutError:
                raise _fail(base.BAD_INPUT, "no 'start' from Twilio in time",
                            WSCloseCode.POLICY_VIOLATION, logging.WARNING) from None
            event = self._decode_twilio(msg)
            if isinstance(event, tw.Start):
                return event
            if isinstance(event, str):  # a tw.Media payload
                raise _bad_input("media before 'start'")
            if isinstance(event, tw.Stop):
                raise _End(Ending(base.CALLER_HUNG_UP, "stream stopped before it started",
                                  tw.HANGUP))

    async def _admit(self, start: tw.Start) -> None:
        tokens = self._deps.tokens
        token = start.parameters.get("token")
        if tokens is not None:
            problem = tokens.verify(token, start.call_sid)
            if problem:
                self._refuse(base.Refusal(REFUSED_BAD_TOKEN, problem))
        hooks = self._deps.hooks
        if hooks is not None:
            refusal = await hooks.admit(self, token if tokens is not None else None)
            if refusal is not None:
                self._refuse(refusal)

    def _refuse(self, refusal: base.Refusal) -> NoReturn:
        self.refusal = refusal
        raise _fail(base.REJECTED, f"rejected stream: {refusal.message}",
                    WSCloseCode.POLICY_VIOLATION, logging.WARNING)

    def _build_features(self) -> None:
        self.features_built = True
        for factory in self._deps.features:
            feature = factory(self)
            if feature is not None:
                self.features.append(feature)
        for feature in self.features:
            for kind in feature.twilio_events:
                self._twilio_dispatch.setdefault(kind, []).append(feature)
            for kind in feature.openai_events:
                self._openai_dispatch.setdefault(kind, []).append(feature)
            for kind in feature.notices:
                self._notice_dispatch.setdefault(kind, []).append(feature)
            if feature.wants_audio:
                self.barge_in.audio_hooks.append(feature.on_assistant_audio)

    def _session_update(self) -> bytes:
        values = {"caller": self.caller or "unknown", "called": self.called or "unknown",
                  "call_sid": self.call_sid}
        tools = [spec for feature in self.features for spec in feature.tools()]
        return oai.session_update(self.settings, self._deps.prompt.session_fields(values), tools)

    async def _connect_openai(self) -> OpenAISocket:
        try:
            return await open_model_socket(self.settings, self.http)
        except ModelUnavailable as e:
            raise _fail(base.OPENAI_ERROR, str(e)) from None

    # --- the relay: Twilio -> OpenAI ---

    async def _relay_twilio(self) -> None:
        receive = self._twilio.receive
        append = oai.append_audio
        decode = tw.decode
        mark = tw.Mark
        mark_played = self.barge_in.mark_played
        record = self.record
        hooks = [f.on_caller_audio for f in self.features if f.wants_audio]
        dispatch = self._twilio_dispatch
        while True:
            msg = await receive()
            self._received += 1
            if msg.type is not TEXT:
                self._decode_twilio(msg)  # raises the right ending
            try:
                event = decode(msg.data)
            except tw.TwilioProtocolError as e:
                raise _bad_input(str(e)) from None
            if isinstance(event, str):  # tw.Media: the payload itself
                payload = event
                frame = append(payload)
                try:
                    await self._model_send(frame, TEXT)  # type: ignore[misc]
                except ConnectionError:  # the model socket just died: keep it for the next
                    await self._begin_gap().send(frame)
                record.frames_in += 1
                for hook in hooks:
                    hook(payload)
                continue
            if type(event) is mark:
                mark_played(event.name)
                continue
            if isinstance(event, tw.Stop):
                raise _End(Ending(base.CALLER_HUNG_UP, "Twilio stopped the stream (call over)",
                                  tw.HANGUP))
            if isinstance(event, (tw.Connected, tw.Start)):
                self.warn(f"ignored a repeated {type(event).__name__.lower()!r} event")
            for feature in dispatch.get(type(event), ()):
                await feature.on_twilio(event)

    def _decode_twilio(self, msg: aiohttp.WSMessage) -> tw.TwilioEvent:
        if msg.type is not TEXT:
            if msg.type in _CLOSED:
                raise _End(Ending(base.CALLER_HUNG_UP,
                                  f"Twilio closed the stream (code {self._twilio.close_code})",
                                  tw.HANGUP))
            if msg.type is WSMsgType.ERROR:
                raise _fail(base.BAD_INPUT, f"Twilio socket error: {msg.data}",
                            WSCloseCode.POLICY_VIOLATION, logging.WARNING)
            raise _bad_input(f"{msg.type.name.lower()} frame (Twilio sends only text)")
        try:
            return tw.decode(msg.data)
        except tw.TwilioProtocolError as e:
            raise _bad_input(str(e)) from None

    async def _watch(self) -> None:
        """One watchdog per call instead of a timer on every received frame (aiohttp's own
        heartbeat re-arms a timer per chunk received): a Twilio stream that sends nothing for
        STREAM_IDLE_TIMEOUT is ended, and an OpenAI socket that has been quiet is pinged, then
        given up (and replaced) if nothing at all comes back within OPENAI_HEARTBEAT."""
        limit, heartbeat = self.settings.stream_idle_timeout, self.settings.openai_heartbeat
        step = min(5.0, limit / 4, heartbeat / 2 if heartbeat else 5.0)
        now = time.monotonic()
        seen, quiet_since = self._received, now
        model_seen, model_quiet_since, pinged = self._model_received, now, False
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            if self._received != seen:
                seen, quiet_since = self._received, now
            elif now - quiet_since >= limit:
                raise _fail(base.IDLE, f"no frames from Twilio for {limit:g} s",
                            WSCloseCode.GOING_AWAY, logging.WARNING)
            openai = self._openai
            if (not heartbeat or openai is None or self._gap is not None
                    or self._model_received != model_seen):
                model_seen, model_quiet_since, pinged = self._model_received, now, False
            elif pinged and now - model_quiet_since >= heartbeat:
                self._lost_because = f"OpenAI did not answer a ping within {heartbeat:g} s"
                self.spawn(_close_quietly(openai), "close-silent-session")
                model_quiet_since, pinged = now, False
            elif not pinged and now - model_quiet_since >= heartbeat:
                with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                    await openai.ping()  # if the socket is gone, the relay sees it close
                model_quiet_since, pinged = now, True

    # --- the relay: OpenAI -> Twilio ---

    async def _model_loop(self) -> None:
        """Relays the model session; when it is lost, opens a new one (or ends the call)."""
        while True:
            assert self._openai is not None
            try:
                await self._relay_openai(self._openai)
            except _ModelLost as lost:
                await self._reconnect(lost.reason)

    async def _relay_openai(self, openai: OpenAISocket) -> None:
        receive = openai.receive
        decode = oai.decode
        delta_type = oai.AudioDelta
        play = self.barge_in.play
        record = self.record
        while True:
            msg = await receive()
            self._model_received += 1
            if msg.type is not TEXT:
                if msg.type is WSMsgType.PONG:
                    continue
                if msg.type is WSMsgType.PING:
                    await openai.pong(msg.data)
                    continue
                raise self._openai_lost(msg, openai)
            try:
                event = decode(msg.data)
            except oai.OpenAIProtocolError as e:
                raise _fail(base.OPENAI_ERROR, f"malformed event from OpenAI: {e}") from None
            if type(event) is delta_type:
                try:
                    sent = await play(event)
                    # 20 ms frames of audio (160 bytes), however the service cuts deltas
                    record.frames_out += (sent + 159) // 160
                except ConnectionError:  # the caller's side went away mid-send: a hang-up
                    raise _End(Ending(base.CALLER_HUNG_UP, "Twilio stream closed (caller gone)",
                                      tw.HANGUP)) from None
                continue
            await self._on_openai(event)

    def _openai_lost(self, msg: Any, openai: OpenAISocket) -> Exception:
        because, self._lost_because = self._lost_because, None
        if because is not None:
            return _ModelLost(because)
        if msg.type in _CLOSED:
            return _ModelLost(f"OpenAI closed the session (code {openai.close_code})")
        if msg.type is WSMsgType.ERROR:
            return _ModelLost(f"OpenAI socket error: {type(msg.data).__name__}: {msg.data}")
        return _fail(base.OPENAI_ERROR, "OpenAI sent a non-text frame")

    async def _on_openai(self, event: oai.OpenAIEvent) -> None:
        kind = oai.type_of(event)
        if kind in self._logged and kind != "error":
            self.log.info("openai %s %s", kind, oai.describe(event))
        if isinstance(event, oai.SessionUpdated):
            await self._on_session_updated(event)
        elif isinstance(event, oai.SpeechStopped):
            self._speech_stopped(event.audio_end_ms)
        for feature in self._openai_dispatch.get(type(event), ()):
            await feature.on_openai(event)
        if isinstance(event, oai.Error):  # after the features saw it (metrics, the record)
            if event.code in RENEWABLE_ERRORS:
                raise _ModelLost(f"OpenAI error {event.code}: {event.message}")
            if event.fatal:
                raise _fail(base.OPENAI_ERROR, f"OpenAI error {event.code}: {event.message}")
            self.log.warning("OpenAI error %s: %s", event.code, event.message)

    async def _on_session_updated(self, event: oai.SessionUpdated) -> None:
        formats = [event.input_format, event.output_format]
        if any(f not in (None, "audio/pcmu") for f in formats):
            raise _fail(base.OPENAI_ERROR, f"OpenAI session is not in audio/pcmu (got {formats})")
        if self._session_ready:
            return
        self._session_ready = True
        first = self.record.session_ready_ms is None and self._resumed is None
        if self.record.session_ready_ms is None:
            self.record.session_ready_ms = (time.monotonic() - self.started) * 1000
            self.log.info("session ready %.0f ms after the stream opened",
                          self.record.session_ready_ms)
        for feature in self.features:
            await feature.on_session_ready(first)

    def _speech_stopped(self, audio_end_ms: int | None) -> None:
        """Where the caller really stopped speaking: `audio_end_ms` is on the session's audio
        timeline, which the bridge fed in real time (Twilio sends a 20 ms frame every 20 ms),
        so that audio reached the bridge as long ago as the audio appended since then lasts.
        The VAD's silence window is thus counted, as the caller lives it."""
        now = time.monotonic()
        if audio_end_ms is None:
            self.latency.speech_ended(now)
            return
        appended_ms = (self.record.frames_in - self._frames_base) * FRAME_MS
        self.latency.speech_ended(now - max(appended_ms - audio_end_ms, 0) / 1000)

    # --- model sessions: the first, and new ones that continue the conversation ---

    async def _start_session(self, openai: OpenAISocket) -> None:
        """session.update first, then the conversation so far (a new session starts empty)."""
        self._session_ready = False
        self._frames_base = self.record.frames_in - (len(self._gap) if self._gap else 0)
        await openai.send_frame(self._session_update(), TEXT)
        if self.record.timeline:
            for item in conversation_items(self.record.timeline):
                await openai.send_frame(item, TEXT)

    def _begin_session(self, why: str) -> None:
        self.record.sessions.append({"started_at": iso(utc_now()), "why": why})
        self.record.version += 1

    def _end_session(self, reason: str) -> None:
        if self.record.sessions:
            self.record.sessions[-1].update(ended_at=iso(utc_now()), ended_because=reason)

    def _begin_gap(self) -> GapBuffer:
        if self._gap is None:
            frames = int(self.settings.reconnect_buffer_seconds * 50)  # 20 ms frames
            self._gap = GapBuffer(frames)
            self._model_send = self._gap.send
        return self._gap

    async def _reconnect(self, reason: str) -> None:
        """A new session within RECONNECT_WITHIN, in up to RECONNECT_ATTEMPTS tries; the caller
        keeps talking into a buffer meanwhile. Ends the call if every attempt fails."""
        s = self.settings
        self._end_session(reason)
        if s.reconnect_attempts <= 0:
            raise _fail(base.OPENAI_ERROR, reason)
        self.log.warning("model session lost (%s): opening a new one", reason)
        gap = self._begin_gap()
        lost_at = time.monotonic()
        old, self._openai = self._openai, None
        if old is not None:
            self.spawn(_close_quietly(old), "close-old-session")
        self.barge_in.forget()  # the old session's items are gone: nothing left to truncate
        self.gate.reset()
        failures: list[str] = []
        deadline = lost_at + s.reconnect_within
        for _ in range(s.reconnect_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    openai = await self._connect_openai()
                    await self._start_session(openai)
            except _End as e:
                failures.append(e.ending.reason)
                continue
            except TimeoutError:
                failures.append(f"no new session within {s.reconnect_within:g} s")
                break
            except (ConnectionError, aiohttp.ClientError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            for frame in gap.drain():
                await openai.send_frame(frame, TEXT)
            self._openai, self._model_send, self._gap = openai, openai.send_frame, None
            gap_ms = (time.monotonic() - lost_at) * 1000
            self._begin_session(f"replaced a lost session ({reason})")
            self.record.sessions[-1]["gap_ms"] = round(gap_ms, 1)
            self.log.warning("new model session in %.0f ms; %d caller frames carried over"
                             "%s", gap_ms, gap.received - gap.dropped,
                             f", {gap.dropped} dropped" if gap.dropped else "")
            return
        raise _fail(base.OPENAI_ERROR,
                    f"{reason}; no new session: {'; '.join(failures) or 'out of time'}")
