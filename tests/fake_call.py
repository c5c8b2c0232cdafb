"""A stand-in for the call's `CallControl`, for unit tests of features: it dispatches model
events and call events the way the call does (only to the features that declared their types),
asks for responses through a real response gate, and plays a Realtime model session that
records what it is sent as the wire events it would be."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import orjson

from server.call.conversation import Conversation, Entry
from server.call.ending import Ending
from server.call.events import CallEnded, CallEvent, CallStarted, ModelErrored, ModelReady
from server.call.features.base import Feature
from server.call.gate import ResponseGate
from server.call.plan import CallPlan
from server.call.record import CallRecord, utc_now
from server.logs import CallLog
from server.models import events as ev
from server.models.session import AudioHandler, EventHandler, SessionConfig
from server.settings import Settings
from server.wire import realtime as rt


class FakeModel:
    """A Realtime session's sending side: every call becomes the client event it would send."""

    api = "realtime"
    decides_turns = False
    received = 0

    def __init__(self, call: FakeCall) -> None:
        self._call = call
        self.send_audio: Callable[[str], Awaitable[None]] = self._send_audio

    @property
    def closed(self) -> bool:
        return False

    async def open(self, config: SessionConfig, conversation: Sequence[Entry]) -> None:
        """Nothing to open: the tests hand events to the call themselves."""

    async def _send_audio(self, payload: str) -> None:
        await self._call.add_sent("model", rt.append_audio(payload))

    async def run(self, on_audio: AudioHandler, on_event: EventHandler) -> None:
        """No socket to read: the tests hand events to the call themselves."""

    async def ping(self) -> None:
        """Nothing to ping."""

    async def lose(self, reason: str) -> None:
        """Nothing to lose."""

    async def finish(self) -> None:
        """Nothing to finish."""

    async def close(self) -> None:
        """Nothing to close."""

    async def add_tool_result(self, call_id: str, output: str) -> None:
        await self._call.add_sent("model", rt.function_call_output(call_id, output))

    async def add_text(self, role: str, text: str) -> None:
        await self._call.add_sent("model", rt.system_text(text) if role == "system"
                                  else rt.user_text(text))

    async def create_response(self, instructions: str | None, event_id: str) -> None:
        await self._call.add_sent("model", rt.response_create(instructions, event_id))

    async def truncate(self, item_id: str, heard_ms: int) -> None:
        await self._call.add_sent("model", rt.truncate(item_id, heard_ms))

    async def listen_only(self, on: bool) -> None:
        await self._call.add_sent("model", rt.listen_only(self._call.settings, on))


class FakeCall:
    def __init__(self, call_sid: str = "CAfake", settings: Settings | None = None) -> None:
        self.call_sid = call_sid
        self.stream_sid = "MZfake"
        self.caller = "+15550001111"
        self.called = "+15550002222"
        self.settings = settings or Settings(openai_api_key="sk-test")
        self.plan = CallPlan()
        self.greeting: str | None = None
        self.log = CallLog(logging.getLogger("test.call"), {"call_sid": call_sid})
        self.record = CallRecord(call_sid=call_sid, stream_sid=self.stream_sid,
                                 caller=self.caller, called=self.called,
                                 model=self.settings.openai_model)
        self.http: Any = None
        self.model = FakeModel(self)
        self.features: list[Feature] = []
        self.listeners: list[Any] = []  # app-wide listeners: on_call_event(call, event)
        self.to_caller: list[bytes] = []
        self.to_model: list[bytes] = []
        self.endings: list[Ending] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.sent: list[tuple[str, dict[str, Any]]] = []  # ("caller" | "model", event), in order
        self.events: list[CallEvent] = []  # every event published, in order
        self.ended = asyncio.Event()
        self.played = asyncio.Event()  # cleared by a test: playback still going
        self.played.set()
        self.changed = asyncio.Condition()
        self.warnings: list[str] = []
        self.requests: list[tuple[str, str | None]] = []
        self.holds: list[str] = []  # hold / release / cut of the assistant, in order
        self.holding: list[bool] = []  # hold_playback calls, in order
        self.gate = ResponseGate(self)  # type: ignore[arg-type]  # the call's own: first

    @property
    def conversation(self) -> Conversation:
        return self.record.conversation

    def add(self, feature: Feature) -> Feature:
        self.features.append(feature)
        return feature

    async def add_sent(self, side: str, frame: bytes) -> None:
        (self.to_caller if side == "caller" else self.to_model).append(frame)
        async with self.changed:
            self.sent.append((side, orjson.loads(frame)))
            self.changed.notify_all()

    async def send_to_caller(self, frame: bytes) -> None:
        await self.add_sent("caller", frame)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def end(self, ending: Ending) -> None:
        self.endings.append(ending)
        self.ended.set()

    def publish(self, event: CallEvent) -> None:
        self.events.append(event)
        for listener in self.listeners:
            listener.on_call_event(self, event)
        for feature in self.features:
            if isinstance(event, feature.call_events):
                feature.on_event(event)

    async def request_response(self, reason: str, instructions: str | None = None) -> None:
        """Through a real response gate, as the call does."""
        self.requests.append((reason, instructions))
        await self.gate.request(reason, instructions)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    async def hold_assistant(self, held: bool) -> None:
        self.holds.append("hold" if held else "release")
        await self.gate.hold(held)

    async def listen_only(self, on: bool) -> None:
        self.holds.append("listen only" if on else "answer")
        self.gate.auto_responses = not on
        await self.model.listen_only(on)

    async def cut_assistant(self) -> None:
        self.holds.append("cut")
        self.gate.withdraw()
        await self.gate.hold(False)

    def hold_playback(self, on: bool) -> None:
        self.holding.append(on)

    @property
    def playback_idle(self) -> bool:
        return self.played.is_set()

    async def wait(self, predicate: Any, timeout: float = 3.0) -> None:
        """Until `predicate(self)` holds after something was sent."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: predicate(self))

    async def wait_played(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.played.wait()
        except TimeoutError:
            return False
        return True

    # --- what the call does ---

    def listen(self, listener: Any) -> None:
        """An app-wide listener (metrics, records), told that the call started."""
        self.listeners.append(listener)
        listener.on_call_event(self, CallStarted("inbound", self.caller, self.called,
                                                 self.stream_sid, "realtime",
                                                 self.record.model, "", ""))

    async def model_event(self, event: ev.ModelEvent) -> None:
        await self.gate.on_model(event)
        if isinstance(event, ev.ModelError):
            self.publish(ModelErrored(event.code, event.message))
        for feature in self.features:
            if isinstance(event, feature.model_events):
                await feature.on_model(event)

    async def session_ready(self) -> None:
        self.publish(ModelReady(True, (self.record.session_ready_ms or 0.0) / 1000))
        for feature in self.features:
            await feature.on_session_ready(True)
        await self.gate.on_session_ready()

    async def finish(self, ending: Ending) -> None:
        """What the call does at its end: the record's ending, the features, then the news."""
        record = self.record
        record.ended_at = record.ended_at or utc_now()
        record.end_kind, record.end_reason = ending.kind, ending.reason
        self.gate.close()
        for feature in self.features:
            await feature.on_end(ending)
        self.publish(CallEnded(str(ending.kind), ending.reason, self.record.duration))
        for task in list(self.tasks):
            task.cancel()
