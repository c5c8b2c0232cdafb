"""Every end-to-end scenario that applies to both model APIs, run on each: Realtime and GPT-Live
(over loopback: the bridge, the API's stand-in, a Twilio stream; for GPT-Live the caller's line
sends a frame every 20 ms, silence included, as Twilio does). Every model event both ways is
checked against openai-python's types for that API (the rig fails the test on an unknown key).

Greeting, a tool round trip, a tool error, end_call after the goodbye played, transfer,
keypad, a barge-in, the record (transcript, latency, usage, cost), reconnect with the
conversation (trimmed to what the new session takes), handover."""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from pathlib import Path
from typing import Any

import orjson
import pytest

from server.app import REGISTRY
from server.call.call import Call
from server.call.conversation import AssistantTurn, CallerTurn
from server.call.ending import EndKind
from server.call.events import BargeIn, CallEvent
from server.fleet.state import MemoryState
from server.sounds import load_ulaw
from server.testing.dial import TwilioStream, call_form
from server.testing.inbox import wait_until
from server.testing.live_standin import LiveStandinSession
from server.testing.standin import tool_call
from server.toolbox import Toolbox, python_tool
from server.tools import tool
from server.wire import live
from tests.apis import audible, audible_bytes, next_model, options, place, sent_audio
from tests.conftest import MakeRig, Rig, loud
from tests.test_assistant_acts import EXAMPLE, connect_action, install
from tests.test_handover import signed_post
from tests.test_records_e2e import AUTH, final_record

WAIT = 10.0
ADMIN = "admin-token-for-e2e-0123"


async def rig_for(make_rig: MakeRig, api: str, standin: dict[str, Any] | None = None,
                  **settings: Any) -> Rig:
    """A rig for this API with the features of tests/test_assistant_acts (test timings)."""
    return await make_rig(options(api, **(standin or {})), prepare=install(), model_api=api,
                          **settings)


def kinds(call: Call) -> list[str]:
    return [str(e["kind"]) for e in call.record.timeline]


async def turns_recorded(call: Call, *wanted: str) -> None:
    await wait_until(lambda: set(wanted) <= set(kinds(call)), WAIT,
                     f"{', '.join(wanted)} in the timeline")


async def test_greeting_before_the_caller_says_a_word(make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api, {"greeting_ms": 400},
                        greeting="Thanks for calling {{called}}, how can I help?")
    call = await place(rig)
    await wait_until(lambda: bool(call.instructions()), WAIT, "the greeting asked for")
    [said] = call.instructions()
    assert 'saying exactly: "Thanks for calling +15550002222, how can I help?"' in said
    await wait_until(lambda: audible(call.stream) >= 350 * 8, WAIT, "the greeting heard")
    (c,) = rig.live_calls()
    await turns_recorded(c, "assistant")
    assert "caller" not in kinds(c)  # nobody had said a word
    assert c.record.latencies_ms == []  # a greeting answers no one


async def test_a_tool_round_trip(make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api, {"tool_calls": {1: tool_call(
        "lookup_order", {"order_id": "1234"}, say_ms=200)}}, tools_module=EXAMPLE)
    call = await place(rig)
    assert call.tool_names() == ["lookup_order", "opening_hours", "end_call"]
    await call.say()
    create = await call.wait_sent("response.create")
    [output] = call.output_events()
    assert orjson.loads(output["item"]["output"])["status"] == "shipped"
    assert call.session.received.index(output) < call.session.received.index(create)
    # "let me check", then the answer once the result is in
    await wait_until(lambda: audible(call.stream) >= 550 * 8, WAIT, "the answer heard")
    (c,) = rig.live_calls()
    await turns_recorded(c, "tool")
    [entry] = [e for e in c.record.timeline if e["kind"] == "tool"]
    assert (entry["name"], entry["outcome"]) == ("lookup_order", "ok")
    assert len(call.sent("response.create")) == 1  # nothing asked for a second one


async def test_a_tool_error_reaches_the_model(make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api, {"tool_calls": {1: tool_call(
        "lookup_order", "{broken")}}, tools_module=EXAMPLE)
    call = await place(rig)
    await call.say()
    await call.wait_sent("response.create")
    [output] = list(call.outputs.values())
    assert orjson.loads(output) == {"error": "the arguments were not valid JSON"}
    await wait_until(lambda: audible(call.stream) >= 350 * 8, WAIT, "the model answered")
    (c,) = rig.live_calls()
    await turns_recorded(c, "tool")
    [entry] = [e for e in c.record.timeline if e["kind"] == "tool"]
    assert entry["outcome"] == "invalid_arguments"


