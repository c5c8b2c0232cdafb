"""A call's event stream: the small public vocabulary in which a call tells what happens.

Features publish events here and hear each other's (a barge-in, a tool finished, a keypad
entry); app-wide listeners (records, metrics) follow every call losslessly; outside subscribers
(the console, another instance through Redis) get JSON objects through bounded queues and, when
they fall behind, a `dropped` marker instead of the events they lost: never a slower call.

Every event is a frozen dataclass with a wire `type`; `EventStream.publish` stamps it with the
call's sequence number and time, hands the typed event to the lossless handlers at once, and
the JSON object (`{"type", "seq", "at", "time", "call_sid", ...}`) to the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

HISTORY = 2000  # events kept per call for a subscriber who arrives late (oldest dropped)
QUEUE = 500  # events an outside subscriber may lag behind before it loses some


@dataclass(frozen=True, slots=True)
class CallEvent:
    type: ClassVar[str] = "event"
    public: ClassVar[bool] = True  # False: for the call's own features and listeners only

    def fields(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CallStarted(CallEvent):
    type: ClassVar[str] = "call.started"
    direction: str
    caller: str  # masked unless LOG_PII
    called: str
    stream_sid: str
    model_api: str
    model: str
    prompt: str
    started_at: str


@dataclass(frozen=True, slots=True)
class CallEnded(CallEvent):
    type: ClassVar[str] = "call.ended"
    kind: str
    reason: str
    duration_seconds: float
    refused: str | None = None  # the refusal reason of a stream never admitted


@dataclass(frozen=True, slots=True)
class Transcript(CallEvent):
    """`final=False`: `text` is a delta to append to `item_id`; `final=True`: the whole turn."""

    type: ClassVar[str] = "transcript"
    role: str  # caller, assistant, operator
    item_id: str
    text: str
    final: bool
    interrupted: bool = False
    heard_ms: int | None = None
    operator: str | None = None  # role "operator": who (left out of the JSON otherwise)

    def fields(self) -> dict[str, Any]:
        data = asdict(self)
        if self.operator is None:
            del data["operator"]
        return data


@dataclass(frozen=True, slots=True)
class SpeakerAttributed(CallEvent):
    """While an operator has the call, the model hears the caller and the operator mixed: this
    input turn (`item_id`) was the operator's (the transcript feature makes it an operator
    turn). Turns not named here are the caller's."""

    type: ClassVar[str] = "speaker.attributed"
    public: ClassVar[bool] = False
    item_id: str
    operator: str


@dataclass(frozen=True, slots=True)
class BargeIn(CallEvent):
    """The caller talked over the assistant: playback cleared, the item cut at `heard_ms`."""

    type: ClassVar[str] = "barge_in"
    item_id: str
    heard_ms: int


@dataclass(frozen=True, slots=True)
class ReplyStarted(CallEvent):
    """The first audio of a reply went to the caller; `latency_ms` once per caller turn."""

    type: ClassVar[str] = "latency"
    response_id: str | None
    item_id: str
    latency_ms: float | None

    @property
    def latency(self) -> float | None:
        return None if self.latency_ms is None else self.latency_ms / 1000

    def fields(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "ms": self.latency_ms}


@dataclass(frozen=True, slots=True)
class ToolStarted(CallEvent):
    type: ClassVar[str] = "tool.started"
    call_id: str
    name: str
    arguments: Any


@dataclass(frozen=True, slots=True)
class ToolFinished(CallEvent):
    """outcome: ok, error, timeout, invalid_arguments, unknown_tool, cancelled."""

    type: ClassVar[str] = "tool.finished"
    name: str
    call_id: str
    arguments: str  # as the model wrote them (JSON text, by convention)
    outcome: str
    result: str  # the output given to the model (JSON text)
    seconds: float

    def fields(self) -> dict[str, Any]:
        from server.call.conversation import json_or_text

        return {"call_id": self.call_id, "name": self.name, "outcome": self.outcome,
                "result" if self.outcome == "ok" else "error": json_or_text(self.result),
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True, slots=True)
class KeypadEntry(CallEvent):
    """`digits` are real in process; the public form masks them unless LOG_PII."""

    type: ClassVar[str] = "keypad"
    digits: str
    shown: bool = False

    def fields(self) -> dict[str, Any]:
        return {"digits": self.digits if self.shown else "•" * len(self.digits)}


@dataclass(frozen=True, slots=True)
class SessionReplaced(CallEvent):
    type: ClassVar[str] = "session.replaced"
    reason: str
    gap_ms: float


@dataclass(frozen=True, slots=True)
class TakeOver(CallEvent):
    type: ClassVar[str] = "takeover"
    operator: str


@dataclass(frozen=True, slots=True)
class HandBack(CallEvent):
    type: ClassVar[str] = "handback"
    operator: str


