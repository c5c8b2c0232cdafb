"""The call core's event stream, response gate, conversation and plan: the pieces the console,
outbound calls and GPT-Live build on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from server.app import REGISTRY
from server.call.ending import hung_up
from server.call.events import EventStream, KeypadEntry, Transcript
from server.call.features import greeting, keypad
from server.call.features import tools as tools_feature
from server.fleet.events import RedisBus
from server.fleet.state import MemoryState
from server.models import events as ev
from server.settings import Settings
from server.testing.dial import TwilioStream, call_form, post_webhook
from server.testing.inbox import wait_until
from server.testing.standin import StandinOptions, next_session, tool_call
from server.toolbox import Toolbox, python_tool
from server.tools import tool
from server.wire import twilio as tw
from tests.conftest import (
    API_KEY,
    AUTH_TOKEN,
    CALLED,
    CALLER,
    MakeRig,
    Rig,
    heard,
    loud,
    speak,
)
from tests.fake_call import FakeCall
from tests.redis_server import RedisServer

WAIT = 10.0


async def read_until(subscription: Any, kind: str, into: list[dict[str, Any]]) -> None:
    async for event in subscription:
        into.append(event)
        if event["type"] == kind:
            return


# --- the event stream ---


async def test_events_come_in_order_from_the_calls_start(rig: Rig) -> None:
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    await speak(stream, frames=10, variant=1)
    await stream.wait_for("mark", count=2)
    await wait_until(lambda: any(e["kind"] == "assistant" for e in call.record.timeline),
                     WAIT, "the answer transcribed")
    for key in "78#":
        await stream.send_dtmf(key)
    subscription = call.subscribe(replay=True)  # a subscriber arriving mid-call
    await stream.send_stop()
    events: list[dict[str, Any]] = []
    await asyncio.wait_for(read_until(subscription, "call.ended", events), WAIT)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "call.started" and kinds[-1] == "call.ended"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["call_sid"] == call.call_sid for e in events)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    started = events[0]
    assert started["caller"] == "+1555***1111" and started["direction"] == "inbound"
    deltas = [e for e in events if e["type"] == "transcript" and not e["final"]]
    final = [e for e in events if e["type"] == "transcript" and e["final"]]
    assert {e["role"] for e in final} == {"caller", "assistant"}
    assistant = next(e for e in final if e["role"] == "assistant")
    said = "".join(e["text"] for e in deltas if e["item_id"] == assistant["item_id"])
    assert said == assistant["text"]  # the deltas add up to the turn
    assert kinds.index("latency") < kinds.index("call.ended")
    keypad = next(e for e in events if e["type"] == "keypad")
    assert keypad["digits"] == "••"  # masked: LOG_PII is off
    assert events[-1]["kind"] == "caller_hung_up"


async def test_a_slow_subscriber_loses_events_not_the_call(rig: Rig) -> None:
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    slow = call.events.subscribe(replay=False, size=3)  # never read while the call goes on
    for n in range(50):
        call.publish(Transcript("assistant", "item_x", f"word {n} ", False))
    await speak(stream, frames=10, variant=2)  # the call is not slowed: the turn is answered
    await stream.wait_for("mark", count=2)
    assert loud(2) in heard(stream)
    got = [slow._queue.popleft() for _ in range(3)]
    assert [e["text"] for e in got] == ["word 0 ", "word 1 ", "word 2 "]
    assert slow.dropped >= 47
    nxt = await asyncio.wait_for(slow.__aiter__().__anext__(), WAIT)
    assert nxt == {"type": "dropped", "count": slow.dropped}  # the reader is told


def test_keypad_digits_are_shown_only_with_log_pii() -> None:
    stream = EventStream()
    stream.public = True
    subscription = stream.subscribe()
    stream.publish(KeypadEntry("1234"))
    stream.publish(KeypadEntry("1234", shown=True))
    assert [e["digits"] for e in subscription._queue] == ["••••", "1234"]


async def test_a_subscriber_on_another_instance_follows_through_redis(
        make_rig: MakeRig, redis_server: RedisServer, redis_prefix: str) -> None:
    bus = RedisBus(redis_server.url, prefix=redis_prefix)
    other = RedisBus(redis_server.url, prefix=redis_prefix)  # another instance's
    await bus.start()
    await other.start()
    try:
        rig = await make_rig(bus=bus)
        stream, _ = await rig.place()
        (call,) = rig.live_calls()
        await speak(stream, frames=10, variant=3)
        await stream.wait_for("mark", count=2)
        # Joins mid-call on the other instance: the call from its start, then live.
        events: list[dict[str, Any]] = []
        reading = asyncio.ensure_future(read_until(other.call_events(call.call_sid),
                                                   "call.ended", events))
        await wait_until(lambda: any(e["type"] == "latency" for e in events), WAIT,
                         "the replay")
        await speak(stream, frames=10, variant=4)  # live, after the replay
        await stream.wait_for("mark", count=4)
        await stream.send_stop()
        await asyncio.wait_for(reading, WAIT)
        assert events[0]["type"] == "call.started" and events[-1]["type"] == "call.ended"
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert sum(e["type"] == "latency" for e in events) == 2
    finally:
        await bus.close()
        await other.close()


# --- the response gate ---


LOOKUP_TOOL = """
from server.tools import tool

