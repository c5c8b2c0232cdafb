"""The one response gate: every `response.create` a call sends goes through here.

The model answers one response at a time: a `response.create` while one is in progress, or
while the caller is talking, collides (`conversation_already_has_active_response`) or talks over
them. Features (greeting, tools, keypad, the time limit, an operator's whisper) therefore ask the
gate (`CallControl.request_response`); the gate sends when no response is active and the caller
is not speaking, queues the request until then, and retries once when the service refuses it.

Two kinds of request:
- a plain one ("answer what is in the conversation now": a tool's output, a keypad entry) is
  satisfied by any response that starts after it was asked for, the service's own included (with
  turn detection's `create_response`, the caller's turn makes one), so several become one;
- one with instructions (the greeting, the goodbye) is sent as its own response, in order.

After the caller stops speaking, the service usually starts its own response: for a moment
(AUTO_RESPONSE_WAIT) the gate waits for it rather than collide with it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from server.call.features.base import CallControl, Ending, Feature
from server.wire import realtime as oai

AUTO_RESPONSE_WAIT = 2.0  # after the caller's turn, how long to wait for the service's response
ALREADY_ACTIVE = "conversation_already_has_active_response"
_ids = itertools.count(1)


@dataclass(slots=True)
class _Request:
    reason: str
    instructions: str | None
    retried: bool = False


class ResponseGate(Feature):
    name = "response_gate"
    openai_events: ClassVar[tuple[type, ...]] = (
        oai.ResponseCreated, oai.ResponseDone, oai.SpeechStarted, oai.SpeechStopped, oai.Error)

    def __init__(self, call: CallControl, auto_wait: float = AUTO_RESPONSE_WAIT) -> None:
        super().__init__(call)
        self._auto_wait = auto_wait
        self._queue: deque[_Request] = deque()
        # The response in progress: its id; "" ours, asked for and not created yet; "?" one the
        # service says is active that we have not seen (wait for a response.done).
        self._active: str | None = None
        self._sent: tuple[str, _Request] | None = None  # our last response.create (event id)
        self._sent_as: str | None = None  # the response we took for it
        self._speaking = False
        self._auto_until = 0.0  # loop time until which the service's own response is expected
        self._timer: asyncio.Task[None] | None = None
        self._closed = False
        self.sent = 0  # response.create events sent

    @property
    def busy(self) -> bool:
        """A response is in progress (or requested and not yet created)."""
        return self._active is not None

    async def request(self, reason: str, instructions: str | None = None) -> None:
        """Ask the model to respond as soon as it may."""
        if self._closed:
            return
        if instructions is None and any(r.instructions is None for r in self._queue):
            return  # one response answers both
        self._queue.append(_Request(reason, instructions))
        await self._pump()

    def reset(self) -> None:
        """A new model session: nothing of the old one is in progress."""
        self._active = self._sent = self._sent_as = None
        self._speaking = False

    async def on_session_ready(self, first: bool) -> None:
        await self._pump()

    async def on_openai(self, event: oai.OpenAIEvent) -> None:
        if isinstance(event, oai.ResponseCreated):
            self._active = event.response_id
            self._auto_until = 0.0
            if self._sent is not None and self._sent_as is None:
                self._sent_as = event.response_id  # ours, unless an error says otherwise
            else:
                # The service's own response: it sees every item added so far, so it answers
                # the plain requests waiting now.
                self._queue = deque(r for r in self._queue if r.instructions is not None)
        elif isinstance(event, oai.ResponseDone):
            if self._active in (event.response_id, "", "?"):
                self._active = None
            if self._sent_as == event.response_id:
                self._sent = self._sent_as = None
            await self._pump()
        elif isinstance(event, oai.SpeechStarted):
            self._speaking = True
        elif isinstance(event, oai.SpeechStopped):
            self._speaking = False
            self._auto_until = asyncio.get_running_loop().time() + self._auto_wait
            await self._pump()
        elif isinstance(event, oai.Error):
            await self._on_error(event)

    async def on_end(self, ending: Ending) -> None:
        self._closed = True
        self._queue.clear()

    async def _on_error(self, event: oai.Error) -> None:
        sent = self._sent
        if sent is None or event.event_id != sent[0]:
            return
        # Our response.create was refused. If we had taken a response for it, that one was the
        # service's own: it is still in progress.
        request, taken = sent[1], self._sent_as
        self._sent = self._sent_as = None
        if taken is None:
            self._active = "?" if event.code == ALREADY_ACTIVE else None
        if event.code == ALREADY_ACTIVE and not request.retried:
            request.retried = True
            self._queue.appendleft(request)  # once the active response is done
        else:
            self.call.log.warning("response for %s refused: %s", request.reason, event.code)
        await self._pump()

    async def _pump(self) -> None:
        if not self._queue or self._active is not None or self._speaking or self._closed:
            return
        wait = self._auto_until - asyncio.get_running_loop().time()
        if wait > 0:
            if self._timer is None:
                self._timer = self.call.spawn(self._later(wait), "response-gate-wait")
            return
        request = self._queue.popleft()
        event_id = f"bridge_response_{next(_ids)}"
        self._sent, self._sent_as = (event_id, request), None
        self._active = ""
        self.sent += 1
        await self.call.send_to_model(oai.response_create(request.instructions, event_id))

    async def _later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self._pump()