@dataclass(frozen=True, slots=True)
class WhisperSent(CallEvent):
    type: ClassVar[str] = "whisper"
    operator: str
    text: str
    respond: bool


@dataclass(frozen=True, slots=True)
class OperatorAction(CallEvent):
    type: ClassVar[str] = "operator.action"
    operator: str
    action: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ModelReady(CallEvent):
    """The model session is configured (`first`: the call's first; its set-up time)."""

    type: ClassVar[str] = "model.ready"
    public: ClassVar[bool] = False
    first: bool
    setup_seconds: float


@dataclass(frozen=True, slots=True)
class ModelErrored(CallEvent):
    """The model reported an error (the call goes on, or a new session takes over)."""

    type: ClassVar[str] = "model.error"
    public: ClassVar[bool] = False
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class MachineDetection(CallEvent):
    """An outbound call's answering-machine result (Twilio's asynchronous AMD): `human`,
    `machine_start`, `machine_end_beep`, `machine_end_silence`, `machine_end_other`, `fax`,
    `unknown`; or `timeout` when none came within AMD_WAIT_S (the assistant went on)."""

    type: ClassVar[str] = "amd"
    answered_by: str


Handler = Callable[[CallEvent], None]


class Subscription:
    """One outside subscriber: a bounded queue of JSON objects. A full queue drops the newest
    and counts them; the reader gets `{"type": "dropped", "count": n}` before the next event."""

    def __init__(self, stream: EventStream, size: int) -> None:
        self._stream = stream
        self._queue: deque[dict[str, Any]] = deque()
        self._size = size
        self._ready = asyncio.Event()
        self.dropped = 0
        self._pending_drop = 0
        self.closed = False

    def put(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= self._size:
            self.dropped += 1
            self._pending_drop += 1
            return
        if self._pending_drop:
            self._queue.append({"type": "dropped", "count": self._pending_drop})
            self._pending_drop = 0
        self._queue.append(event)
        self._ready.set()

    def seed(self, event: dict[str, Any]) -> None:
        """Replayed history: queued on top of the bound (the history is bounded itself)."""
        self._size += 1
        self._queue.append(event)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                while self._queue:
                    yield self._queue.popleft()
                if self._pending_drop:
                    yield {"type": "dropped", "count": self._pending_drop}
                    self._pending_drop = 0
                    continue
                if self.closed:
                    return
                self._ready.clear()
                await self._ready.wait()
        finally:
            self._stream.unsubscribe(self)


class EventStream:
    """One call's events, in order. Lossless handlers (the call's features, the app's listeners)
    run synchronously in `publish`; outside subscribers read JSON from bounded queues."""

    def __init__(self, started: float | None = None, history: int = HISTORY) -> None:
        self.call_sid = ""
        self.seq = 0
        self._t0 = started if started is not None else time.monotonic()
        self._handlers: dict[type, list[Handler]] = {}
        self._all: list[Handler] = []
        self._subscribers: list[Subscription] = []
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._forgotten = 0  # events that fell out of the history
        self.public = False  # outside subscribers see events once the call is admitted
        self.sinks: list[Callable[[dict[str, Any]], None]] = []  # e.g. the Redis writer

    def carry_on(self, seq: int, elapsed: float) -> None:
        """A call handed over from another instance: number its events after that instance's
        last (`seq`), and time them from the call's start (`elapsed` seconds ago), so that a
        follower sees one call, not two."""
        self.seq = max(self.seq, seq)
        self._t0 = min(self._t0, time.monotonic() - max(0.0, elapsed))

    def on(self, kind: type[CallEvent], handler: Handler) -> None:
        """Call `handler` for every event of this type, at once, in publish order."""
        self._handlers.setdefault(kind, []).append(handler)

    def on_every(self, handler: Handler) -> None:
        self._all.append(handler)

    def publish(self, event: CallEvent) -> None:
        for handler in self._all:
            handler(event)
        for handler in self._handlers.get(type(event), ()):
            handler(event)
        if not (self.public and event.public):
            return
        self.seq += 1
        data = {"type": event.type, "seq": self.seq,
                "at": round(time.monotonic() - self._t0, 3),
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace(
                    "+00:00", "Z"),
                "call_sid": self.call_sid, **event.fields()}
        if len(self._history) == self._history.maxlen:
            self._forgotten += 1
        self._history.append(data)
        for subscription in self._subscribers:
            subscription.put(data)
        for sink in self.sinks:
            sink(data)

    def subscribe(self, replay: bool = True, size: int = QUEUE) -> Subscription:
        """The events from now on (and, with `replay`, those kept from the call's start)."""
        subscription = Subscription(self, size)
        if replay:
            if self._forgotten:
                subscription.seed({"type": "dropped", "count": self._forgotten})
            for data in self._history:
                subscription.seed(data)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def close(self) -> None:
        """The call is over: subscribers read what is queued, then their iteration ends."""
        for subscription in list(self._subscribers):
            subscription.close()
