"""End to end over loopback: the bridge, the Realtime stand-in and a Twilio stream. The assistant
calls tools (results reach the model, then exactly one response.create), plays hold audio for a
slow one, ends and transfers calls after its last words played, hears the keypad, greets first;
a hang-up cancels a running tool."""

from __future__ import annotations

import asyncio
import base64
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from server.app import FEATURES, SETTINGS
from server.call.ending import EndKind
from server.call.features import greeting, keypad
from server.call.features import tools as tools_feature
from server.sounds import load_ulaw
from server.testing.inbox import wait_until
from server.testing.sdk_check import EventChecker
from server.testing.standin import StandinOptions, StandinSession, tool_call
from server.toolbox import Toolbox, load_toolbox, python_tool
from server.tools import tool
from server.wire.twilio import compute_signature
from tests.conftest import API_KEY, AUTH_TOKEN, MakeRig, Rig, heard, speak

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "config" / "tools" / "example.py")
MINE = (tools_feature.ToolsFeature, keypad.KeypadFeature, greeting.GreetingFeature)


class Recorder:
    """The stand-in's event hook: keeps every server event (errors included) and still checks
    both directions against the SDK."""

    def __init__(self) -> None:
        self.checker = EventChecker()
        self.server: list[Mapping[str, Any]] = []

    def __call__(self, direction: Any, event: Mapping[str, Any]) -> None:
        if direction == "server":
            self.server.append(event)
        self.checker(direction, event)

    def errors(self) -> list[Mapping[str, Any]]:
        return [e["error"] for e in self.server if e.get("type") == "error"]


def install(toolbox: Toolbox | None = None, hold_after: float = 1.5,
            goodbye_wait: float = 5.0) -> Callable[[Any], None]:
    """A `make_rig(prepare=...)`: this module's features, built from the app's settings (as app
    startup does), with test timings; replaces any the app already wired."""

    def prepare(app: Any) -> None:
        settings = app[SETTINGS]
        factories = app[FEATURES]
        factories[:] = [f for f in factories
                        if getattr(f, "func", f) not in MINE]
        for factory in (greeting.factory(), keypad.factory(settings),
                        tools_feature.factory(settings, toolbox or load_toolbox(settings),
                                              hold_after=hold_after, goodbye_wait=goodbye_wait)):
            if factory is not None:
                factories.append(factory)

    return prepare


async def rig_with(make_rig: MakeRig, recorder: Recorder, prepare: Callable[[Any], None],
                   **options: Any) -> Rig:
    standin_keys = {"tool_calls", "text_tool_calls", "tool_reply_ms"}
    standin = StandinOptions(api_key=API_KEY, check_events=recorder,
                             **{k: v for k, v in options.items() if k in standin_keys})
    return await make_rig(standin, prepare=prepare,
                          **{k: v for k, v in options.items() if k not in standin_keys})


def client_events(session: StandinSession, kind: str) -> list[dict[str, Any]]:
    return [e for e in session.received if e.get("type") == kind]


def outputs(session: StandinSession) -> list[dict[str, Any]]:
    return [e["item"] for e in client_events(session, "conversation.item.create")
            if e["item"]["type"] == "function_call_output"]


async def connect_action(rig: Rig, call_sid: str) -> ET.Element:
    """What Twilio asks once the stream has closed, signed as Twilio signs it."""
    form = {"CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "CallStatus": "in-progress",
            "From": "+15550001111", "To": "+15550002222", "Direction": "inbound"}
    url = str(rig.bridge.make_url("/connect-action"))
    resp = await rig.bridge.post("/connect-action", data=form, headers={
        "X-Twilio-Signature": compute_signature(AUTH_TOKEN, url, form)})
    assert resp.status == 200
    return ET.fromstring(await resp.text())


