"""The call's timeline as the record keeps it: both sides' turns, keypad entries, tool calls,
errors; per-turn response latency, barge-ins, token usage and the cost estimate.

Caller turns are transcribed after the fact (the transcription may arrive after the assistant
has begun answering), so each is placed at the moment the caller started speaking. Assistant
turns are placed where their first audio went to the caller, and marked `interrupted` with
`heard_ms` when a barge-in cut them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from server.call.features.base import (
    BargedIn,
    CallControl,
    Ending,
    Feature,
    KeypadEntry,
    ReplyAudioStarted,
    ToolFinished,
)
from server.wire import realtime as oai

if TYPE_CHECKING:
    from collections.abc import Callable

    from server.records.pricing import PriceTable


class Transcript(Feature):
    name = "transcript"
    openai_events: ClassVar[tuple[type, ...]] = (
        oai.SpeechStarted, oai.CallerTranscript, oai.AssistantTranscript,
        oai.ResponseDone, oai.Error)
    notices: ClassVar[tuple[type, ...]] = (BargedIn, ReplyAudioStarted, ToolFinished,
                                           KeypadEntry)

    def __init__(self, call: CallControl, prices: PriceTable | None = None) -> None:
        super().__init__(call)
        self.prices = prices
        self._speech_at: dict[str, float] = {}  # caller item -> when they started speaking
        self._reply_at: dict[str, float] = {}  # assistant item -> when its audio started
        self._reply_latency: dict[str, float] = {}
        self._assistant: dict[str, dict[str, Any]] = {}  # item -> its timeline entry
        self._cut: dict[str, int] = {}  # item -> heard_ms, for a transcript still to come

    @classmethod
    def factory(cls, prices: PriceTable | None) -> Callable[[CallControl], Feature]:
        return lambda call: cls(call, prices)

    async def on_openai(self, event: oai.OpenAIEvent) -> None:
        record = self.call.record
        if isinstance(event, oai.SpeechStarted):
            self._speech_at[event.item_id] = record.elapsed()
        elif isinstance(event, oai.CallerTranscript):
            text = event.transcript.strip()
            at = self._speech_at.pop(event.item_id, None)
            if text:
                record.insert(record.elapsed() if at is None else at, "caller", text=text,
                              item_id=event.item_id)
        elif isinstance(event, oai.AssistantTranscript):
            self._assistant_turn(event)
        elif isinstance(event, oai.ResponseDone):
            if event.usage:
                record.add_usage(event.usage)
            # A response cut by a barge-in may end without output_audio_transcript.done: its
            # words are then only in response.done's output items.
            for said in event.transcripts:
                if said.item_id not in self._assistant:
                    self._assistant_turn(said)
        elif isinstance(event, oai.Error):
            record.add("error", code=event.code, message=event.message[:500],
                       fatal=event.fatal)

    def _assistant_turn(self, event: oai.AssistantTranscript) -> None:
        record = self.call.record
        item = event.item_id
        if item in self._assistant:  # already placed (from response.done): keep the first
            return
        at = self._reply_at.pop(item, None)
        data: dict[str, Any] = {"text": event.transcript.strip(), "item_id": item}
        latency = self._reply_latency.pop(item, None)
        if latency is not None:
            data["latency_ms"] = latency
        if item in self._cut:
            data["interrupted"] = True
            data["heard_ms"] = self._cut.pop(item)
        entry = (record.insert(at, "assistant", **data) if at is not None
                 else record.add("assistant", **data))
        self._assistant[item] = entry

    def on_notice(self, notice: object) -> None:
        record = self.call.record
        if isinstance(notice, ReplyAudioStarted):
            self._reply_at[notice.item_id] = record.elapsed()
            if notice.latency is not None:
                ms = round(notice.latency * 1000, 1)
                record.latencies_ms.append(ms)
                self._reply_latency[notice.item_id] = ms
                record.touch()
        elif isinstance(notice, BargedIn):
            record.barge_ins += 1
            entry = self._assistant.get(notice.item_id)
            if entry is not None:  # its transcript came first: mark it now
                entry["interrupted"] = True
                entry["heard_ms"] = notice.heard_ms
            else:
                self._cut[notice.item_id] = notice.heard_ms
            record.touch()
        elif isinstance(notice, KeypadEntry):
            record.add("keypad", digits=notice.digits)
        elif isinstance(notice, ToolFinished):
            data: dict[str, Any] = {"name": notice.name, "call_id": notice.call_id,
                                    "arguments": _json_or_text(notice.arguments),
                                    "outcome": notice.outcome,
                                    "seconds": round(notice.seconds, 3)}
            data["result" if notice.outcome == "ok" else "error"] = _json_or_text(notice.result)
            record.add("tool", **data)

    async def on_end(self, ending: Ending) -> None:
        record = self.call.record
        if self.prices is not None:
            record.cost_usd = self.prices.cost(record.model or self.call.settings.openai_model,
                                               record.usage)
            record.touch()


def _json_or_text(text: str) -> Any:
    """Arguments and results are JSON text by convention; keep them readable as JSON values
    when they are, as the exact text when they are not."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
