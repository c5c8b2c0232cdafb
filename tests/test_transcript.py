"""The transcript feature: both sides' turns in order, interruptions, keypad and tool entries,
latency, barge-ins, usage and cost; driven through a fake CallControl."""

from __future__ import annotations

from typing import Any

import pytest

from server.call.ending import Ending, EndKind
from server.call.events import BargeIn, KeypadEntry, ReplyStarted, ToolFinished
from server.call.features.transcript import TranscriptFeature
from server.models import events as ev
from server.records.pricing import ModelPrice, PriceTable
from server.records.render import transcript_text
from tests.fake_call import FakeCall

PRICES = PriceTable({"gpt-realtime": ModelPrice(text_input=4, audio_input=32, text_output=16,
                                                audio_output=64)})


class Clock:
    """Drives the record's clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def usage(inp: int, out: int) -> dict[str, Any]:
    return {"total_tokens": inp + out, "input_tokens": inp, "output_tokens": out,
            "input_token_details": {"text_tokens": inp // 2, "audio_tokens": inp - inp // 2,
                                    "cached_tokens": 0},
            "output_token_details": {"text_tokens": 0, "audio_tokens": out}}


def make() -> tuple[FakeCall, TranscriptFeature]:
    call = FakeCall()
    feature = TranscriptFeature(call, PRICES)
    call.add(feature)
    return call, feature


async def test_turns_in_order_with_latency_usage_and_cost(clock: Clock) -> None:
    call, _ = make()
    record = call.record
    record.elapsed = lambda: clock.now - 1000.0  # type: ignore[method-assign]
    # The greeting: reply audio that no caller turn asked for has no latency.
    call.publish(ReplyStarted("resp_0", "item_A0", None))
    clock.now += 2
    await call.model_event(ev.AssistantTranscript("resp_0", "item_A0", "Hello, how can I help?"))
    await call.model_event(ev.ResponseDone("resp_0", "completed", None, usage(100, 50)))
    clock.now += 1
    await call.model_event(ev.SpeechStarted("item_U1", 3000))
    clock.now += 2
    await call.model_event(ev.SpeechStopped("item_U1", 5000))
    clock.now += 0.8
    call.publish(ReplyStarted("resp_1", "item_A1", 800.0))
    clock.now += 1
    call.publish(ReplyStarted("resp_1", "item_A2", None))  # a second item: not a new turn
    await call.model_event(ev.AssistantTranscript("resp_1", "item_A1", "Sure, let me check."))
    clock.now += 0.5
    # The caller's words arrive after the answer began: placed where they started speaking.
    await call.model_event(ev.CallerTranscript("item_U1", "  Where is my order?  "))
    await call.model_event(ev.CallerTranscript("item_U9", "   "))  # nothing said: no entry
    await call.model_event(ev.ResponseDone("resp_1", "completed", None, usage(300, 120)))
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))

    kinds = [(e["kind"], e.get("text")) for e in record.timeline]
    assert kinds == [("assistant", "Hello, how can I help?"), ("caller", "Where is my order?"),
                     ("assistant", "Sure, let me check.")]
    assert [e["at"] for e in record.timeline] == [0.0, 3.0, 5.8]
    assert record.latencies_ms == [800.0]
    assert record.timeline[2]["latency_ms"] == 800.0
    assert "latency_ms" not in record.timeline[0]
    assert record.usage["input_tokens"] == 400 and record.usage["output_tokens"] == 170
    assert record.usage["output_token_details"]["audio_tokens"] == 170
    expected = (200 * 4 + 200 * 32 + 170 * 64) / 1e6
    assert record.cost_usd == pytest.approx(expected, abs=1e-6)


async def test_interrupted_turns_either_order() -> None:
    call, _ = make()
    record = call.record
    # Barge-in before the transcript arrives.
    call.publish(ReplyStarted("resp_1", "item_A1", None))
    call.publish(BargeIn("item_A1", 1500))
    await call.model_event(ev.AssistantTranscript("resp_1", "item_A1", "Our opening hours are"))
    # Transcript first, barge-in after.
    call.publish(ReplyStarted("resp_2", "item_A2", None))
    await call.model_event(ev.AssistantTranscript("resp_2", "item_A2", "Let me explain in detail"))
    call.publish(BargeIn("item_A2", 700))
    first, second = record.timeline
    assert first["interrupted"] is True and first["heard_ms"] == 1500
    assert second["interrupted"] is True and second["heard_ms"] == 700
    assert record.barge_ins == 2
    text = transcript_text(record.to_dict())
    assert "[interrupted: caller heard 1.5 s]" in text


async def test_keypad_tools_and_errors() -> None:
    call, _ = make()
    record = call.record
    before = record.version
    call.publish(KeypadEntry("1234#"))
    call.publish(ToolFinished("lookup_order", "call_1", '{"order_id": "A1"}', "ok",
                             '{"status": "shipped"}', 0.1234))
    call.publish(ToolFinished("lookup_order", "call_2", "{not json", "invalid_arguments",
                             '{"error": "arguments are not valid JSON"}', 0.0))
    call.publish(ToolFinished("slow", "call_3", "{}", "timeout", "timed out", 5.0))
    await call.model_event(ev.ModelError("invalid_value", "bad call_id", None, False))
    keypad, ok, bad, slow, error = record.timeline
    assert keypad == {"at": keypad["at"], "kind": "keypad", "digits": "1234#"}
    assert ok["arguments"] == {"order_id": "A1"} and ok["result"] == {"status": "shipped"}
    assert ok["seconds"] == 0.123 and ok["outcome"] == "ok" and "error" not in ok
    assert bad["arguments"] == "{not json" and bad["error"] == {
        "error": "arguments are not valid JSON"}
    assert slow["error"] == "timed out" and "result" not in slow
    assert error["kind"] == "error" and error["code"] == "invalid_value"
    assert record.version > before
    text = transcript_text(record.to_dict())
    assert "Keypad: 1234#" in text and "Tool slow({}) -> timeout in 5.0 s" in text
    assert "OpenAI error invalid_value" in text


async def test_no_price_for_the_model_means_no_cost() -> None:
    call = FakeCall()
    call.record.model = "mystery-model"
    call.add(TranscriptFeature(call, PRICES))
    await call.model_event(ev.ResponseDone("resp_1", "completed", None, usage(10, 10)))
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    assert call.record.cost_usd is None and call.record.usage["input_tokens"] == 10


async def test_a_cut_reply_without_its_transcript_event_is_taken_from_response_done() -> None:
    """The service may end a cancelled response with its words only in response.done."""
    call, _ = make()
    call.publish(ReplyStarted("resp_1", "item_A1", None))
    call.publish(BargeIn("item_A1", 900))
    await call.model_event(ev.ResponseDone(
        "resp_1", "cancelled", "turn_detected", usage(10, 10),
        transcripts=(ev.AssistantTranscript("resp_1", "item_A1", "We open at nine and"),)))
    # A transcript event for the same item after that does not add a second entry.
    await call.model_event(ev.AssistantTranscript("resp_1", "item_A1", "We open at nine and"))
    (entry,) = call.record.timeline
    assert entry["text"] == "We open at nine and" and entry["interrupted"] is True
    assert entry["heard_ms"] == 900


async def test_gpt_live_usage_snapshots_add_up_across_sessions_with_backend_tokens() -> None:
    """GPT-Live's session seconds are cumulative per session (keep the last, never add the
    snapshots); a new session (reconnect, handover) starts from zero, so what earlier sessions
    used is kept; the backend's tokens (each backend response's usage) add up beside them."""
    call = FakeCall()
    call.record.model = "gpt-live-1"
    prices = PriceTable({"gpt-live-1": ModelPrice(usd_per_minute=0.05),
                         call.settings.live_backend_model: ModelPrice(text_input=1.0,
                                                                     text_output=2.0)})
    call.add(TranscriptFeature(call, prices))
    await call.session_ready()
    for seconds in (1.0, 2.0, 3.5):
        await call.model_event(ev.Usage({"seconds": seconds}, cumulative=True))
    await call.model_event(ev.ResponseDone("deleg_1", "completed", None,
                                           {"input_tokens": 300, "output_tokens": 20}))
    assert call.record.usage == {"seconds": 3.5, "input_tokens": 300, "output_tokens": 20}
    await call.session_ready()  # a new session: its own seconds from zero
    await call.model_event(ev.Usage({"seconds": 1.0}, cumulative=True))
    await call.model_event(ev.Usage({"seconds": 2.25}, cumulative=True))
    await call.model_event(ev.ResponseDone("deleg_2", "completed", None,
                                           {"input_tokens": 100, "output_tokens": 10}))
    assert call.record.usage == {"seconds": 5.75, "input_tokens": 400, "output_tokens": 30}
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    assert call.record.cost_usd == pytest.approx(5.75 / 60 * 0.05 + (400 + 30 * 2) / 1e6,
                                                 abs=1e-6)