async def test_end_call_after_the_goodbye_played(make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api, {"tool_calls": {1: tool_call("end_call", say_ms=400)}})
    call = await place(rig, marks="playback")  # played on a real-time clock, marks when played
    await call.say()
    (c,) = rig.live_calls()
    await asyncio.wait_for(c.finished.wait(), WAIT)
    assert c.ending is not None
    assert (c.ending.kind, c.ending.reason) == (EndKind.ASSISTANT_ENDED,
                                                "assistant ended the call")
    # the whole goodbye played before the hang-up
    assert audible_bytes(bytes(call.stream.heard)) >= 380 * 8
    assert call.sent("response.create") == []
    await asyncio.wait_for(call.stream.closed.wait(), WAIT)
    twiml = await connect_action(rig, c.call_sid)
    assert twiml.find("Hangup") is not None and twiml.find("Say") is None


async def test_hold_audio_while_a_slow_tool_runs_then_the_answer(make_rig: MakeRig,
                                                                  api: str) -> None:
    # long enough for hold audio (GPT-Live's starts once the model has been quiet for 0.7 s)
    slow = 2.0 if api == "live" else 1.0

    @tool
    async def slow_lookup() -> dict[str, str]:
        """Takes a while."""
        await asyncio.sleep(slow)
        return {"status": "found"}

    toolbox = Toolbox({"slow_lookup": python_tool(slow_lookup, "test")})
    rig = await make_rig(options(api, tool_calls={1: tool_call("slow_lookup", say_ms=100)}),
                         prepare=install(toolbox, hold_after=0.1), model_api=api)
    call = await place(rig)
    await call.say()
    clear = await call.stream.wait_for("clear", timeout=WAIT)
    index = call.stream.received.index(clear)
    media = [(n, base64.b64decode(m["media"]["payload"]))
             for n, m in enumerate(call.stream.received) if m.get("event") == "media"]
    hold = load_ulaw(Path(rig.settings.hold_audio or ""))
    first = next(n for n, payload in media if payload == hold[:4000])  # the first 500 ms
    assert first < index
    # while it played, nothing of the model's went out with it (GPT-Live's silence included)
    assert all(payload in (hold[i:i + 4000] for i in range(0, len(hold), 4000))
               for n, payload in media if first <= n < index)
    await call.wait_sent("response.create")
    await wait_until(lambda: audible_bytes(b"".join(
        base64.b64decode(m["media"]["payload"]) for m in call.stream.received[index:]
        if m.get("event") == "media")) >= 350 * 8, WAIT, "the answer after the clear")
    assert not any(base64.b64decode(m["media"]["payload"]) == hold[:4000]
                   for m in call.stream.received[index:] if m.get("event") == "media")


async def test_transfer_dials_the_target(make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api, {"tool_calls": {1: tool_call(
        "transfer_call", {"target": "sales"}, say_ms=200)}},
        transfer_targets=(("sales", "+15550003333"),))
    call = await place(rig)
    assert "transfer_call" in call.tool_names()
    await call.say()
    (c,) = rig.live_calls()
    await asyncio.wait_for(c.finished.wait(), WAIT)
    assert c.ending is not None
    assert (c.ending.kind, c.ending.reason) == (EndKind.TRANSFERRED, "transferred to sales")
    twiml = await connect_action(rig, c.call_sid)
    number = twiml.find("Dial/Number")
    assert number is not None and number.text == "+15550003333"


async def test_keypad_entry_is_told_to_the_model(make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api, {"text_tool_calls": {"1 2 3 4": tool_call(
        "lookup_order", {"order_id": "1234"})}}, tools_module=EXAMPLE)
    call = await place(rig)
    for digit in "1234#":
        await call.stream.send_dtmf(digit)
    await wait_until(lambda: bool(call.outputs), WAIT, "the tool the entry made the model call")
    assert call.texts() == ["The caller typed 1 2 3 4 on the keypad."]
    [output] = call.output_events()
    assert orjson.loads(output["item"]["output"])["status"] == "shipped"
    after = await call.wait_sent("response.create", len(call.sent("response.create")) or 1)
    assert call.session.received.index(after) > call.session.received.index(output)
    (c,) = rig.live_calls()
    await turns_recorded(c, "keypad", "tool")