@tool
async def lookup(order_id: str) -> dict:
    \"\"\"Look up an order.\"\"\"
    return {"order_id": order_id, "status": "shipped"}
"""


async def test_greeting_tool_and_keypad_never_ask_twice_at_once(make_rig: MakeRig,
                                                                tmp_path: Path) -> None:
    """The greeting is still being generated when the caller types a key and a tool's result
    comes in: each needs a response, and the service never gets a second `response.create`
    while one is active (it would answer conversation_already_has_active_response)."""
    module = tmp_path / "lookup_tools.py"
    module.write_text(LOOKUP_TOOL)
    options = StandinOptions(api_key=API_KEY, pace=1.0, greeting_ms=1500,
                             tool_calls={1: tool_call("lookup", {"order_id": "A1"})})
    rig = await make_rig(options, greeting="Hello {{called}}", keypad_timeout=0.2,
                         tools_module=str(module))
    stream, session = await rig.place(marks="immediate")
    await session.wait_for("response.create")  # the greeting, spoken at real pace
    await stream.send_dtmf("1")
    await stream.send_dtmf("#")  # a keypad entry while the greeting is being generated
    await speak(stream, frames=6, variant=5)  # a turn whose answer calls the tool
    (call,) = rig.live_calls()
    await wait_until(lambda: any(e["kind"] == "tool" for e in call.record.timeline), WAIT,
                     "the tool ran")
    # The keypad's request is answered by the service's own response to the caller's turn
    # (it came after the entry); the tool's by one more: two requests sent, none refused.
    await wait_until(lambda: call.gate.sent >= 2 and not call.gate.busy
                     and sum(e["kind"] == "assistant" for e in call.record.timeline) >= 2,
                     20.0, "greeting and tool answered")
    creates = [i for i, e in enumerate(session.received) if e["type"] == "response.create"]
    assert len(creates) == call.gate.sent >= 2
    assert [e for e in session.errors
            if e["code"] == "conversation_already_has_active_response"] == []


# --- the plan ---


async def test_a_plan_set_at_the_webhook_reaches_the_sessions_instructions(
        make_rig: MakeRig, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    (prompts / "support").mkdir(parents=True)
    (prompts / "support" / "2.md").write_text("You are the support line {{called}}. {{tier}}")
    numbers = tmp_path / "numbers.json"
    numbers.write_text(json.dumps({CALLED: {
        "prompt": {"id": "support", "version": "2"}, "voice": "marin",
        "variables": {"tier": "Gold customers only."}, "metadata": {"line": "support"}}}))
    state = MemoryState()
    await state.start()
    # The webhook lands on one instance, the stream on another: the plan travels.
    webhook_side = await make_rig(state=state, prompts_dir=prompts, numbers_file=numbers)
    stream_side = await make_rig(state=state, prompts_dir=prompts, numbers_file=None)
    call_sid = "CA" + "f" * 32
    twiml = await post_webhook(webhook_side.bridge.session,
                               str(webhook_side.bridge.make_url("/incoming-call")),
                               call_form(call_sid, CALLER, CALLED), AUTH_TOKEN)
    stream = await TwilioStream.connect(stream_side.bridge.session,
                                        str(stream_side.bridge.make_url("/media-stream")))
    stream_side.streams.append(stream)
    await stream.send_connected()
    await stream.send_start(call_sid, "MZ" + "e" * 32, twiml.parameters)
    session = await next_session(stream_side.standin.app)
    update = await session.wait_for("session.update")
    assert update["session"]["instructions"] == (
        f"You are the support line {CALLED}. Gold customers only.")
    assert update["session"]["audio"]["output"]["voice"] == "marin"
    (call,) = stream_side.live_calls()
    assert call.record.metadata == {"line": "support"}
    assert call.record.prompt.startswith("support version 2")



# --- the conversation, whatever the records configuration ---


async def test_conversation_restored_after_handover_without_records(make_rig: MakeRig) -> None:
    state = MemoryState()
    await state.start()
    public = "http://fleet.example"
    old = await make_rig(state=state, shutdown_mode="handover", public_url=public,
                         database_url="off")
    new = await make_rig(state=state, public_url=public, database_url="off")
    call_sid = "CA" + "d" * 32
    form = call_form(call_sid, CALLER, CALLED)
    twiml = await post_webhook(old.bridge.session, str(old.bridge.make_url("/incoming-call")),
                               form, AUTH_TOKEN, sign_url=public + "/incoming-call")
    stream = await old.open_stream(str(old.bridge.make_url("/media-stream")))
    await stream.send_connected()
    await stream.send_start(call_sid, "MZ" + "1" * 32, twiml.parameters)
    await (await next_session(old.standin.app)).wait_for("session.update")
    (call,) = old.live_calls()
    await speak(stream, frames=10, variant=1)
    await wait_until(lambda: {"caller", "assistant"} <= {e["kind"] for e in
                                                         call.record.timeline},
                     WAIT, "both turns in the conversation")
    await old.app[REGISTRY].close_all(grace=WAIT)
    again = await post_webhook(new.bridge.session, str(new.bridge.make_url("/connect-action")),
                               {**form, "CallStatus": "in-progress"}, AUTH_TOKEN,
                               sign_url=public + "/connect-action", what="connect action")
    resumed = await new.open_stream(str(new.bridge.make_url("/media-stream/resume")))
    await resumed.send_connected()
    await resumed.send_start(call_sid, "MZ" + "2" * 32, again.parameters)
    second = await next_session(new.standin.app)
    said = await second.wait_for("conversation.item.create", count=1)
    assert said["item"]["content"][0]["text"].startswith("caller turn 1")


async def test_the_gate_sends_one_response_create_at_a_time() -> None:
    """Greeting, keypad and a tool's result, through the real features and gate: while the
    greeting's response is active nothing else is sent; after it, one response answers both
    plain requests."""

    @tool
    async def lookup(order_id: str) -> dict[str, str]:
        """Look up an order."""
        return {"order_id": order_id}

    settings = Settings(openai_api_key="sk-test", hold_audio=None, keypad_timeout=5.0)
    call = FakeCall("CAgate", settings)
    call.greeting = "Hello"
    pad = keypad.KeypadFeature(call, timeout=5.0)
    for feature in (greeting.GreetingFeature(call), pad,
                    tools_feature.factory(settings, Toolbox({"lookup": python_tool(lookup)},
                                                            2.0))(call)):
        assert feature is not None
        call.add(feature)

    def creates() -> int:
        return sum(e["type"] == "response.create" for side, e in call.sent)

    await call.session_ready()
    assert creates() == 1  # the greeting
    await call.model_event(ev.ResponseCreated("resp_g"))
    for key in "5#":
        await pad.on_twilio(tw.Dtmf(key))
    await call.model_event(ev.FunctionCall("call_1", "lookup", '{"order_id": "A1"}', "resp_t"))
    await call.model_event(ev.ResponseDone("resp_t", "completed", None, {}))
    await call.wait(lambda c: any(e.get("item", {}).get("type") == "function_call_output"
                                  for _, e in c.sent))
    assert creates() == 1  # the greeting's response is still active: both wait
    await call.model_event(ev.ResponseDone("resp_g", "completed", None, {}))
    assert creates() == 2  # one response answers the keypad entry and the tool's result
    await call.model_event(ev.ResponseCreated("resp_2"))
    await call.model_event(ev.ResponseDone("resp_2", "completed", None, {}))
    assert creates() == 2
    await call.finish(hung_up("test over"))
