"""One phone call: the Twilio media stream joined to a model session.

The call is an orchestrator. It owns both sockets (the model's through its `ModelLink`), the
relay tasks and one watchdog, the tasks its features start, the call's record and conversation,
its event stream, and the one decision of how it ends. Audio takes the direct path (Twilio
media -> the model session's `send_audio`; model audio -> `Playback.play`, which marks it and
sends it on); every other event is typed by the wire modules and the model session and handed
to the call's own parts (playback, the response gate) and then to the features that declared
it. Whatever ends first (caller hangs up, a feature ends the call, the model fails, bad input,
idle stream, shutdown, an operator) ends the call: every task is cancelled and both sockets
closed before `run()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from server.call import start
from server.call.conversation import Conversation
from server.call.ending import CallEnds, Ending, EndKind, Refusal, failed, hung_up
from server.call.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    EventStream,
    ModelErrored,
    ModelReady,
    Subscription,
)
from server.call.features.base import Feature
from server.call.gate import ResponseGate
from server.call.latency import FRAME_MS, TurnLatency
from server.call.model_link import ModelLink, SendWrapper, SessionFactory, realtime_factory
from server.call.plan import CallPlan, Plans, Resolved
from server.call.playback import AudioListener, Playback
from server.call.record import CallRecord, utc_now
from server.fleet.tokens import StreamTokens
from server.logs import CallLog, RepeatedWarnings, mask_number
from server.models import events as ev
from server.models.session import NO_SESSION, ModelSession, ModelUnavailable, SessionConfig
from server.settings import Settings
from server.wire import twilio as tw

if TYPE_CHECKING:
    from server.call.features.base import CallControl
    from server.call.prewarm import Prewarmer

log = logging.getLogger("server.call")

TEXT = WSMsgType.TEXT
FeatureFactory = Callable[["CallControl"], Feature | None]
T = TypeVar("T")
F = TypeVar("F", bound=Feature)
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
_CLOSE_WITHIN = 1.0
BUILTIN_TOOLS = frozenset({"end_call"})  # offered whatever the plan's tool list says
PLAYBACK_EVENTS = (ev.AudioDone, ev.ResponseCreated, ev.ResponseDone, ev.SpeechStarted,
                   ev.TranscriptDelta, ev.ModelYielded)
GATE_EVENTS = (ev.ResponseCreated, ev.ResponseDone, ev.SpeechStarted, ev.SpeechStopped,
               ev.ModelError)


class CallHooks(Protocol):
    """What the fleet does around a call (the registry implements it)."""

    async def admit(self, call: Call, token: str | None) -> Refusal | None:
        """The stream started: claim its token, capacity and call. Why to refuse, or None."""

    async def resume(self, call: Call) -> dict[str, Any] | None:
        """A call handed over from another instance: its saved context (restores the record;
        may hold its plan), or None if there is none."""

    async def plan(self, call: Call) -> CallPlan | None:
        """The plan decided for this call before its stream (the webhook, the outbound API)."""

    async def ended(self, call: Call, ending: Ending) -> None:
        """The call is over: its sockets are closed; store the decision, free the slot."""


class CallListener(Protocol):
    """Follows every call losslessly, in process (records, metrics): `on_call_event` runs
    synchronously for each event, refused streams' included, and must return at once."""

    def on_call_event(self, call: Call, event: CallEvent) -> None: ...


@dataclass(frozen=True)
class CallDeps:
    """What every call shares; owned by the app."""

    settings: Settings
    http: aiohttp.ClientSession
    plans: Plans
    tokens: StreamTokens | None
    hooks: CallHooks | None = None
    features: Sequence[FeatureFactory] = field(default_factory=tuple)
    listeners: Sequence[CallListener] = field(default_factory=tuple)
    sessions: Callable[[Call], SessionFactory] = realtime_factory
    # Sessions opened at the webhook (server.call.prewarm); None: every stream opens its own
    prewarm: Prewarmer | None = None