async def test_tool_result_reaches_the_model_then_one_response_create(
        make_rig: MakeRig) -> None:
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(), tools_module=EXAMPLE,
                         tool_calls={1: tool_call("lookup_order", {"order_id": "1234"},
                                                  say_ms=200)})
    stream, session = await rig.place(marks="immediate")
    update = await session.wait_for("session.update")
    names = [t["name"] for t in update["session"]["tools"]]
    assert names == ["lookup_order", "opening_hours", "end_call"]
    assert update["session"]["tool_choice"] == "auto"
    await speak(stream)
    create = await session.wait_for("response.create")
    [output] = outputs(session)
    assert output["call_id"] in session.call_ids
    assert orjson.loads(output["output"])["status"] == "shipped"
    assert session.received.index(create) > session.received.index(
        next(e for e in session.received if e.get("item") == output))
    # the answer plays; nothing asks for a second response
    await wait_until(lambda: any(e.get("type") == "response.done" for e in recorder.server[
        [i for i, e in enumerate(recorder.server) if e.get("type") == "response.created"][-1]:]))
    await asyncio.sleep(0.1)
    assert len(client_events(session, "response.create")) == 1
    assert recorder.errors() == []
    assert len(heard(stream)) >= (200 + 400) * 8  # "let me check" + the answer
    recorder.checker.assert_clean()


async def test_several_calls_then_one_response_create(make_rig: MakeRig) -> None:
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(), tools_module=EXAMPLE, tool_calls={
        1: tools_feature_script()})
    stream, session = await rig.place(marks="immediate")
    await speak(stream)
    await session.wait_for("response.create")
    got = {o["call_id"]: orjson.loads(o["output"]) for o in outputs(session)}
    assert len(got) == 3
    assert sorted(map(str, got.values())) == sorted(map(str, [
        {"order_id": "1234", "status": "shipped", "carrier": "UPS", "expected": "tomorrow"},
        "weekday: 9 am to 6 pm; saturday: 10 am to 4 pm; sunday: closed",
        {"error": "the arguments were not valid JSON"}]))
    last_output = max(session.received.index(e) for e in client_events(
        session, "conversation.item.create"))
    assert session.received.index(client_events(session, "response.create")[0]) > last_output
    await stream.wait_for("media")
    await asyncio.sleep(0.1)
    assert len(client_events(session, "response.create")) == 1
    assert recorder.errors() == []
    recorder.checker.assert_clean()


def tools_feature_script() -> Any:
    from server.testing.standin import ToolCallScript

    return ToolCallScript((("lookup_order", {"order_id": "1234"}), ("opening_hours", {}),
                           ("lookup_order", "{broken")))


async def test_hang_up_cancels_a_running_tool(make_rig: MakeRig) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    @tool
    async def slow_lookup() -> str:
        """Takes forever."""
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return "never"

    toolbox = Toolbox({"slow_lookup": python_tool(slow_lookup, "test")})
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(toolbox),
                         tool_calls={1: tool_call("slow_lookup")})
    stream, session = await rig.place(marks="immediate")
    await speak(stream)
    await asyncio.wait_for(entered.wait(), 5)
    [call] = rig.live_calls()
    await stream.send_stop()
    await asyncio.wait_for(call.finished.wait(), 5)
    assert cancelled.is_set()
    assert all(t.done() for t in call.tasks)
    assert outputs(session) == []


async def test_hold_audio_then_clear_before_the_answer(make_rig: MakeRig) -> None:
    @tool
    async def slow_lookup() -> dict[str, str]:
        """Takes a while."""
        await asyncio.sleep(1.0)
        return {"status": "found"}

    toolbox = Toolbox({"slow_lookup": python_tool(slow_lookup, "test")})
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(toolbox, hold_after=0.1),
                         tool_calls={1: tool_call("slow_lookup", say_ms=100)})
    stream, session = await rig.place(marks="immediate")
    await speak(stream)
    await session.wait_for("response.create")
    clear = await stream.wait_for("clear")
    index = stream.received.index(clear)
    before = [m for m in stream.received[:index] if m.get("event") == "media"]
    hold = load_ulaw(Path(rig.settings.hold_audio or ""))
    payloads = [base64.b64decode(m["media"]["payload"]) for m in before]
    assert hold[:4000] in payloads  # the first 500 ms of the hold audio
    # after the clear: the model's answer, and no more hold audio
    await wait_until(lambda: len(heard(stream)) >= sum(map(len, payloads)) + 400 * 8)
    after = [base64.b64decode(m["media"]["payload"]) for m in stream.received[index:]
             if m.get("event") == "media"]
    assert after and not any(p == hold[:4000] for p in after)
    assert recorder.errors() == []


