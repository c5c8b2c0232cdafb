"""Moves the app's Prometheus metrics as a call goes: live count, set-up time, latency,
barge-ins, OpenAI errors, tool calls, and the kind of ending."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from server.call.features.base import (
    BargedIn,
    CallControl,
    Ending,
    Feature,
    ReplyAudioStarted,
    ToolFinished,
)
from server.wire import realtime as oai

if TYPE_CHECKING:
    from server.metrics import Metrics


class CallMetrics(Feature):
    name = "metrics"
    openai_events: ClassVar[tuple[type, ...]] = (oai.Error,)
    notices: ClassVar[tuple[type, ...]] = (BargedIn, ReplyAudioStarted, ToolFinished)

    def __init__(self, call: CallControl, metrics: Metrics) -> None:
        super().__init__(call)
        self.metrics = metrics
        metrics.call_started(call.record)

    async def on_session_ready(self, first: bool) -> None:
        if first:
            record = self.call.record
            seconds = (record.session_ready_ms / 1000 if record.session_ready_ms is not None
                       else record.elapsed())
            self.metrics.call_setup.observe(seconds)

    async def on_openai(self, event: oai.OpenAIEvent) -> None:
        if isinstance(event, oai.Error):
            self.metrics.openai_errors.labels(code=event.code[:64]).inc()

    def on_notice(self, notice: object) -> None:
        if isinstance(notice, ReplyAudioStarted):
            if notice.latency is not None:
                self.metrics.response_latency.observe(notice.latency)
        elif isinstance(notice, BargedIn):
            self.metrics.barge_ins.inc()
        elif isinstance(notice, ToolFinished):
            # The model may name a tool that does not exist: one label for all of those.
            tool = "unknown" if notice.outcome == "unknown_tool" else notice.name[:64]
            self.metrics.tool_calls.labels(tool=tool, outcome=notice.outcome).inc()

    async def on_end(self, ending: Ending) -> None:
        self.metrics.call_ended(self.call.record, ending.kind)
