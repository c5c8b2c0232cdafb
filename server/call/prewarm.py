"""Speak first without delay: the model session is opened at the webhook, before the stream.

At the voice webhook the CallSid and the call's plan are known, so the model session can be
opened and configured while Twilio is still opening the media stream, and with a greeting its
first audio can already be made. When the stream starts, its call adopts the ready session
(`ModelLink.adopt`) instead of opening one: the handshake and the set-up are behind it, and the
greeting's audio, kept until then, goes out at once (on an outbound call it is kept until the
answering-machine result says a person answered: server.call.features.answering).

- Per backend: each `ModelSession` says how far it may be made ready before its stream
  (`prewarm_level`, server.models.session). Realtime bills by tokens, so an open idle session
  costs nothing: it is opened, configured and its greeting made. A backend that bills per
  second of session and needs the caller's audio to speak (GPT-Live) declares less.
- A session is adopted only when the call's configuration is exactly the one it was opened
  with; otherwise it is closed and the call opens its own.
- A session no stream takes within STREAM_START_TIMEOUT is closed: the stream went to another
  instance (which opened its own), or never came. Pre-warmed sessions belong to calls whose
  slot the webhook reserved, so they count toward MAX_CALLS; `bridge_prewarmed_sessions` shows
  how many are open and not taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from uuid import uuid4

import aiohttp

from server.call.features.greeting import instructions as greeting_instructions
from server.call.plan import CallPlan, Plans
from server.call.record import CallRecord
from server.call.start import build_config, plan_values, session_model
from server.logs import CallLog
from server.models import events as ev
from server.models.session import (
    AudioHandler,
    EventHandler,
    ModelLost,
    ModelSession,
    ModelUnavailable,
    SessionConfig,
    ToolSpec,
    prewarm_level,
)
from server.settings import ConfigError, Settings

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from server.call.call import Call, FeatureFactory
    from server.call.model_link import SessionFactory

log = logging.getLogger("server.call")

MAX_KEPT = 20_000  # events kept for a session not yet taken (a greeting is a few hundred)
GREETING_REASON = "greeting"  # the gate's reason for the greeting (GreetingFeature's)


class PrewarmedSession:
    """A `ModelSession` opened before its call. A reader task runs the inner session from the
    moment it is open and keeps what it says; the call's relay (`run`) gets the kept events in
    order, then everything else as it comes, and ends as the inner session's `run` ends."""

    def __init__(self, inner: ModelSession, greeting: str | None,
                 listen_only: bool = False) -> None:
        self.inner = inner
        self.api = inner.api
        self.decides_turns = inner.decides_turns
        self.send_audio: Callable[[str], Awaitable[None]] = inner.send_audio
        self._greeting = greeting
        self._listen_only = listen_only
        self.greeting_id: str | None = None  # the greeting's response.create, once sent
        self.greeting_instructions = greeting_instructions(greeting) if greeting else None
        self._kept: deque[tuple[bool, Any]] | None = deque()  # None once the call reads it
        self._audio: AudioHandler = self._keep_audio
        self._event: EventHandler = self._keep_event
        self._reader: asyncio.Task[None] | None = None
        self._adopted = False
        self.opened_at = time.monotonic()
        self.ready_at: float | None = None  # the session was configured (SessionReady)
        self.first_audio_at: float | None = None  # its greeting's first audio arrived

    @property
    def received(self) -> int:
        return self.inner.received

    @received.setter
    def received(self, value: int) -> None:
        self.inner.received = value

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def kept(self) -> int:
        return len(self._kept) if self._kept is not None else 0

    async def open(self, config: SessionConfig, conversation: Sequence[Any]) -> None:
        await self.inner.open(config, conversation)
        self.send_audio = self.inner.send_audio
        if self._listen_only:  # outbound: a "Hello?" must not be answered before AMD says
            await self.inner.listen_only(True)
        self._reader = asyncio.get_running_loop().create_task(
            self.inner.run(self._on_audio, self._on_event), name="prewarmed-session")

    def adopted(self) -> None:
        """A call took it: from now on the call's gate asks for responses (no greeting is
        sent from here any more, even if the session is not configured yet)."""
        self._adopted = True

    # --- before the call's relay runs: keep everything ---

    # Plain functions returning the current handler's own awaitable: once the call has the
    # session, a delta costs no coroutine of ours on the way to playback.
    def _on_audio(self, event: ev.AudioDelta) -> Awaitable[object]:
        return self._audio(event)

    def _on_event(self, event: ev.ModelEvent) -> Awaitable[None]:
        return self._event(event)

    async def _keep_audio(self, event: ev.AudioDelta) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
        self._keep(True, event)

    async def _keep_event(self, event: ev.ModelEvent) -> None:
        self._keep(False, event)
        if type(event) is ev.SessionReady and self.ready_at is None:
            self.ready_at = time.monotonic()
            if self.greeting_instructions is not None and not self._adopted:
                self.greeting_id = f"bridge_prewarm_{uuid4().hex[:12]}"
                await self.inner.create_response(self.greeting_instructions, self.greeting_id)

    def _keep(self, audio: bool, event: Any) -> None:
        kept = self._kept
        assert kept is not None, "kept after the call took the session"
        if len(kept) >= MAX_KEPT:
            raise ModelLost(f"{MAX_KEPT} events kept before any stream took the session")
        kept.append((audio, event))

    # --- ModelSession ---

    async def run(self, on_audio: AudioHandler, on_event: EventHandler) -> None:
        """The kept events first, in order, then the live ones; raises what the inner
        session's `run` raises (ModelLost, ModelFailed), or what a handler raised."""
        reader = self._reader
        assert reader is not None, "run before open"
        kept = self._kept
        assert kept is not None, "run twice"
        while kept:
            audio, event = kept.popleft()
            if audio:
                await on_audio(event)
            else:
                await on_event(event)
        self._audio, self._event = on_audio, on_event  # no await since the queue emptied
        self._kept = None  # nothing is kept any more: the call's handlers have it all
        await reader  # cancelling the relay cancels the reader too

    async def add_tool_result(self, call_id: str, output: str) -> None:
        await self.inner.add_tool_result(call_id, output)

    async def add_text(self, role: str, text: str) -> None:
        await self.inner.add_text(role, text)

    async def create_response(self, instructions: str | None, event_id: str) -> None:
        await self.inner.create_response(instructions, event_id)

    async def truncate(self, item_id: str, heard_ms: int) -> None:
        await self.inner.truncate(item_id, heard_ms)

    async def listen_only(self, on: bool) -> None:
        await self.inner.listen_only(on)

    async def lose(self, reason: str) -> None:
        await self.inner.lose(reason)

    async def ping(self) -> None:
        await self.inner.ping()

    async def finish(self) -> None:
        await self.inner.finish()

    async def close(self) -> None:
        await self.inner.close()
        reader = self._reader
        if reader is not None:
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def __getattr__(self, name: str) -> Any:
        """What a backend adds to the interface later passes straight through."""
        if name == "inner":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


