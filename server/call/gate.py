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
(AUTO_RESPONSE_WAIT) the gate waits for it rather than collide with it. While an operator has
taken the call over, the gate holds every request until the call is handed back. A model that
decides its own turns (GPT-Live) has no responses to gate: a request with instructions is
passed on as such (the session turns it into words for the model), a plain one needs nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.models import events as ev

if TYPE_CHECKING:
    from server.call.call import Call

AUTO_RESPONSE_WAIT = 2.0  # after the caller's turn, how long to wait for the service's response
ALREADY_ACTIVE = "conversation_already_has_active_response"
_ids = itertools.count(1)


@dataclass(slots=True)
class _Request:
    reason: str
    instructions: str | None
    retried: bool = False


class ResponseGate:
    """Owned by the call, which hands it the model's events before any feature sees them."""

    def __init__(self, call: Call, auto_wait: float = AUTO_RESPONSE_WAIT) -> None:
        self.call = call
        self._auto_wait = auto_wait
        self._queue: list[_Request] = []  # a few at most: a list is 700 B smaller than a deque
        # The response in progress: its id; "" ours, asked for and not created yet; "?" one the
        # service says is active that we have not seen (wait for a response.done).
        self._active: str | None = None
        self._sent: tuple[str, _Request] | None = None  # our last response.create (event id)
        self._sent_as: str | None = None  # the response we took for it
        self._speaking = False
        self._auto_until = 0.0  # loop time until which the service's own response is expected
        self._timer: asyncio.Task[None] | None = None
        self._closed = False
        self.held = False  # an operator has the call: nothing is sent until it is handed back
        # The model answers a caller's turn on its own (turn detection's create_response);
        # False while it only listens: no response of its own is awaited after a turn.
        self.auto_responses = True
        self.sent = 0  # response.create events sent
        # Requests already answered by a response sent before the call had its gate (a
        # pre-warmed session's greeting): the first request with that reason is dropped.
        self._presatisfied: set[str] = set()

    @property
    def busy(self) -> bool:
        """A response is in progress (or requested and not yet created)."""
        return self._active is not None

    async def request(self, reason: str, instructions: str | None = None) -> None:
        """Ask the model to respond as soon as it may."""
        if self._closed:
            return
        if reason in self._presatisfied:
            self._presatisfied.discard(reason)
            return
        if self.call.model.decides_turns:
            if instructions is not None:
                await self.call.model.create_response(instructions, self._next_id())
            return
        if instructions is None and any(r.instructions is None for r in self._queue):
            return  # one response answers both
        self._queue.append(_Request(reason, instructions))
        await self._pump()

    def reset(self) -> None:
        """A new model session: nothing of the old one is in progress."""
        self._active = self._sent = self._sent_as = None
        self._speaking = False

    async def hold(self, held: bool) -> None:
        """Take-over (True) and hand-back (False); an outbound call waiting for its
        answering-machine result. While held the model made no response of its own (it only
        listened), so none is awaited after the caller's last turn."""
        self.held = held
        if not held:
            self._auto_until = 0.0
        await self._pump()

    def presend(self, event_id: str, reason: str, instructions: str | None) -> None:
        """A response was asked for before this gate existed (at the webhook, on a pre-warmed
        session, as `event_id`): follow it as ours, and drop the call's own request for it."""
        self._sent, self._sent_as = (event_id, _Request(reason, instructions)), None
        self._active = ""
        self._presatisfied.add(reason)
        self.sent += 1

    def withdraw(self) -> None:
        """Forget every request still waiting (the assistant was cut off: an answering
        machine answered); a response already asked for is let finish."""
        self._queue.clear()

    async def on_session_ready(self) -> None:
        await self._pump()

    async def on_model(self, event: ev.ModelEvent) -> None:
        if isinstance(event, ev.ResponseCreated):
            self._active = event.response_id
            self._auto_until = 0.0
            if self._sent is not None and self._sent_as is None:
                self._sent_as = event.response_id  # ours, unless an error says otherwise
            else:
                # The service's own response: it sees every item added so far, so it answers
                # the plain requests waiting now.
                self._queue = [r for r in self._queue if r.instructions is not None]
        elif isinstance(event, ev.ResponseDone):
            if self._active in (event.response_id, "", "?"):
                self._active = None
            if self._sent_as == event.response_id:
                self._sent = self._sent_as = None
            await self._pump()
        elif isinstance(event, ev.SpeechStarted):
            self._speaking = True
        elif isinstance(event, ev.SpeechStopped):
            self._speaking = False
            if self.auto_responses:
                self._auto_until = asyncio.get_running_loop().time() + self._auto_wait
            await self._pump()
        elif isinstance(event, ev.ModelError):
            await self._on_error(event)

    def close(self) -> None:
        self._closed = True
        self._queue.clear()

    async def _on_error(self, event: ev.ModelError) -> None:
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
            self._queue.insert(0, request)  # once the active response is done
        else:
            self.call.log.warning("response for %s refused: %s", request.reason, event.code)
        await self._pump()

    async def _pump(self) -> None:
        if (not self._queue or self._active is not None or self._speaking or self._closed
                or self.held):
            return
        wait = self._auto_until - asyncio.get_running_loop().time()
        if wait > 0:
            if self._timer is None:
                self._timer = self.call.spawn(self._later(wait), "response-gate-wait")
            return
        request = self._queue.pop(0)
        event_id = self._next_id()
        self._sent, self._sent_as = (event_id, request), None
        self._active = ""
        self.sent += 1
        await self.call.model.create_response(request.instructions, event_id)

    @staticmethod
    def _next_id() -> str:
        return f"bridge_response_{next(_ids)}"

    async def _later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self._pump()
