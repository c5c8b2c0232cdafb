"""A stand-in for the call's `CallControl`, for unit tests of features: it dispatches events
and notices the way the call does (only to the features that declared their types)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import orjson

from server.call.features.base import Ending, Feature
from server.call.gate import ResponseGate
from server.call.record import CallRecord
from server.logs import CallLog
from server.settings import Settings
from server.wire import realtime as oai


class FakeCall:
    def __init__(self, call_sid: str = "CAfake", settings: Settings | None = None) -> None:
        self.call_sid = call_sid
        self.stream_sid = "MZfake"
        self.caller = "+15550001111"
        self.called = "+15550002222"
        self.settings = settings or Settings(openai_api_key="sk-test")
        self.log = CallLog(logging.getLogger("test.call"), {"call_sid": call_sid})
        self.record = CallRecord(call_sid=call_sid, stream_sid=self.stream_sid,
                                 caller=self.caller, called=self.called,
                                 model=self.settings.openai_model)
        self.http: Any = None
        self.features: list[Feature] = []
        self.to_caller: list[bytes] = []
        self.to_model: list[bytes] = []
        self.endings: list[Ending] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.sent: list[tuple[str, dict[str, Any]]] = []  # ("caller" | "model", event), in order
        self.notices: list[object] = []
        self.ended = asyncio.Event()
        self.played = asyncio.Event()  # cleared by a test: playback still going
        self.played.set()
        self.changed = asyncio.Condition()
        self.warnings: list[str] = []
        self.requests: list[tuple[str, str | None]] = []
        self.gate = ResponseGate(self)  # the call's own feature: sees events before the others
        self.latency: float | None = None  # what the next reply_latency() gives

    def add(self, feature: Feature) -> Feature:
        self.features.append(feature)
        return feature

    async def _add(self, side: str, frame: bytes) -> None:
        (self.to_caller if side == "caller" else self.to_model).append(frame)
        async with self.changed:
            self.sent.append((side, orjson.loads(frame)))
            self.changed.notify_all()

    async def send_to_caller(self, frame: bytes) -> None:
        await self._add("caller", frame)

    async def send_to_model(self, frame: bytes) -> None:
        await self._add("model", frame)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def end(self, ending: Ending) -> None:
        self.endings.append(ending)
        self.ended.set()

    def notify(self, notice: object) -> None:
        self.notices.append(notice)
        for feature in self.features:
            if isinstance(notice, feature.notices):
                feature.on_notice(notice)

    async def request_response(self, reason: str, instructions: str | None = None) -> None:
        """Through a real response gate, as the call does."""
        self.requests.append((reason, instructions))
        await self.gate.request(reason, instructions)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def reply_latency(self) -> float | None:
        latency, self.latency = self.latency, None
        return latency

    @property
    def playback_idle(self) -> bool:
        return self.played.is_set()

    async def wait_played(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.played.wait()
        except TimeoutError:
            return False
        return True

    # --- what the call does ---

    async def openai(self, event: oai.OpenAIEvent) -> None:
        for feature in (self.gate, *self.features):
            if isinstance(event, feature.openai_events):
                await feature.on_openai(event)

    async def session_ready(self) -> None:
        for feature in (self.gate, *self.features):
            await feature.on_session_ready(True)

    async def finish(self, ending: Ending) -> None:
        for feature in self.features:
            await feature.on_end(ending)
        for task in list(self.tasks):
            task.cancel()
