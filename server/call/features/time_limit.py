"""MAX_CALL_SECONDS: no call runs forever. At the limit the assistant says a short goodbye and
the call ends (Twilio hangs up), whatever the conversation is doing.

One timer per call (a loop timer handle, not a task sleeping for hours: that would hold a task
and its coroutine for the whole call), measured from the call's start (a handed-over call keeps
its start); the goodbye's task starts when the timer fires. The goodbye is asked for as a
response; the call ends once it has played, or after GOODBYE_WAIT if the model does not
answer. GPT-Live, which takes its own turns, is told to say goodbye: its first word after that
is the goodbye beginning.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import ClassVar

from server.call.ending import Ending, EndKind
from server.call.features.base import CallControl, Feature
from server.call.record import utc_now
from server.models import events as ev
from server.settings import Settings
from server.wire import twilio as tw

GOODBYE_WAIT = 15.0  # longest wait for the goodbye to be said and played
GOODBYE = ("The call has reached its time limit. Tell the caller, in one short sentence, "
           "that you have to end the call now, and say goodbye.")

FeatureFactory = Callable[[CallControl], Feature | None]


def factory(settings: Settings) -> FeatureFactory:
    return functools.partial(TimeLimit, seconds=settings.max_call_seconds)


class TimeLimit(Feature):
    name = "time_limit"
    model_events: ClassVar[tuple[type, ...]] = (ev.ResponseCreated, ev.ResponseDone,
                                                ev.TranscriptDelta)

    def __init__(self, call: CallControl, seconds: float) -> None:
        super().__init__(call)
        self._seconds = seconds
        self._timer: asyncio.TimerHandle | None = None
        self._goodbye: str | None = None  # "" asked for; then the response id
        self._said: asyncio.Event | None = None  # made with the goodbye

    async def on_session_ready(self, first: bool) -> None:
        if self._timer is None:
            elapsed = (utc_now() - self.call.record.started_at).total_seconds()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(self._seconds - elapsed, 0.0),
                                       self._reached)

    async def on_end(self, ending: Ending) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _reached(self) -> None:
        self.call.spawn(self._say_goodbye(), "time-limit")

    async def on_model(self, event: ev.ModelEvent) -> None:
        if self._said is None:
            return
        if isinstance(event, ev.ResponseCreated) and self._goodbye == "":
            self._goodbye = event.response_id
        elif isinstance(event, ev.ResponseDone) and event.response_id == self._goodbye:
            self._said.set()
        elif isinstance(event, ev.TranscriptDelta) and event.role == "assistant" \
                and self._goodbye == "" and self.call.model.decides_turns:
            self._said.set()  # GPT-Live began its goodbye: wait_played waits for its end

    async def _say_goodbye(self) -> None:
        call = self.call
        call.log.info("the call reached MAX_CALL_SECONDS (%g s): saying goodbye", self._seconds)
        said = self._said = asyncio.Event()
        self._goodbye = ""
        await call.request_response("time limit", GOODBYE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GOODBYE_WAIT
        try:
            async with asyncio.timeout(GOODBYE_WAIT):
                await said.wait()
        except TimeoutError:
            call.log.warning("no goodbye within %g s: ending the call", GOODBYE_WAIT)
        else:
            await call.wait_played(max(deadline - loop.time(), 0.1))
        call.end(Ending(EndKind.TIME_LIMIT,
                        f"the call reached its time limit ({self._seconds:g} s)", tw.HANGUP))