@dataclass
class _Owner:
    """What a session factory reads of its call (settings, client session, log), for a
    session opened before the call exists."""

    settings: Settings
    http: aiohttp.ClientSession
    log: CallLog
    plan: CallPlan
    call_sid: str


@dataclass
class _Entry:
    call_sid: str
    config: SessionConfig
    session: PrewarmedSession
    log_ids: dict[str, object]  # what the session's log lines carry
    opening: asyncio.Task[bool] | None = None
    expiry: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)


class Prewarmer:
    """The app's pre-warmed sessions, by CallSid: `start` at the webhook, `adopt` when the
    stream starts, `close` at shutdown."""

    def __init__(self, settings: Settings, http: aiohttp.ClientSession, plans: Plans,
                 sessions: Callable[[Call], SessionFactory],
                 offered: Sequence[ToolSpec] | None, gauge: Gauge | None = None) -> None:
        """`sessions`: the calls' session factory (CallDeps.sessions); `offered`: the tools
        the features offer (`offered_tools`), None when they cannot be known before a call
        (then nothing is pre-warmed)."""
        self._settings = settings
        self._http = http
        self._plans = plans
        self._sessions = sessions
        self._offered = tuple(offered) if offered is not None else None
        self._gauge = gauge
        self._entries: dict[str, _Entry] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.adopted = 0  # sessions taken by their stream, since start
        self.expired = 0  # sessions closed because no stream took them in time

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self._settings.prewarm and self._offered is not None and not self._closed

    def start(self, call_sid: str, plan: CallPlan, caller: str, called: str) -> bool:
        """Open and configure this call's session now (in the background); False when it is
        not pre-warmed (off, already under way, a backend that does not allow it, a plan
        this instance cannot follow: the stream's call then reports that itself)."""
        if not self.enabled or not call_sid or call_sid in self._entries:
            return False
        offered = self._offered
        assert offered is not None
        ids: dict[str, object] = {"call_sid": call_sid}  # the stream's ids join at adoption
        owner = _Owner(self._settings, self._http, CallLog(log, ids), plan, call_sid)
        try:
            resolved = self._plans.resolve(plan)
            inner = self._sessions(cast("Call", owner))(plan.model_api)
        except (ConfigError, ModelUnavailable):
            return False
        if prewarm_level(inner) != "session":
            return False
        filled = plan_values(plan, caller, called, call_sid)
        config = build_config(plan, resolved, filled, session_model(self._settings, resolved),
                              offered)
        greeting = resolved.greeting.render(filled) if resolved.greeting is not None else None
        session = PrewarmedSession(inner, greeting, listen_only=plan.direction == "outbound")
        entry = _Entry(call_sid, config, session, ids)
        loop = asyncio.get_running_loop()
        entry.opening = loop.create_task(self._open(entry, owner.log), name="prewarm-open")
        entry.expiry = loop.call_later(self._settings.stream_start_timeout, self._expire,
                                       call_sid)
        self._entries[call_sid] = entry
        if self._gauge is not None:
            self._gauge.inc()
        return True

    async def _open(self, entry: _Entry, call_log: CallLog) -> bool:
        try:
            await entry.session.open(entry.config, ())
        except ModelUnavailable as e:
            call_log.warning("pre-warming the model session failed: %s", e)
        except (ConnectionError, aiohttp.ClientError) as e:
            call_log.warning("pre-warming the model session failed: %s: %s", type(e).__name__,
                             e)
        else:
            return True
        await entry.session.close()
        return False

    async def adopt(self, call: Call, config: SessionConfig) -> ModelSession | None:
        """The session pre-warmed for this call, ready (waiting for its opening if it is
        still under way), when it was made with `config`; None otherwise (the call opens its
        own). A handed-over call never takes one: its stream was not announced by a webhook."""
        entry = self._take(call.call_sid)
        if entry is None:
            return None
        if call.resumed:
            self._close_later(entry)
            return None
        assert entry.opening is not None
        try:
            ok = await asyncio.shield(entry.opening)
        except asyncio.CancelledError:  # the call ended while waiting: nobody takes it now
            self._close_later(entry)
            raise
        if not ok:
            return None
        session = entry.session
        if session.closed or entry.config != config or session.api != call.plan.model_api:
            call.log.info("the pre-warmed model session is not used: %s", "it closed"
                          if session.closed else "the call's configuration differs")
            self._close_later(entry)
            return None
        session.adopted()
        entry.log_ids.update(call.log.extra or {})
        if session.greeting_id is not None:
            call.gate.presend(session.greeting_id, GREETING_REASON,
                              session.greeting_instructions)
        self.adopted += 1
        now = time.monotonic()
        call.log.info("adopted the model session pre-warmed at the webhook %.0f ms ago "
                      "(%s, %d events kept)", (now - entry.started) * 1000,
                      "its greeting's audio ready" if session.first_audio_at is not None
                      else "configured" if session.ready_at is not None else "still opening",
                      session.kept)
        return session

    def _take(self, call_sid: str) -> _Entry | None:
        entry = self._entries.pop(call_sid, None)
        if entry is not None:
            if entry.expiry is not None:
                entry.expiry.cancel()
            if self._gauge is not None:
                self._gauge.dec()
        return entry

    def _expire(self, call_sid: str) -> None:
        entry = self._take(call_sid)
        if entry is not None:
            self.expired += 1
            log.info("pre-warmed model session of %s closed: no stream took it within %g s",
                     call_sid, self._settings.stream_start_timeout)
            self._close_later(entry)

    def _close_later(self, entry: _Entry) -> None:
        task = asyncio.get_running_loop().create_task(self._close_entry(entry),
                                                      name="prewarm-close")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _close_entry(entry: _Entry) -> None:
        opening = entry.opening
        if opening is not None and not opening.done():
            opening.cancel()
        if opening is not None:
            await asyncio.gather(opening, return_exceptions=True)
        await entry.session.close()

    async def close(self) -> None:
        """At shutdown: every session not taken is closed."""
        self._closed = True
        for call_sid in list(self._entries):
            entry = self._take(call_sid)
            if entry is not None:
                self._close_later(entry)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class _Probe:
    """A stand-in call for asking features which tools they offer (their constructors only
    keep the call they are given)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.call_sid = self.stream_sid = self.caller = self.called = ""
        self.plan = CallPlan()
        self.record = CallRecord()
        self.log = CallLog(log, {})
        self.http = None
        self.greeting = None


def offered_tools(factories: Sequence[FeatureFactory], settings: Settings,
                  ) -> tuple[ToolSpec, ...] | None:
    """The tools the calls' features offer the model (before any call exists, for sessions
    pre-warmed at the webhook); None, and pre-warming is off, when a feature cannot be asked
    that way (logged once)."""
    probe = cast("Any", _Probe(settings))
    tools: list[ToolSpec] = []
    for factory in factories:
        try:
            feature = factory(probe)
            if feature is not None:
                tools.extend(feature.tools())
        except Exception as e:
            log.warning("sessions are not pre-warmed at the webhook: a feature's tools cannot "
                        "be known before its call (%s: %s)", type(e).__name__, e)
            return None
    return tuple(tools)


__all__ = ["PrewarmedSession", "Prewarmer", "offered_tools"]