async def test_the_time_limit_says_goodbye_then_ends_the_call(make_rig: MakeRig,
                                                              api: str) -> None:
    rig = await rig_for(make_rig, api, {"greeting_ms": 400}, max_call_seconds=1.0)
    call = await place(rig, marks="playback")
    (c,) = rig.live_calls()
    await asyncio.wait_for(c.finished.wait(), 15)
    assert [i for i in call.instructions() if "time limit" in i]
    assert c.ending is not None and c.ending.kind == "time_limit"
    assert c.ending.decision is not None and c.ending.decision.action == "hangup"
    assert audible_bytes(bytes(call.stream.heard)) >= 380 * 8  # the goodbye played first
    # and without waiting out the longest wait for it
    assert c.record.duration < 1.0 + 5.0


async def test_a_barge_in_is_counted_and_the_turn_marked(make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api)
    call = await place(rig, marks="playback")
    (c,) = rig.live_calls()
    cuts: list[CallEvent] = []
    c.events.on(BargeIn, cuts.append)
    await call.say(frames=50, variant=1)  # one second of speech: a one-second echo
    await wait_until(lambda: audible_bytes(bytes(call.stream.heard)) >= 200 * 8, WAIT,
                     "the reply playing")
    await call.say(frames=25, variant=2)  # the caller talks over it
    await wait_until(lambda: bool(cuts) and c.record.barge_ins >= 1, WAIT, "a barge-in")
    await wait_until(lambda: any(isinstance(e, AssistantTurn) and e.interrupted
                                 for e in c.conversation), WAIT, "the cut turn marked")
    [cut] = [e for e in c.conversation if isinstance(e, AssistantTurn) and e.interrupted]
    assert cut.heard_ms is not None and 0 <= cut.heard_ms < 1000
    assert not call.stream.closed.is_set()


