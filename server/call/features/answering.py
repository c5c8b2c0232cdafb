"""Answering machines, on outbound calls.

Twilio's asynchronous answering-machine detection (`MachineDetection=DetectMessageEnd`,
`AsyncAmd=true`) reports who answered on `/amd-status`, which may reach any instance; the app
routes the result to the instance that holds the call, where it becomes a `MachineDetection`
event. Until it comes, or AMD_WAIT_S passes, the assistant listens but neither greets nor
answers: the model only listens (Realtime's server VAD would otherwise answer a callee's
"Hello?"), its response requests wait in the gate, and audio it already made (a greeting made
at the webhook, server.call.prewarm) is kept back.

- `human` or `unknown`, or no result in time: the assistant greets (a greeting kept back plays
  at once) and the call goes on.
- `machine_end_beep`, `machine_end_silence`, `machine_end_other` (or `machine_start`): the
  plan's voicemail message, once; the call ends when it has played (the decision hangs up, and
  the REST API is asked for `Status=completed`). With no message (`voicemail: "hangup"`) the
  call ends at once.
- `fax`: the call ends.
- DetectMessageEnd reports a machine only after its greeting and beep (often 10 to 30 s), so a
  machine result may come after the assistant went on talking: what plays is cut, and the
  message is left once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar

from server.call.ending import Ending, EndKind
from server.call.events import CallEvent, MachineDetection
from server.call.features.base import CallControl, Feature
from server.call.features.greeting import instructions as greeting_instructions
from server.models import events as ev
from server.settings import Settings
from server.wire import twilio as tw

FeatureFactory = Callable[[CallControl], Feature | None]
HangUp = Callable[[str], None]  # ask Twilio's REST API to end the call (in the background)

PERSON = frozenset({"human", "unknown", "timeout"})
MACHINE = frozenset({"machine_start", "machine_end_beep", "machine_end_silence",
                     "machine_end_other"})
FAX = "fax"
MESSAGE_PLAY_LIMIT = 120.0  # seconds the voicemail message may take to play before hanging up

# phases: waiting (for the result) -> talking (a person, or none in time) | message -> over
WAITING, TALKING, MESSAGE, OVER = "waiting", "talking", "message", "over"


def factory(settings: Settings, hang_up: HangUp | None = None) -> FeatureFactory:
    """The feature for outbound calls (none for inbound ones). `hang_up(call_sid)` asks the
    REST API to end the call once the voicemail is left (None: only the decision hangs up)."""
    def make(call: CallControl) -> Feature | None:
        if call.plan.direction != "outbound":
            return None
        return Answering(call, settings.amd_wait_s, hang_up)
    return make


def voicemail_instructions(message: str) -> str:
    return ("An answering machine took the call and is recording now. Leave this message, "
            f'saying exactly: "{message}" Then stop talking.')


class Answering(Feature):
    name = "answering"
    call_events: ClassVar[tuple[type[CallEvent], ...]] = (MachineDetection,)
    model_events: ClassVar[tuple[type, ...]] = (ev.ResponseCreated, ev.ResponseDone,
                                                 ev.TranscriptDelta)

    def __init__(self, call: CallControl, wait_s: float, hang_up: HangUp | None) -> None:
        super().__init__(call)
        self.wait_s = wait_s
        self.hang_up = hang_up
        # A handed-over call was decided on the instance it came from.
        self.phase = TALKING if call.record.sessions else WAITING
        self.ready = False
        # A result that came before the session was ready (the stream's own start included)
        self.pending: str | None = call.record.answered_by
        self.answered_by: str | None = None  # the result acted on
        self._asked = False  # the voicemail message was asked for ...
        self._message: str | None = None  # ... and is this response
        self._timer: asyncio.Task[None] | None = None
        record = call.record
        record.status = "in-progress"  # the stream started: the call was answered
        record.touch()

    async def on_session_ready(self, first: bool) -> None:
        call = self.call
        if not first:  # a new session after a reconnect: it must not answer either
            if self.phase in (WAITING, MESSAGE):
                await call.listen_only(True)
            return
        self.ready = True
        if self.phase != WAITING:
            return
        await call.listen_only(True)
        await call.hold_assistant(True)
        if self.pending is not None:
            await self._decide(self.pending)
        elif self.wait_s > 0:
            self._timer = call.spawn(self._wait(), "amd-wait")
        else:
            await self._decide("timeout")

    def on_event(self, event: CallEvent) -> None:
        if isinstance(event, MachineDetection):
            self.call.spawn(self._decide(event.answered_by), "amd-result")

    async def on_model(self, event: ev.ModelEvent) -> None:
        if self.phase != MESSAGE or not self._asked:
            return
        # The model only listens: the first response created after the request is the message.
        if isinstance(event, ev.ResponseCreated) and self._message is None:
            self._message = event.response_id
        elif isinstance(event, ev.ResponseDone) and event.response_id == self._message:
            self.call.spawn(self._after_message(), "voicemail-played")
        elif (isinstance(event, ev.TranscriptDelta) and event.role == "assistant"
              and self.call.model.decides_turns and self._message is None):
            # A model that takes its own turns has no responses: its first words after the
            # request are the message, which has played once it has been quiet a moment.
            self._message = event.item_id or "spoken"
            self.call.spawn(self._after_message(), "voicemail-played")

    async def on_end(self, ending: Ending) -> None:
        if ending.kind != EndKind.HANDOVER:
            self.call.record.status = "completed"  # Twilio's status of an answered call's end
            self.call.record.touch()

    # --- the decision ---

    async def _wait(self) -> None:
        await asyncio.sleep(self.wait_s)
        if self.phase == WAITING:
            self.call.log.info("no answering-machine result within %g s: the assistant goes on",
                               self.wait_s)
            self.call.publish(MachineDetection("timeout"))

    async def _decide(self, answered_by: str) -> None:
        if not self.ready:
            self.pending = answered_by
            return
        if self.phase in (MESSAGE, OVER) or (self.phase == TALKING and answered_by in PERSON):
            return
        call = self.call
        if self._timer is not None and asyncio.current_task() is not self._timer:
            self._timer.cancel()
        self.answered_by = answered_by
        if answered_by in MACHINE:
            await self._leave_message(answered_by)
        elif answered_by == FAX:
            self._end(EndKind.MACHINE, "a fax machine answered")
        else:  # a person (or Twilio could not tell, or it did not say in time)
            if answered_by != "timeout":
                call.log.info("answered by %s: the assistant greets", answered_by)
            self.phase = TALKING
            await call.listen_only(False)
            await call.hold_assistant(False)  # a greeting made at the webhook plays now
            text = call.greeting
            if text is not None:
                await call.request_response("greeting", greeting_instructions(text))

    async def _leave_message(self, answered_by: str) -> None:
        call = self.call
        message = call.plan.voicemail
        talking = self.phase == TALKING
        self.phase = MESSAGE
        if message is None:
            self._end(EndKind.MACHINE, f"an answering machine answered ({answered_by}); "
                                       "hung up without a message")
            return
        call.log.info("answered by %s: leaving the voicemail message%s", answered_by,
                      " (the assistant was cut off)" if talking else "")
        await call.listen_only(True)  # the machine's recording must not be answered
        await call.cut_assistant()
        self._asked = True
        await call.request_response("voicemail", voicemail_instructions(message))

    async def _after_message(self) -> None:
        played = await self.call.wait_played(MESSAGE_PLAY_LIMIT)
        if not played:
            self.call.log.warning("the voicemail message did not finish playing within %g s",
                                  MESSAGE_PLAY_LIMIT)
        self._end(EndKind.VOICEMAIL, f"left the voicemail message ({self.answered_by})")

    def _end(self, kind: EndKind, reason: str) -> None:
        if self.phase == OVER:
            return
        self.phase = OVER
        self.call.end(Ending(kind, reason, tw.HANGUP))
        if self.hang_up is not None:
            self.hang_up(self.call.call_sid)
