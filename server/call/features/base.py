"""What a call feature sees and what it may do.

A feature is told when the model session is ready and when the call ends, receives the typed
Twilio and OpenAI events it declares (never the per-frame audio, unless it declares that too),
and acts only through the `CallControl` the call hands it: send to the caller, send to the
model, run a task the call owns, add to the record, end the call with a decision for Twilio.
Features do not reach into each other; what one needs to know of another the call exposes as a
question (`playback_idle`, `wait_played`).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from aiohttp import WSCloseCode

from server.wire import twilio as tw

if TYPE_CHECKING:
    import asyncio

    import aiohttp

    from server.call.record import CallRecord
    from server.logs import CallLog
    from server.settings import Settings
    from server.wire.realtime import OpenAIEvent, ToolSpec
    from server.wire.twilio import TwilioEvent


# Kinds of ending: the record's `end_kind` and the `end` label of bridge_calls_total.
CALLER_HUNG_UP = "caller_hung_up"
ASSISTANT_ENDED = "assistant_ended"
TRANSFERRED = "transferred"
OPENAI_ERROR = "openai_error"
BAD_INPUT = "bad_input"
REJECTED = "rejected"
IDLE = "idle"
SHUTDOWN = "shutdown"
HANDOVER = "handover"
INTERNAL_ERROR = "internal_error"
ADMIN_HUNG_UP = "admin_hung_up"
TIME_LIMIT = "time_limit"  # MAX_CALL_SECONDS reached


@dataclass(frozen=True, slots=True)
class Refusal:
    """A webhook or stream turned away: the reason label of bridge_calls_refused_total
    (server.metrics.REFUSED_REASONS) and a line for the log."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class BargedIn:
    """Notice: the caller talked over the assistant; playback was cleared and `item_id`
    truncated at `heard_ms` (what the caller actually heard of it)."""

    item_id: str
    heard_ms: int


@dataclass(frozen=True, slots=True)
class ReplyAudioStarted:
    """Notice: the first audio of a response went to the caller. `latency`: seconds since the
    caller stopped speaking, once per caller turn (None for a greeting, or a reply's second
    item)."""

    response_id: str | None
    item_id: str
    latency: float | None = None


@dataclass(frozen=True, slots=True)
class ToolFinished:
    """Notice: a function call ran. outcome: ok, error, timeout, invalid_arguments,
    unknown_tool, cancelled."""

    name: str
    call_id: str
    arguments: str
    outcome: str
    result: str  # the output given to the model (JSON text)
    seconds: float


@dataclass(frozen=True, slots=True)
class KeypadEntry:
    """Notice: the caller typed digits (sent to the model as one user message)."""

    digits: str


@dataclass(frozen=True, slots=True)
class Ending:
    """How a call ends: one place decides, and record, metrics and Twilio all follow it."""

    kind: str
    reason: str
    decision: tw.Decision | None = None  # None: the spoken fallback, then hang up
    code: int = WSCloseCode.OK
    level: int = logging.INFO


class CallControl(Protocol):
    """The narrow interface a call gives its features."""

    call_sid: str
    stream_sid: str
    caller: str
    called: str
    settings: Settings
    log: CallLog
    record: CallRecord
    http: aiohttp.ClientSession

    async def send_to_caller(self, frame: bytes) -> None:
        """Send an encoded Twilio frame (see twilio_protocol)."""

    async def send_to_model(self, frame: bytes) -> None:
        """Send an encoded Realtime client event (see openai_protocol)."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a task owned by the call: cancelled and awaited when the call ends; an
        exception in it is logged and does not end the call."""

    def end(self, ending: Ending) -> None:
        """End the call (from any task of the call); the first ending wins."""

    def notify(self, event: object) -> None:
        """Tell the other features about something (e.g. a barge-in), synchronously."""

    @property
    def playback_idle(self) -> bool:
        """True when everything sent to the caller has been played (or cleared)."""

    async def wait_played(self, timeout: float) -> bool:
        """Wait until everything sent to the caller has played; False on timeout."""

    async def request_response(self, reason: str, instructions: str | None = None) -> None:
        """Ask the model to respond, through the call's one response gate: sent when no
        response is active and the caller is not speaking, else queued; retried once if the
        service refuses it as colliding. Plain requests are answered by any later response."""

    def warn(self, message: str) -> None:
        """Log a warning this call's input caused (bad keys, repeated frames): the first few
        are logged, the rest counted in one line at the end of the call."""

    def reply_latency(self) -> float | None:
        """Called once per reply, as its first audio goes out: seconds since the caller stopped
        speaking (None when no caller turn is waiting for an answer)."""


class Feature:
    """Base class of a call feature. Subclass, declare the event types you want, override the
    hooks you need; the call builds its dispatch from `twilio_events` and `openai_events`."""

    name: ClassVar[str] = "feature"
    twilio_events: ClassVar[tuple[type, ...]] = ()
    openai_events: ClassVar[tuple[type, ...]] = ()
    notices: ClassVar[tuple[type, ...]] = ()  # types given to CallControl.notify
    # Per-frame audio hooks: called only for features that set this (recording does), so a
    # call without such a feature pays nothing on the media fast path.
    wants_audio: ClassVar[bool] = False

    def __init__(self, call: CallControl) -> None:
        self.call = call

    def tools(self) -> list[ToolSpec]:
        """Functions this feature offers the model (declared in session.update)."""
        return []

    async def on_session_ready(self, first: bool) -> None:
        """The model session confirmed audio/pcmu; `first` is False after a reconnect."""

    async def on_twilio(self, event: TwilioEvent) -> None:
        """A Twilio event of a type listed in `twilio_events`."""

    async def on_openai(self, event: OpenAIEvent) -> None:
        """An OpenAI event of a type listed in `openai_events`."""

    def on_notice(self, notice: object) -> None:
        """A notice of a type listed in `notices` (sent by another feature or the call)."""

    def on_caller_audio(self, payload: str) -> None:
        """Every caller frame as relayed (base64 mu-law); only when `wants_audio`."""

    def on_assistant_audio(self, payload: str) -> None:
        """Every piece of assistant audio sent to the caller; only when `wants_audio`."""

    async def on_end(self, ending: Ending) -> None:
        """The call is ending (its tasks are cancelled after this returns)."""
