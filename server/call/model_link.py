"""The call's link to the model: the session, and a new one when it is lost.

The first session is opened with the call's plan and the conversation so far (empty, or the one
a handed-over call brings). When a session is lost (socket closed, heartbeat missed, expired), a
new one is opened within RECONNECT_WITHIN, in up to RECONNECT_ATTEMPTS tries, with the same
configuration and the conversation so far; the caller's audio in the gap is kept (the newest
RECONNECT_BUFFER_SECONDS) and sent to it. The relay sends caller audio through `send`, which is
rebound, never checked, on the fast path: the session's own send, or the gap buffer; while an
operator has the call, that wrapped in the operator's mixer (`route`), so a call without one pays
nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp

from server.call.ending import EndKind, failed
from server.call.events import SessionReplaced
from server.call.latency import FRAME_MS
from server.call.record import iso, utc_now
from server.models.live import LiveSession
from server.models.realtime import RealtimeSession
from server.models.session import (
    AudioHandler,
    EventHandler,
    ModelFailed,
    ModelLost,
    ModelSession,
    ModelUnavailable,
    SessionConfig,
)

if TYPE_CHECKING:
    from server.call.call import Call

SessionFactory = Callable[[str], ModelSession]
Send = Callable[[str], Awaitable[None]]
SendWrapper = Callable[[Send], Send]


class GapBuffer:
    """Caller audio while no model session is open: the newest `max_frames` payloads kept."""

    def __init__(self, max_frames: int) -> None:
        self._frames: deque[str] = deque(maxlen=max(max_frames, 1))
        self.received = 0
        self.dropped = 0

    async def send(self, payload: str) -> None:
        """Stands in for the session's send_audio on the media fast path during the gap."""
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append(payload)
        self.received += 1

    def __len__(self) -> int:
        return len(self._frames)

    def drain(self) -> list[str]:
        frames = list(self._frames)
        self._frames.clear()
        return frames