async def test_end_call_after_the_goodbye_played(make_rig: MakeRig) -> None:
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(),
                         tool_calls={1: tool_call("end_call", say_ms=400)})
    stream, session = await rig.place(marks="playback")  # real-time playback, marks when played
    await speak(stream)
    [call] = rig.live_calls()
    await asyncio.wait_for(call.finished.wait(), 5)
    assert call.ending is not None
    assert (call.ending.kind, call.ending.reason) == (EndKind.ASSISTANT_ENDED,
                                                      "assistant ended the call")
    assert len(stream.heard) >= 400 * 8  # the whole goodbye was heard before the hang-up
    assert client_events(session, "response.create") == []
    await asyncio.wait_for(stream.closed.wait(), 5)
    twiml = await connect_action(rig, call.call_sid)
    assert twiml.find("Hangup") is not None and twiml.find("Say") is None


async def test_transfer_dials_the_target(make_rig: MakeRig) -> None:
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(),
                         transfer_targets=(("sales", "+15550003333"),),
                         tool_calls={1: tool_call("transfer_call", {"target": "sales"},
                                                  say_ms=200)})
    stream, session = await rig.place(marks="immediate")
    update = await session.wait_for("session.update")
    [transfer] = [t for t in update["session"]["tools"] if t["name"] == "transfer_call"]
    assert transfer["parameters"]["properties"]["target"]["enum"] == ["sales"]
    await speak(stream)
    [call] = rig.live_calls()
    await asyncio.wait_for(call.finished.wait(), 5)
    assert call.ending is not None
    assert (call.ending.kind, call.ending.reason) == (EndKind.TRANSFERRED, "transferred to sales")
    assert call.record.end_reason == "transferred to sales"
    twiml = await connect_action(rig, call.call_sid)
    dial = twiml.find("Dial")
    assert dial is not None and dial.get("callerId") is None  # Twilio keeps the caller's number
    number = dial.find("Number")
    assert number is not None and number.text == "+15550003333"


async def test_keypad_entry_is_told_to_the_model(make_rig: MakeRig) -> None:
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(), tools_module=EXAMPLE,
                         text_tool_calls={"1 2 3 4": tool_call("lookup_order",
                                                               {"order_id": "1234"})})
    stream, session = await rig.place(marks="immediate")
    for digit in "1234#":
        await stream.send_dtmf(digit)
    first = await session.wait_for("response.create")
    [text] = [e["item"] for e in client_events(session, "conversation.item.create")
              if e["item"]["type"] == "message"]
    assert text["role"] == "user"
    assert text["content"] == [{"type": "input_text",
                                "text": "The caller typed 1 2 3 4 on the keypad."}]
    assert session.received.index(first) > session.received.index(
        next(e for e in session.received if e.get("item") == text))
    # the stand-in answered with a function call: its output, then a second response.create
    await session.wait_for("response.create", count=2)
    assert orjson.loads(outputs(session)[0]["output"])["status"] == "shipped"
    assert recorder.errors() == []


async def test_keypad_off_ignores_keys(make_rig: MakeRig) -> None:
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(), keypad=False)
    stream, session = await rig.place(marks="immediate")
    for digit in "12#":
        await stream.send_dtmf(digit)
    await speak(stream)  # the call goes on as usual
    await stream.wait_for("media")
    assert client_events(session, "conversation.item.create") == []


async def test_greeting_right_after_session_updated(make_rig: MakeRig) -> None:
    recorder = Recorder()
    rig = await rig_with(make_rig, recorder, install(),
                         greeting="Thanks for calling {{called}}, how can I help?")
    stream, session = await rig.place(marks="immediate")
    create = await session.wait_for("response.create")
    assert session.received.index(create) > session.received.index(
        client_events(session, "session.update")[0])
    assert ('saying exactly: "Thanks for calling +15550002222, how can I help?"'
            in create["response"]["instructions"])
    await stream.wait_for("media")  # the caller hears it without saying a word
    assert recorder.errors() == []
    recorder.checker.assert_clean()