async def test_the_record_has_the_transcript_latency_usage_and_cost(
        make_rig: MakeRig, api: str) -> None:
    rig = await rig_for(make_rig, api, {"tool_calls": {1: tool_call(
        "lookup_order", {"order_id": "1234"}, say_ms=200)}}, tools_module=EXAMPLE,
        admin_token=ADMIN, record_calls=True)
    call = await place(rig)
    await call.say(frames=25)
    (c,) = rig.live_calls()
    await turns_recorded(c, "caller", "tool")
    await wait_until(lambda: audible(call.stream) >= 550 * 8, WAIT, "the answer heard")
    await call.stream.send_stop()
    await asyncio.wait_for(c.finished.wait(), WAIT)
    record = await final_record(rig, c.call_sid)
    kinds_ = [e["kind"] for e in record["timeline"]]
    assert kinds_.index("caller") < kinds_.index("tool")
    assert "assistant" in kinds_  # the reply, complete by the end of the call at the latest
    caller = next(e for e in record["timeline"] if e["kind"] == "caller")
    assert caller["text"] == "caller turn 1 (500 ms)"
    assert len(record["latencies_ms"]) == 1 and 0 <= record["latencies_ms"][0] < 5000
    usage = record["usage"]
    assert record["model"] == ("gpt-live-1" if api == "live" else "gpt-realtime")
    if api == "live":
        # the session's seconds (session.closed's final figure), plus the backend's tokens
        assert isinstance(call.session, LiveStandinSession)
        [closed] = [e for e in call.session.sent if e["type"] == "session.closed"]
        assert usage["seconds"] == closed["usage"]["seconds"] > 0.5  # the final figure
        assert (usage["input_tokens"], usage["output_tokens"]) == (600, 55)
        expected = (usage["seconds"] / 60 * 0.05
                    + ((600 - 256) * 0.75 + 256 * 0.075 + 55 * 4.5) / 1e6)
        assert record["cost_usd"] == pytest.approx(expected, abs=1e-6)
    else:
        assert usage["input_tokens"] > 0 and record["cost_usd"] > 0
    text = await (await rig.bridge.get(f"/calls/{c.call_sid}",
                                       headers={**AUTH, "Accept": "text/plain"})).text()
    assert "Caller: caller turn 1 (500 ms)" in text
    # the recording, both sides as heard (GPT-Live's continuous output too)
    async with asyncio.timeout(WAIT):
        while (resp := await rig.bridge.get(f"/calls/{c.call_sid}/recording.wav",
                                            headers=AUTH)).status != 200:
            await asyncio.sleep(0.02)
    with wave.open(io.BytesIO(await resp.read()), "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (2, 8000)
        assert wav.getnframes() >= record["frames_in"] * 160 * 0.9


async def test_a_lost_session_is_replaced_with_the_conversation(make_rig: MakeRig,
                                                               api: str) -> None:
    rig = await rig_for(make_rig, api)
    call = await place(rig)
    await call.say(variant=1)
    (c,) = rig.live_calls()
    await turns_recorded(c, "caller", "assistant")
    await call.drop()
    again = await next_model(rig, call.stream)
    history = again.history()
    assert history[0] == ("user", "caller turn 1 (200 ms)")
    assert history[1][0] == "assistant" and history[1][1].startswith("echo")
    await again.say(variant=5)  # the new session hears the caller and answers
    await wait_until(lambda: sent_audio(call.stream).count(loud(5)) >= 8, WAIT,
                     "the answer from the new session")
    sessions = c.record.sessions
    assert len(sessions) == 2 and sessions[0]["ended_because"] and sessions[1]["gap_ms"] >= 0
    assert not call.stream.closed.is_set()


async def test_a_long_conversation_is_trimmed_for_the_new_session(make_rig: MakeRig,
                                                                  api: str) -> None:
    rig = await rig_for(make_rig, api)
    call = await place(rig)
    (c,) = rig.live_calls()
    for n in range(150):  # a long call so far
        c.conversation.add(CallerTurn(n, f"question {n} " + "word " * 30, f"c{n}"))
        c.conversation.add(AssistantTurn(n + 0.5, f"answer {n} " + "word " * 30, f"a{n}"))
    await call.drop()
    again = await next_model(rig, call.stream)
    if api == "realtime":  # Realtime's conversation follows session.update, an item at a time
        await again.wait_sent("conversation.item.create", 200)
    history = again.history()
    assert history[-1][1].startswith("answer 149 ")  # the newest kept, the oldest left out
    if api == "live":
        assert len(history) <= live.HISTORY_MAX_MESSAGES
        assert sum(live.estimate_tokens(t) for _, t in history) <= live.HISTORY_MAX_TOKENS
        assert history[0][0] == "developer" and history[0][1].startswith("Earlier in this call")
    else:
        assert len(history) == 200 and history[0][1].startswith("question 50 ")
    await again.say(variant=3)
    await wait_until(lambda: sent_audio(call.stream).count(loud(3)) >= 8, WAIT,
                     "the new session answers")


async def test_handover_moves_the_call_and_its_conversation(make_rig: MakeRig,
                                                            api: str) -> None:
    state = MemoryState()
    await state.start()
    public = "http://fleet.example"
    old = await rig_for(make_rig, api, state=state, shutdown_mode="handover", public_url=public)
    new = await rig_for(make_rig, api, state=state, public_url=public)
    http = old.bridge.session
    call_sid = "CA" + "b" * 32
    form = call_form(call_sid, "+15550001111", "+15550002222")
    twiml = await signed_post(old, public, "/incoming-call", form)
    stream = await TwilioStream.connect(http, str(old.bridge.make_url("/media-stream")),
                                        marks="immediate")
    old.streams.append(stream)
    await stream.send_connected()
    await stream.send_start(call_sid, "MZ" + "1" * 32, twiml.parameters)
    if api == "live":
        old.line(stream)
    first = await next_model(old, stream)
    await first.say(variant=1)
    (c,) = old.live_calls()
    await turns_recorded(c, "caller", "assistant")

    await old.app[REGISTRY].close_all(grace=WAIT)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert c.ending is not None and c.ending.kind == "handover"
    if api == "live":  # the old session is closed politely, beside the stream (no delay)
        await first.wait_sent("session.close")

    again = await signed_post(new, public, "/connect-action",
                              {**form, "CallStatus": "in-progress"})
    resumed = await TwilioStream.connect(http, str(new.bridge.make_url("/media-stream/resume")),
                                         marks="immediate")
    new.streams.append(resumed)
    await resumed.send_connected()
    await resumed.send_start(call_sid, "MZ" + "2" * 32, again.parameters)
    if api == "live":
        new.line(resumed)
    second = await next_model(new, resumed)
    assert second.history()[0] == ("user", "caller turn 1 (200 ms)")
    await second.say(variant=4)
    await wait_until(lambda: sent_audio(resumed).count(loud(4)) >= 8, WAIT,
                     "the answer on the new instance")
    (moved,) = new.live_calls()
    assert moved.record.to_dict()["started_at"] == c.record.to_dict()["started_at"]
    assert [s.get("ended_because") for s in moved.record.sessions] == [
        "handed over to another instance", None]
    await resumed.send_stop()
    await asyncio.wait_for(resumed.closed.wait(), WAIT)
    await state.close()