class Call:
    """One call; implements `CallControl` for its features."""

    # A call lives as long as the phone call and there are hundreds: no per-instance dict.
    __slots__ = (
        "__weakref__",
        "_deps",
        "_ending",
        "_logged",
        "_model_dispatch",
        "_owned",
        "_received",
        "_relays",
        "_resolved",
        "_session_ready",
        "_twilio",
        "_twilio_dispatch",
        "_warnings",
        "call_sid",
        "called",
        "caller",
        "ending",
        "events",
        "features",
        "features_built",
        "finished",
        "gate",
        "http",
        "latency",
        "link",
        "log",
        "plan",
        "playback",
        "record",
        "refusal",
        "resumed",
        "settings",
        "started",
        "stream_sid",
    )

    def __init__(self, deps: CallDeps, twilio: web.WebSocketResponse, peer: str) -> None:
        self._deps = deps
        self.settings = deps.settings
        self.http = deps.http
        self._twilio = twilio
        self._relays: list[asyncio.Task[None]] = []
        self._owned: set[asyncio.Task[None]] = set()
        self.log = CallLog(log, {"peer": peer})
        self.stream_sid = self.call_sid = self.caller = self.called = ""
        self.plan = CallPlan()
        self._resolved: Resolved | None = None
        self.record = CallRecord(model=deps.settings.openai_model,
                                 prompt=deps.plans.default_prompt.describe())
        self.started = time.monotonic()
        self._received = 0  # every Twilio frame: the watchdog's counter
        self._ending: asyncio.Future[Ending] | None = None
        self._session_ready = False
        self.resumed = False  # a call handed over to us from another instance
        self.finished = asyncio.Event()
        self.events = EventStream(self.started)
        for listener in deps.listeners:
            self.events.on_every(partial(listener.on_call_event, self))
        self.playback = Playback(self)
        self.gate = ResponseGate(self)
        self.latency = TurnLatency()
        self.link = ModelLink(self, deps.sessions(self), self._session_config)
        if deps.prewarm is not None:
            self.link.adopt = partial(deps.prewarm.adopt, self)
        self.features: list[Feature] = []
        self._twilio_dispatch: dict[type, list[Feature]] = {}
        self._model_dispatch: dict[type, list[Feature]] = {}
        self.ending: Ending | None = None
        self.features_built = False
        self.refusal: Refusal | None = None  # why the stream was not admitted
        self._warnings = RepeatedWarnings()

    # --- CallControl ---

    @property
    def conversation(self) -> Conversation:
        return self.record.conversation

    @property
    def model(self) -> ModelSession:
        session = self.link.session
        return session if session is not None else NO_SESSION

    async def send_to_caller(self, frame: bytes) -> None:
        if not self._twilio.closed:
            with contextlib.suppress(ConnectionError):  # gone: the Twilio relay ends the call
                await self._twilio.send_frame(frame, TEXT)

    def publish(self, event: CallEvent) -> None:
        self.events.publish(event)

    def subscribe(self, replay: bool = True) -> Subscription:
        """The call's events as JSON objects (from its start, with `replay`), then live; a
        subscriber that falls behind gets `dropped` markers, never a slower call."""
        return self.events.subscribe(replay)

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

    def ending_error(self, ending: Ending) -> CallEnds:
        """For the call's parts: `raise call.ending_error(...)` ends the call from a relay."""
        return CallEnds(ending)

    @property
    def playback_idle(self) -> bool:
        return self.playback.idle

    async def wait_played(self, timeout: float) -> bool:
        return await self.playback.wait_played(timeout)

    async def request_response(self, reason: str, instructions: str | None = None) -> None:
        await self.gate.request(reason, instructions)

    async def hold_assistant(self, held: bool) -> None:
        """Keep the assistant from speaking (an outbound call waiting for its answering-machine
        result), or let it speak again: response requests wait in the gate, and audio the model
        already made is kept back, then played on release."""
        if held:
            self.playback.hold()
            await self.gate.hold(True)
        else:
            await self.gate.hold(False)
            # What was kept back answers no caller turn: it counts toward no reply latency.
            self.latency.reply_started()
            # A model that takes its own turns talks all the time: what it said while held
            # (to no one) is dropped; a Realtime session's is a greeting made ahead: it plays.
            await self.playback.release(play=not self.model.decides_turns)

    async def listen_only(self, on: bool) -> None:
        """The model listens (transcribes, remembers) but makes no response of its own, nor
        is it interrupted; requests through the gate still make one."""
        self.gate.auto_responses = not on
        await self.model.listen_only(on)

    async def cut_assistant(self) -> None:
        """Stop the assistant now and forget what it was about to say (an answering machine
        answered): requests still waiting are withdrawn, audio kept back or playing is dropped
        (the model told what was heard), and it may be asked to speak again at once."""
        self.gate.withdraw()
        await self.playback.cut()
        await self.gate.hold(False)

    def hold_playback(self, on: bool) -> None:
        """Hold audio plays (on) or stopped (off): the model's audio is not played meanwhile
        (GPT-Live's flows all the time; Realtime sends none while a tool runs)."""
        self.playback.holding = on

    def warn(self, message: str) -> None:
        """A warning caused by this call's input: the first few are logged, the rest counted
        and reported once when the call ends."""
        self._warnings.warn(self.log, message)

    def session_lost(self) -> None:
        """The model session is gone: nothing of it is playing or pending any more."""
        self._session_ready = False
        self.playback.forget()  # the old session's items are gone: nothing left to truncate
        self.gate.reset()

    # --- what an operator's powers need (server/call/features/operator.py) ---

    def feature(self, kind: type[F]) -> F | None:
        """This call's feature of that type, if it has one (the console's way to the
        operator's powers)."""
        for feature in self.features:
            if isinstance(feature, kind):
                return feature
        return None

    async def mute_assistant(self, on: bool) -> None:
        """An operator takes the call (on): the model's audio stops reaching the caller (what
        is playing is cleared) and the gate holds every response; off: both come back."""
        if on:
            self.playback.muted = True  # before the clear: no delta slips in after it
            await self.playback.clear()
        else:
            self.playback.muted = False
        await self.gate.hold(on)

    def route_caller_audio(self, wrap: SendWrapper | None) -> None:
        """The caller's audio to the model goes through `wrap` (an operator's mixer), or
        straight again with None."""
        self.link.route(wrap)

    def input_frame(self, audio_ms: int | None = None) -> int:
        """The caller frame (its index in `record.frames_in`) at `audio_ms` on the current
        session's audio timeline; the next frame to arrive when None."""
        if audio_ms is None:
            return self.record.frames_in
        return self.link.frames_base + audio_ms // FRAME_MS

    @property
    def audio_listeners(self) -> list[AudioListener]:
        """Who hears the call's audio (recording, listen-in); add and remove at any time."""
        return self.playback.listeners

    # --- lifecycle ---

    async def run(self) -> None:
        self._ending = asyncio.get_running_loop().create_future()
        ending = hung_up("call ended")
        try:
            ending = await self._run()
        except CallEnds as e:
            ending = e.ending
        except asyncio.CancelledError:
            # Shutdown ends calls through `end()`; aiohttp cancels a handler only when its
            # connection is gone (or a shutdown timed out): treat it as the caller leaving.
            ending = hung_up("the stream's connection was dropped", WSCloseCode.GOING_AWAY)
            raise
        except Exception:
            self.log.exception("call failed: internal error")
            ending = failed(EndKind.INTERNAL_ERROR, "internal error")
        finally:
            # The clean-up must finish even if this task is cancelled again meanwhile (a second
            # shutdown signal, or a test server cancelling handlers when the client drops).
            await asyncio.shield(self._close(ending))

    def shutdown(self, ending: Ending | None = None) -> None:
        """Server is stopping: end this call now (by default with GOING_AWAY and the spoken
        fallback). Only the call's own tasks are cancelled, never aiohttp's handler."""
        self.end(ending or failed(EndKind.SHUTDOWN, "server shutting down",
                                  WSCloseCode.GOING_AWAY, logging.INFO))

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        return (*self._relays, *self._owned)

    @property
    def sockets_closed(self) -> bool:
        session = self.link.session
        return self._twilio.closed and (session is None or session.closed)

    async def _run(self) -> Ending:
        begun = await self._or_ended(start.receive_start(self._twilio,
                                                         self.settings.stream_start_timeout))
        self.stream_sid, self.call_sid = begun.stream_sid, begun.call_sid
        self.caller = begun.parameters.get("caller", "")
        self.called = begun.parameters.get("called", "")
        rec = self.record
        rec.call_sid, rec.stream_sid, rec.caller, rec.called = (
            self.call_sid, self.stream_sid, self.caller, self.called)
        self.log = CallLog(log, {**(self.log.extra or {}), "call_sid": begun.call_sid,
                                 "stream_sid": begun.stream_sid})
        await self._or_ended(start.admit(self, self._deps, begun))
        self.events.call_sid, self.events.public = self.call_sid, True
        self._resolved = await self._or_ended(
            start.decide_plan(self, self._deps, bool(begun.parameters.get("resume"))))
        self._build_features()
        try:
            await self._or_ended(self.link.open("handed over" if self.resumed
                                                else "call started"))
        except ModelUnavailable as e:
            raise CallEnds(failed(EndKind.OPENAI_ERROR, str(e))) from None
        self.playback.attach(self._twilio.send_frame)
        show = self.settings.log_pii
        self.log.info("call started: caller=%s called=%s", mask_number(self.caller, show),
                      mask_number(self.called, show))
        self.publish(CallStarted(
            self.plan.direction, mask_number(self.caller, show), self.called, self.stream_sid,
            self.plan.model_api, rec.model, rec.prompt, rec.to_dict()["started_at"]))
        loop = asyncio.get_running_loop()
        self._relays = [
            loop.create_task(self._guard(self._relay_twilio()), name="relay-twilio"),
            loop.create_task(self._guard(self.link.run(self.playback.play, self._on_model)),
                             name="relay-model"),
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
        raise CallEnds(self._ending.result())

    async def _guard(self, relay: Awaitable[None]) -> None:
        """Turns the ways a relay can stop into one Ending."""
        try:
            await relay
        except CallEnds as e:
            self.end(e.ending)
        except (ConnectionError, aiohttp.ClientError) as e:
            self.end(failed(EndKind.INTERNAL_ERROR, f"socket lost: {type(e).__name__}: {e}",
                            level=logging.WARNING))
        except Exception:
            self.log.exception("relay failed: internal error")
            self.end(failed(EndKind.INTERNAL_ERROR, "internal error"))

    async def _owned_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("call task %s failed", name)

    async def _close(self, ending: Ending) -> None:
        self.ending = ending
        try:  # the session's last word (GPT-Live: its final usage) before the record is final;
            # not for a handover: the caller waits for the new stream (closed alongside it)
            if ending.kind != EndKind.HANDOVER:
                await self.link.finish()
        except Exception:
            self.log.exception("finishing the model session failed")
        rec = self.record
        rec.ended_at = rec.ended_at or utc_now()
        rec.end_kind, rec.end_reason = ending.kind, ending.reason
        self.link.end_session(ending.reason)
        self.gate.close()
        for feature in self.features:
            try:
                await feature.on_end(ending)
            except Exception:
                self.log.exception("feature %s failed at the end of the call", feature.name)
        rec.touch()
        self._warnings.report(self.log)
        summary = {
            "reason": ending.reason,
            "end": str(ending.kind),
            "seconds": round(time.monotonic() - self.started, 1),
            "frames_in": rec.frames_in,
            "frames_out": rec.frames_out,
            "interruptions": self.playback.state.interruptions,
            "input_tokens": int(rec.usage.get("input_tokens", 0)),
            "output_tokens": int(rec.usage.get("output_tokens", 0)),
        }
        self.log.log(
            ending.level,
            "call ended: %(reason)s (%(seconds).1f s, %(frames_in)d frames in, "
            "%(frames_out)d frames out, %(interruptions)d interruptions, "
            "tokens in=%(input_tokens)d out=%(output_tokens)d)",
            summary,
            extra={"call": summary},
        )
        try:  # the listeners (records, metrics) and subscribers learn how it ended
            self.publish(CallEnded(str(ending.kind), ending.reason, rec.duration,
                                   self.refusal.reason if self.refusal else None))
        except Exception:
            self.log.exception("a listener failed at the end of the call")
        self.events.close()
        tasks = self.tasks
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._relays = []
        closing = [self._twilio.close(code=ending.code), self.link.close()]
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

    def _build_features(self) -> None:
        self.features_built = True
        for factory in self._deps.features:
            feature = factory(self)
            if feature is not None:
                self.features.append(feature)
        for feature in self.features:
            for kind in feature.twilio_events:
                self._twilio_dispatch.setdefault(kind, []).append(feature)
            for kind in feature.model_events:
                self._model_dispatch.setdefault(kind, []).append(feature)
            for call_event in feature.call_events:
                self.events.on(call_event, feature.on_event)
            if feature.wants_audio:
                self.playback.listeners.append(feature)

    def _session_config(self) -> SessionConfig:
        assert self._resolved is not None
        return start.session_config(self, self._resolved)

    @property
    def greeting(self) -> str | None:
        """The plan's greeting, rendered for this call (None: the caller speaks first)."""
        return start.greeting(self, self._resolved)

    # --- the relay: Twilio -> the model ---

    async def _relay_twilio(self) -> None:
        receive = self._twilio.receive
        decode = tw.decode
        mark = tw.Mark
        mark_played = self.playback.mark_played
        record = self.record
        link = self.link
        listeners = self.playback.listeners  # the same list: listeners added later are heard
        dispatch = self._twilio_dispatch
        while True:
            msg = await receive()
            self._received += 1
            if msg.type is not TEXT:
                start.decode_frame(msg, self._twilio)  # raises the right ending
            try:
                event = decode(msg.data)
            except tw.TwilioProtocolError as e:
                raise start.bad_input(str(e)) from None
            if isinstance(event, str):  # tw.Media: the payload itself
                try:
                    await link.send(event)
                except ConnectionError:  # the model socket just died: keep it for the next
                    await link.gap_send(event)
                record.frames_in += 1
                for listener in listeners:
                    listener.on_caller_audio(event)
                continue
            if type(event) is mark:
                mark_played(event.name)
                continue
            if isinstance(event, tw.Stop):
                raise CallEnds(hung_up("Twilio stopped the stream (call over)"))
            if isinstance(event, (tw.Connected, tw.Start)):
                self.warn(f"ignored a repeated {type(event).__name__.lower()!r} event")
            for feature in dispatch.get(type(event), ()):
                await feature.on_twilio(event)

    async def _watch(self) -> None:
        """One watchdog per call instead of a timer on every received frame (aiohttp's own
        heartbeat re-arms a timer per chunk received): a Twilio stream that sends nothing for
        STREAM_IDLE_TIMEOUT is ended, and a quiet model session is pinged, then given up (and
        replaced) if nothing at all comes back within OPENAI_HEARTBEAT."""
        limit, heartbeat = self.settings.stream_idle_timeout, self.settings.openai_heartbeat
        step = min(5.0, limit / 4, heartbeat / 2 if heartbeat else 5.0)
        seen, quiet_since = self._received, time.monotonic()
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            if self._received != seen:
                seen, quiet_since = self._received, now
            elif now - quiet_since >= limit:
                raise CallEnds(failed(EndKind.IDLE, f"no frames from Twilio for {limit:g} s",
                                      WSCloseCode.GOING_AWAY, logging.WARNING))
            await self.link.heartbeat(now, heartbeat)

    # --- the model's events (audio goes straight to playback) ---

    async def _on_model(self, event: ev.ModelEvent) -> None:
        if type(event) is ev.SessionReady:
            await self._on_session_ready()
            return
        if isinstance(event, PLAYBACK_EVENTS):
            await self.playback.on_model(event)
        if isinstance(event, GATE_EVENTS):
            await self.gate.on_model(event)
        if isinstance(event, ev.SpeechStopped):
            self.latency.speech_ended(self.link.speech_end(event.audio_end_ms, time.monotonic()))
        elif isinstance(event, ev.ModelError):
            self.publish(ModelErrored(event.code, event.message))
        for feature in self._model_dispatch.get(type(event), ()):
            await feature.on_model(event)

    async def _on_session_ready(self) -> None:
        if self._session_ready:
            return
        self._session_ready = True
        first = self.record.session_ready_ms is None and not self.resumed
        if self.record.session_ready_ms is None:
            self.record.session_ready_ms = (time.monotonic() - self.started) * 1000
            self.log.info("session ready %.0f ms after the stream opened",
                          self.record.session_ready_ms)
        self.playback.continuous = self.model.decides_turns  # GPT-Live: marks only on demand
        self.publish(ModelReady(first, (self.record.session_ready_ms or 0.0) / 1000))
        for feature in self.features:
            await feature.on_session_ready(first)
        await self.gate.on_session_ready()
