"""The conversation, as it happens: both sides' turns, keypad entries, tool calls and model
errors go into the call's `Conversation`; words go out as `transcript` events while they are
spoken (deltas) and when a turn is complete; latencies, barge-ins, usage and the cost estimate
go into the record.

Caller turns are transcribed after the fact (the transcription may arrive after the assistant
has begun answering), so each is placed at the moment the caller started speaking. Assistant
turns are placed where their first audio went to the caller, and marked `interrupted` with
`heard_ms` when a barge-in cut them (a second final `transcript` event says so, when the cut
comes after the words).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from server.call.conversation import (
    AssistantTurn,
    CallerTurn,
    Keypad,
    ModelNote,
    ToolCall,
    json_or_text,
)
from server.call.ending import Ending
from server.call.events import (
    BargeIn,
    CallEvent,
    KeypadEntry,
    ReplyStarted,
    ToolFinished,
    Transcript,
)
from server.call.features.base import CallControl, Feature
from server.models import events as ev

if TYPE_CHECKING:
    from collections.abc import Callable

    from server.records.pricing import PriceTable


class TranscriptFeature(Feature):
    name = "transcript"
    model_events: ClassVar[tuple[type, ...]] = (
        ev.SpeechStarted, ev.CallerTranscript, ev.AssistantTranscript, ev.TranscriptDelta,
        ev.ResponseDone, ev.ModelError, ev.Usage)
    call_events: ClassVar[tuple[type[CallEvent], ...]] = (
        BargeIn, ReplyStarted, ToolFinished, KeypadEntry)

    def __init__(self, call: CallControl, prices: PriceTable | None = None) -> None:
        super().__init__(call)
        self.prices = prices
        self._speech_at: dict[str, float] = {}  # caller item -> when they started speaking
        self._reply_at: dict[str, float] = {}  # assistant item -> when its audio started
        self._reply_latency: dict[str, float] = {}
        self._assistant: dict[str, AssistantTurn] = {}  # item -> its turn
        self._cut: dict[str, int] = {}  # item -> heard_ms, for a transcript still to come
        # A cumulative usage (GPT-Live's session seconds) counts from its session's start: what
        # earlier sessions of the call used (a reconnect, a handover) is added to it.
        self._usage_base: dict[str, float] = {}

    @classmethod
    def factory(cls, prices: PriceTable | None) -> Callable[[CallControl], Feature]:
        return lambda call: cls(call, prices)

    async def on_session_ready(self, first: bool) -> None:
        self._usage_base = {k: v for k, v in self.call.record.usage.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}

    async def on_model(self, event: ev.ModelEvent) -> None:
        call = self.call
        record = call.record
        if isinstance(event, ev.SpeechStarted):
            self._speech_at[event.item_id] = record.elapsed()
        elif isinstance(event, ev.TranscriptDelta):
            if event.delta:
                call.publish(Transcript(event.role, event.item_id, event.delta, False))
        elif isinstance(event, ev.CallerTranscript):
            text = event.transcript.strip()
            at = self._speech_at.pop(event.item_id, None)
            if text:
                call.conversation.add(CallerTurn(record.elapsed() if at is None else at, text,
                                                 event.item_id))
                call.publish(Transcript("caller", event.item_id, text, True))
        elif isinstance(event, ev.AssistantTranscript):
            self._assistant_turn(event)
        elif isinstance(event, ev.ResponseDone):
            if event.usage:
                record.add_usage(event.usage)
            # A response cut by a barge-in may end without output_audio_transcript.done: its
            # words are then only in response.done's output items.
            for said in event.transcripts:
                if said.item_id not in self._assistant:
                    self._assistant_turn(said)
        elif isinstance(event, ev.Usage):
            if event.cumulative:  # a snapshot of this session's total: keep the last one
                base = self._usage_base
                for key, value in event.usage.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        total = base.get(key, 0) + value
                        record.usage[key] = round(total, 3) if isinstance(total, float) \
                            else total
                record.touch()
            else:
                record.add_usage(event.usage)
        elif isinstance(event, ev.ModelError):
            call.conversation.add(ModelNote(record.elapsed(), event.code, event.message[:500],
                                            event.fatal))

    def _assistant_turn(self, event: ev.AssistantTranscript) -> None:
        call = self.call
        item = event.item_id
        if item in self._assistant:  # already placed (from response.done): keep the first
            return
        at = self._reply_at.pop(item, None)
        turn = AssistantTurn(call.record.elapsed() if at is None else at,
                             event.transcript.strip(), item,
                             self._reply_latency.pop(item, None))
        if item in self._cut:
            turn.interrupted, turn.heard_ms = True, self._cut.pop(item)
        call.conversation.add(turn)
        self._assistant[item] = turn
        call.publish(Transcript("assistant", item, turn.text, True, turn.interrupted,
                                turn.heard_ms))

    def on_event(self, event: CallEvent) -> None:
        call = self.call
        record = call.record
        if isinstance(event, ReplyStarted):
            self._reply_at[event.item_id] = record.elapsed()
            if event.latency_ms is not None:
                record.latencies_ms.append(event.latency_ms)
                self._reply_latency[event.item_id] = event.latency_ms
                record.touch()
        elif isinstance(event, BargeIn):
            record.barge_ins += 1
            turn = self._assistant.get(event.item_id)
            if turn is not None:  # its transcript came first: mark it now, and say so
                turn.interrupted, turn.heard_ms = True, event.heard_ms
                call.conversation.changed()
                call.publish(Transcript("assistant", turn.item_id, turn.text, True, True,
                                        event.heard_ms))
            else:
                self._cut[event.item_id] = event.heard_ms
            record.touch()
        elif isinstance(event, KeypadEntry):
            call.conversation.add(Keypad(record.elapsed(), event.digits))
        elif isinstance(event, ToolFinished):
            call.conversation.add(ToolCall(
                record.elapsed(), event.name, event.call_id, json_or_text(event.arguments),
                event.outcome, event.seconds, json_or_text(event.result)))

    async def on_end(self, ending: Ending) -> None:
        record = self.call.record
        if self.prices is not None:
            settings = self.call.settings
            record.cost_usd = self.prices.estimate(record.model or settings.openai_model,
                                                   record.usage, settings.live_backend_model)
            record.touch()
