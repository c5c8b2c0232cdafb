"""Calls that survive the model: a lost session is replaced and the conversation goes on."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import WSCloseCode

from server.call.call import Call
from server.call.conversation import Conversation
from server.call.model_link import GapBuffer
from server.models.realtime import conversation_items
from server.testing.inbox import wait_until
from server.testing.standin import StandinOptions, StandinSession, next_session
from tests.conftest import API_KEY, MakeRig, Rig, heard, loud, speak

WAIT = 10.0


def kinds(call: Call) -> list[str]:
    return [str(e["kind"]) for e in call.record.timeline]


async def one_turn(rig: Rig) -> tuple[Call, StandinSession]:
    """A call with one caller turn answered, transcribed on both sides."""
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    await speak(stream, frames=10, variant=1)
    await stream.wait_for("mark", count=2)
    await wait_until(lambda: {"caller", "assistant"} <= set(kinds(call)), WAIT,
                     "both turns transcribed")
    return call, session


async def test_lost_session_is_replaced_with_the_conversation(rig: Rig) -> None:
    call, first = await one_turn(rig)
    stream = rig.streams[0]
    await first.close(code=1011)  # the socket dies mid-call
    await speak(stream, frames=10, variant=5)  # the caller keeps talking through the gap
    second = await next_session(rig.standin.app)
    update = await second.wait_for("session.update")
    assert update["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    # The conversation so far, as text items, after the session.update and before any audio.
    user = await second.wait_for("conversation.item.create", count=1)
    assistant = await second.wait_for("conversation.item.create", count=2)
    assert user["item"]["role"] == "user"
    assert user["item"]["content"][0]["text"].startswith("caller turn 1")
    assert assistant["item"]["role"] == "assistant"
    assert assistant["item"]["content"][0]["type"] == "output_text"
    order = [e["type"] for e in second.received]
    assert order.index("conversation.item.create") < order.index("input_audio_buffer.append")
    # What the caller said during the gap reached the new session, and it answered.
    await stream.wait_for("mark", count=4)
    assert heard(stream).count(loud(5)) >= 10
    assert not stream.closed.is_set()
    sessions = call.record.sessions
    assert len(sessions) == 2 and "ended_because" in sessions[0]
    assert "OpenAI closed the session (code 1011)" in sessions[0]["ended_because"]
    assert sessions[1]["gap_ms"] >= 0


async def test_expired_session_is_replaced(make_rig: MakeRig) -> None:
    # OpenAI's 60-minute limit, shortened: a call may outlive its sessions.
    rig = await make_rig(StandinOptions(api_key=API_KEY, session_lifetime=0.5))
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    second = await next_session(rig.standin.app)
    await second.wait_for("session.update")
    await speak(stream, frames=4, variant=6)
    await second.wait_for("input_audio_buffer.append", count=4)
    assert not stream.closed.is_set()
    assert "session_expired" in call.record.sessions[0]["ended_because"]


async def test_every_attempt_failing_ends_the_call_with_the_fallback(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(StandinOptions(api_key=API_KEY, accept_sessions=1))
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    await session.close(code=1011)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.INTERNAL_ERROR
    assert call.ending is not None and call.ending.kind == "openai_error"
    assert call.ending.decision is None  # Twilio speaks the fallback
    assert "no new session: OpenAI refused the session: HTTP 503" in call.ending.reason
    assert call.tasks == ()


async def test_gap_buffer_keeps_the_newest_frames() -> None:
    gap = GapBuffer(max_frames=5)
    frames = [f"frame-{i}" for i in range(12)]
    for frame in frames:
        await gap.send(frame)
    assert gap.drain() == frames[-5:] and gap.dropped == 7
    assert gap.drain() == []


def test_conversation_items_recreate_the_timeline() -> None:
    timeline: list[dict[str, Any]] = [
        {"kind": "caller", "text": "Where is my order?"},
        {"kind": "assistant", "text": "Let me check.", "interrupted": True, "heard_ms": 400},
        {"kind": "tool", "name": "lookup_order", "call_id": "call_1",
         "arguments": {"order_id": "A1"}, "outcome": "ok", "result": {"status": "shipped"}},
        {"kind": "tool", "name": "broken", "call_id": "call_2", "arguments": {},
         "outcome": "error", "error": {"error": "boom"}},
        {"kind": "keypad", "digits": "12#"},
        {"kind": "error", "code": "x"},
    ]
    # The record's timeline, read back as the typed conversation it is.
    entries = Conversation.from_dicts([{"at": float(i), **e} for i, e in enumerate(timeline)])
    items = [orjson.loads(i)["item"] for i in conversation_items(entries)]
    assert items[0] == {"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": "Where is my order?"}]}
    assert items[1]["content"][0]["text"] == \
        "Let me check. [the caller interrupted after 400 ms]"
    assert items[2] == {"type": "function_call", "call_id": "call_1", "name": "lookup_order",
                        "arguments": '{"order_id":"A1"}'}
    assert items[3] == {"type": "function_call_output", "call_id": "call_1",
                        "output": '{"status":"shipped"}'}
    assert items[5]["output"] == '{"error":{"error":"boom"}}'
    assert items[6]["content"][0]["text"] == "The caller typed 1 2 # on the keypad."
    assert len(items) == 7
    assert len(conversation_items(entries, limit=2)) == 1  # the keypad entry only


async def test_a_silent_session_is_replaced(make_rig: MakeRig) -> None:
    # Pings go unanswered (a half-open connection): the watchdog gives the socket up and a
    # new session continues the call.
    rig = await make_rig(StandinOptions(api_key=API_KEY, answer_pings=False),
                         openai_heartbeat=0.2)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    second = await next_session(rig.standin.app)
    await second.wait_for("session.update")
    assert not stream.closed.is_set()
    assert call.record.sessions[0]["ended_because"] == \
        "OpenAI did not answer a ping within 0.2 s"
