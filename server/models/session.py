"""The one interface between a call and a speech-to-speech model.

A call opens a `ModelSession` with a `SessionConfig` (what this call's plan says: model,
instructions, voice, tools) and the conversation so far (a new session after a reconnect or a
handover starts from it), sends the caller's audio, receives typed events
(`server.models.events`), answers tool calls, adds text, asks for responses (only through the
call's response gate) and cuts a reply at what was heard. Realtime is one implementation,
GPT-Live another; a model that decides its own turns says so (`decides_turns`): it gets no
`create_response` and no `truncate`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.call.conversation import Entry
    from server.models.events import AudioDelta, ModelEvent


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call: its name, what it is for, its JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionConfig:
    """What may differ per call, resolved from its plan: the model and how it behaves."""

    model: str
    instructions: str | None  # the rendered prompt
    voice: str
    tools: tuple[ToolSpec, ...] = ()
    prompt: dict[str, Any] | None = None  # a hosted prompt reference (pmpt_…), passed through


class ModelUnavailable(Exception):
    """The session could not be opened; `str()` says why, with a hint (never the key)."""


class ModelLost(Exception):
    """The session is gone (socket closed, heartbeat missed, expired); a new one may continue
    the call."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelFailed(Exception):
    """The session cannot serve this call (a fatal error, a malformed event, wrong formats):
    the call ends with the spoken fallback."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NoSession:
    """The model while a call has none (before the first, between two): what is sent is lost,
    as it would be on a dead socket."""

    api = "none"
    decides_turns = False
    received = 0
    closed = True

    async def _nothing(self, *args: object) -> None:
        return None

    add_tool_result = add_text = create_response = truncate = listen_only = _nothing
    send_audio = ping = close = lose = finish = _nothing
    open = run = _nothing


NO_SESSION: Any = _NoSession()

AudioHandler = Callable[["AudioDelta"], Awaitable[object]]
EventHandler = Callable[["ModelEvent"], Awaitable[None]]


PREWARM_LEVELS = ("none", "session")


def prewarm_level(session: object) -> str:
    """How far a session may be made ready at the webhook, before its stream starts (its
    class's optional `prewarm` attribute; server.call.prewarm):

    - "session": opened, configured, and its greeting made, the audio kept until the stream
      takes it. For a backend billed by tokens (Realtime): an open, idle session costs
      nothing, and one no stream takes is closed within STREAM_START_TIMEOUT.
    - "none" (the default): opened when the stream starts. For a backend billed per second of
      session that needs the caller's audio flowing to speak (GPT-Live): starting it early
      would bill the wait and still could not make the greeting.
    """
    level = getattr(session, "prewarm", "none")
    return level if level in PREWARM_LEVELS else "none"


class ModelSession(Protocol):
    api: str  # "realtime" | "live"
    decides_turns: bool  # the model takes its own turns: no create_response, no truncate
    received: int  # messages received so far (the call's watchdog reads it)

    @property
    def closed(self) -> bool:
        """Its socket is closed (or was never opened)."""

    async def open(self, config: SessionConfig, conversation: Sequence[Entry]) -> None:
        """Connect, configure, and give it the conversation so far; ModelUnavailable if not."""

    # The caller's audio, base64 mu-law (the fast path); ConnectionError if lost. An attribute,
    # so a session can bind it to its socket once open.
    send_audio: Callable[[str], Awaitable[None]]

    async def run(self, on_audio: AudioHandler, on_event: EventHandler) -> None:
        """Receive until the session ends: raises ModelLost (a new session may follow) or
        ModelFailed (the call cannot go on)."""

    async def add_tool_result(self, call_id: str, output: str) -> None: ...

    async def add_text(self, role: str, text: str) -> None:
        """A turn in words: "user" (a keypad entry), "system" (an operator's whisper)."""

    async def create_response(self, instructions: str | None, event_id: str) -> None:
        """Only through the call's response gate; a no-op where the model decides turns."""

    async def truncate(self, item_id: str, heard_ms: int) -> None:
        """The caller heard `heard_ms` of the item, no more; a no-op where not supported."""

    async def listen_only(self, on: bool) -> None:
        """An operator took the call over: the model listens but does not answer."""

    async def lose(self, reason: str) -> None:
        """Give up a session that stopped answering: its `run` raises ModelLost(reason)."""

    async def ping(self) -> None: ...

    async def finish(self) -> None:
        """The call is ending and `run` still relays: a session that reports at its close
        (GPT-Live's final usage in `session.closed`) asks for it now and waits (bounded), so
        the call's record has it; `run` then returns. A no-op for Realtime."""

    async def close(self) -> None: ...
