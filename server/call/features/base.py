"""What a call feature sees and what it may do.

A feature is told when the model session is ready and when the call ends, receives the typed
Twilio and model events it declares and the call events it listens to (never the per-frame
audio, unless it declares that too), and acts only through the `CallControl` the call hands
it: send to the caller, talk to the model session, ask for a response through the one gate,
publish an event, add to the conversation, run a task the call owns, end the call with a
decision for Twilio. Features do not reach into each other: they hear each other's events, and
what one needs to know of another the call answers as a question (`playback_idle`,
`wait_played`).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from server.call.ending import Ending

if TYPE_CHECKING:
    import asyncio

    import aiohttp

    from server.call.conversation import Conversation
    from server.call.events import CallEvent
    from server.call.plan import CallPlan
    from server.call.record import CallRecord
    from server.logs import CallLog
    from server.models.events import ModelEvent
    from server.models.session import ModelSession, ToolSpec
    from server.settings import Settings
    from server.wire.twilio import TwilioEvent


class CallControl(Protocol):
    """The narrow interface a call gives its features."""

    call_sid: str
    stream_sid: str
    caller: str
    called: str
    settings: Settings
    plan: CallPlan
    log: CallLog
    record: CallRecord
    http: aiohttp.ClientSession

    @property
    def conversation(self) -> Conversation:
        """What was said and done so far (the record's timeline, typed)."""

    @property
    def greeting(self) -> str | None:
        """The plan's greeting, rendered for this call (None: the caller speaks first)."""

    @property
    def model(self) -> ModelSession:
        """The model session now (a new one after a reconnect: ask each time)."""

    async def send_to_caller(self, frame: bytes) -> None:
        """Send an encoded Twilio frame (see server.wire.twilio)."""

    def publish(self, event: CallEvent) -> None:
        """Tell the call's features, the app's listeners and any subscriber, in order."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a task owned by the call: cancelled and awaited when the call ends; an
        exception in it is logged and does not end the call."""

    def end(self, ending: Ending) -> None:
        """End the call (from any task of the call); the first ending wins."""

    @property
    def playback_idle(self) -> bool:
        """True when everything sent to the caller has been played (or cleared)."""

    async def wait_played(self, timeout: float) -> bool:
        """Wait until the assistant's last words have played; False on timeout. (Realtime:
        everything sent; GPT-Live, whose output never stops: once it has been quiet for a
        moment, what was sent by then.)"""

    async def request_response(self, reason: str, instructions: str | None = None) -> None:
        """Ask the model to respond, through the call's one response gate: sent when no
        response is active and the caller is not speaking, else queued; retried once if the
        service refuses it as colliding. Plain requests are answered by any later response."""

    async def hold_assistant(self, held: bool) -> None:
        """Keep the assistant from speaking, or let it speak again: while held, response
        requests wait in the gate and the model's audio is kept back (played on release)."""

    async def listen_only(self, on: bool) -> None:
        """The model listens but makes no response of its own (requests still do)."""

    async def cut_assistant(self) -> None:
        """Stop the assistant now: waiting requests withdrawn, audio kept back or playing
        dropped (the model told what was heard); it may be asked to speak again at once."""

    def hold_playback(self, on: bool) -> None:
        """Hold audio starts (on) or stops (off): the model's own audio is not played
        meanwhile, so the two never mix (GPT-Live's output flows all the time)."""

    def warn(self, message: str) -> None:
        """Log a warning this call's input caused (bad keys, repeated frames): the first few
        are logged, the rest counted in one line at the end of the call."""


class Feature:
    """Base class of a call feature. Subclass, declare the event types you want, override the
    hooks you need; the call builds its dispatch from the declarations."""

    name: ClassVar[str] = "feature"
    twilio_events: ClassVar[tuple[type, ...]] = ()
    model_events: ClassVar[tuple[type, ...]] = ()
    call_events: ClassVar[tuple[type[CallEvent], ...]] = ()  # heard through `on_event`
    # Per-frame audio hooks: called only for features that set this (recording does), so a
    # call without such a feature pays nothing on the media fast path.
    wants_audio: ClassVar[bool] = False

    def __init__(self, call: CallControl) -> None:
        self.call = call

    def tools(self) -> list[ToolSpec]:
        """Functions this feature offers the model (declared when the session opens)."""
        return []

    async def on_session_ready(self, first: bool) -> None:
        """The model session is configured; `first` is False after a reconnect or handover."""

    async def on_twilio(self, event: TwilioEvent) -> None:
        """A Twilio event of a type listed in `twilio_events`."""

    async def on_model(self, event: ModelEvent) -> None:
        """A model event of a type listed in `model_events`."""

    def on_event(self, event: CallEvent) -> None:
        """A call event of a type listed in `call_events` (synchronous, in publish order)."""

    def on_caller_audio(self, payload: str) -> None:
        """Every caller frame as relayed (base64 mu-law); only when `wants_audio`."""

    def on_assistant_audio(self, payload: str) -> None:
        """Every piece of assistant audio sent to the caller; only when `wants_audio`."""

    def on_clear(self) -> None:
        """The caller's playback was cleared; only when `wants_audio`."""

    async def on_end(self, ending: Ending) -> None:
        """The call is ending (its tasks are cancelled after this returns)."""