class ModelLink:
    def __init__(self, call: Call, factory: SessionFactory,
                 config: Callable[[], SessionConfig]) -> None:
        self._call = call
        self._factory = factory
        self._config = config
        self.session: ModelSession | None = None
        # Where caller audio goes: the session's send_audio, or a GapBuffer while a new session
        # is being opened (or before the first is ready).
        self.send: Send = self._drop
        self._target: Send = self._drop  # `send` before any wrapper
        self._wrap: SendWrapper | None = None  # an operator's mixer, while they have the call
        self._gap: GapBuffer | None = None
        self.frames_base = 0  # record.frames_in when the current session's audio began
        self._seen, self._quiet_since, self._pinged = 0, time.monotonic(), False
        # A session made ready before the stream (server.call.prewarm), taken instead of
        # opening one when it was made with the same configuration; None if there is none.
        self.adopt: Callable[[SessionConfig], Awaitable[ModelSession | None]] | None = None
        self._finishing = False  # the call is ending: a session lost now is not replaced

    @staticmethod
    async def _drop(payload: str) -> None:
        """Before a session exists, the relay is not running: nothing arrives here."""

    def _bind(self, target: Send) -> None:
        self._target = target
        self.send = target if self._wrap is None else self._wrap(target)

    def route(self, wrap: SendWrapper | None) -> None:
        """Send the caller's audio through `wrap(send)` from now on, whatever session (or gap
        buffer) it goes to, until `route(None)`: an operator's take-over mixes their voice in."""
        self._wrap = wrap
        self._bind(self._target)

    # --- opening ---

    async def open(self, why: str) -> None:
        """The first session of this stream; ModelUnavailable says why it cannot be had."""
        session = await self.adopt(self._config()) if self.adopt is not None else None
        if session is None:
            session = await self._open_session()
        else:
            why += " (session pre-warmed at the webhook)"
            self.frames_base = self._call.record.frames_in
        self._use(session)
        self._begin(why)

    async def _open_session(self) -> ModelSession:
        call = self._call
        session = self._factory(call.plan.model_api)
        self.frames_base = call.record.frames_in - (len(self._gap) if self._gap else 0)
        await session.open(self._config(), list(call.conversation))
        return session

    def _use(self, session: ModelSession) -> None:
        self.session, self._gap = session, None
        self._bind(session.send_audio)
        self._seen, self._quiet_since, self._pinged = session.received, time.monotonic(), False

    def _begin(self, why: str) -> None:
        record = self._call.record
        record.sessions.append({"started_at": iso(utc_now()), "why": why})
        record.touch()

    def end_session(self, reason: str) -> None:
        sessions = self._call.record.sessions
        if sessions and "ended_because" not in sessions[-1]:
            sessions[-1].update(ended_at=iso(utc_now()), ended_because=reason)

    # --- the model's side of the relay ---

    async def run(self, on_audio: AudioHandler, on_event: EventHandler) -> None:
        """Relay the session; when it is lost, open a new one (or end the call)."""
        while True:
            session = self.session
            assert session is not None
            try:
                await session.run(on_audio, on_event)
                return  # it closed at our request (`finish`): the call is ending
            except ModelLost as lost:
                if self._finishing:
                    return
                await self._reconnect(lost.reason)
            except ModelFailed as e:
                raise self._call.ending_error(failed(EndKind.OPENAI_ERROR, e.reason)) from None

    def speech_end(self, audio_end_ms: int | None, now: float) -> float:
        """When the caller really stopped speaking: `audio_end_ms` is on the session's audio
        timeline, which the bridge fed in real time (Twilio sends a 20 ms frame every 20 ms),
        so that audio reached the bridge as long ago as the audio appended since then lasts."""
        if audio_end_ms is None:
            return now
        appended_ms = (self._call.record.frames_in - self.frames_base) * FRAME_MS
        return now - max(appended_ms - audio_end_ms, 0) / 1000

    # --- the watchdog's part ---

    async def heartbeat(self, now: float, every: float) -> None:
        """Ping a quiet session; give it up (a new one follows) when even that goes
        unanswered for `every` seconds. Called by the call's watchdog."""
        session = self.session
        if (not every or session is None or self._gap is not None
                or session.received != self._seen):
            self._seen = session.received if session is not None else 0
            self._quiet_since, self._pinged = now, False
        elif self._pinged and now - self._quiet_since >= every:
            self._quiet_since, self._pinged = now, False
            self._call.spawn(session.lose(
                f"OpenAI did not answer a ping within {every:g} s"), "lose-silent-session")
        elif not self._pinged and now - self._quiet_since >= every:
            await session.ping()
            self._quiet_since, self._pinged = now, True

    # --- a new session that continues the conversation ---

    def _begin_gap(self) -> GapBuffer:
        if self._gap is None:
            frames = int(self._call.settings.reconnect_buffer_seconds * 1000 / FRAME_MS)
            self._gap = GapBuffer(frames)
            self._bind(self._gap.send)
        return self._gap

    async def gap_send(self, payload: str) -> None:
        """The session's socket died under a send: keep the frame for the next session."""
        await self._begin_gap().send(payload)

    async def _reconnect(self, reason: str) -> None:
        """A new session within RECONNECT_WITHIN, in up to RECONNECT_ATTEMPTS tries; the caller
        keeps talking into a buffer meanwhile. Ends the call if every attempt fails."""
        call = self._call
        s = call.settings
        self.end_session(reason)
        if s.reconnect_attempts <= 0:
            raise call.ending_error(failed(EndKind.OPENAI_ERROR, reason))
        call.log.warning("model session lost (%s): opening a new one", reason)
        gap = self._begin_gap()
        lost_at = time.monotonic()
        old, self.session = self.session, None
        if old is not None:
            call.spawn(old.close(), "close-old-session")
        call.session_lost()
        failures: list[str] = []
        deadline = lost_at + s.reconnect_within
        for _ in range(s.reconnect_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    session = await self._open_session()
            except ModelUnavailable as e:
                failures.append(str(e))
                continue
            except TimeoutError:
                failures.append(f"no new session within {s.reconnect_within:g} s")
                break
            except (ConnectionError, aiohttp.ClientError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            for payload in gap.drain():
                await session.send_audio(payload)
            self._use(session)
            gap_ms = round((time.monotonic() - lost_at) * 1000, 1)
            self._begin(f"replaced a lost session ({reason})")
            call.record.sessions[-1]["gap_ms"] = gap_ms
            call.log.warning("new model session in %.0f ms; %d caller frames carried over%s",
                             gap_ms, gap.received - gap.dropped,
                             f", {gap.dropped} dropped" if gap.dropped else "")
            call.publish(SessionReplaced(reason, gap_ms))
            return
        raise call.ending_error(failed(
            EndKind.OPENAI_ERROR,
            f"{reason}; no new session: {'; '.join(failures) or 'out of time'}"))

    async def finish(self) -> None:
        """The call is ending, its relays still run: let the session say its last (GPT-Live's
        final usage, bounded) before the record is final. Nothing more is played meanwhile."""
        session = self.session
        if session is None or session.closed:
            return
        self._finishing = True
        self._call.playback.muted = True  # the ending is decided: the caller hears no more
        await session.finish()

    async def close(self) -> None:
        session = self.session
        if session is not None:
            await session.close()


def realtime_factory(call: Call) -> SessionFactory:
    """Sessions for a call, by its plan's model API: Realtime or GPT-Live."""
    def new(api: str) -> ModelSession:
        if api == "realtime":
            return RealtimeSession(call.settings, call.http, call.log)
        if api == "live":
            return LiveSession(call.settings, call.http, call.log)
        raise ModelUnavailable(f"model API {api!r} is not available")
    return new
