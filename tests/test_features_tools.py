"""The Tools, Keypad and Greeting features against a small fake CallControl: the order of what
they send (outputs, one response.create, hold audio and its clear), built-ins, cancellation."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import orjson
import pytest

from server.call.ending import Ending, EndKind
from server.call.events import KeypadEntry, ToolFinished
from server.call.features import greeting, keypad
from server.call.features import tools as tools_feature
from server.call.features.base import Feature
from server.call.plan import Plans
from server.models import events as ev
from server.settings import ConfigError, Settings
from server.toolbox import Toolbox, python_tool
from server.tools import CallContext, tool
from server.wire import twilio as tw
from tests import fake_call
from tests.conftest import PROMPTS

SETTINGS = Settings(openai_api_key="sk-test", hold_audio=None)


class FakeCall(fake_call.FakeCall):
    """The shared fake, with what these tests read: the ordered sends, outputs, waiting."""

    def __init__(self, settings: Settings = SETTINGS) -> None:
        super().__init__("CA1", settings)
        self.stream_sid = "MZ1"

    # --- for tests ---

    def kinds(self) -> list[str]:
        """What was sent, in order: model event types and Twilio events."""
        out = []
        for side, e in self.sent:
            if side == "model":
                item = e.get("item", {})
                out.append(f"{e['type']}:{item.get('type')}" if item else e["type"])
            else:
                out.append(f"twilio:{e['event']}")
        return out

    def outputs(self) -> dict[str, Any]:
        return {e["item"]["call_id"]: orjson.loads(e["item"]["output"]) for side, e in self.sent
                if side == "model" and e.get("item", {}).get("type") == "function_call_output"}

    async def close(self, feature: Feature) -> None:
        await feature.on_end(Ending(EndKind.CALLER_HUNG_UP, "test over"))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def count(kind: str) -> Any:
    return lambda call: call.kinds().count(kind)


def fc(call_id: str, name: str, arguments: str = "{}", response_id: str = "resp_1"
       ) -> ev.FunctionCall:
    return ev.FunctionCall(call_id, name, arguments, response_id, f"item_{call_id}")


def done(response_id: str = "resp_1", status: str = "completed") -> ev.ResponseDone:
    return ev.ResponseDone(response_id, status, None, {})


def make_tools(call: FakeCall, *fns: Any, settings: Settings = SETTINGS,
               hold_after: float = 1.5, goodbye_wait: float = 1.0
               ) -> tools_feature.ToolsFeature:
    tools = [python_tool(fn, "test") for fn in fns]
    factory = tools_feature.factory(settings, Toolbox({t.spec.name: t for t in tools}, 2.0),
                                    hold_after=hold_after, goodbye_wait=goodbye_wait)
    feature = factory(call)
    assert isinstance(feature, tools_feature.ToolsFeature)
    call.add(feature)
    return feature


class Gate:
    """A tool that waits until the test opens it."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()
        self.cancelled = False


def gated(gate: Gate, name: str = "lookup") -> Any:
    async def lookup(order_id: str) -> dict[str, str]:
        """Look up an order."""
        gate.entered.set()
        try:
            await gate.opened.wait()
        except asyncio.CancelledError:
            gate.cancelled = True
            raise
        return {"order": order_id, "status": "shipped"}

    lookup.__name__ = name
    return tool(lookup)


# --- Tools ---


def test_declares_tools_and_builtins() -> None:
    call = FakeCall()
    feature = make_tools(call, gated(Gate()))
    assert [t.name for t in feature.tools()] == ["lookup", "end_call"]
    with_transfer = make_tools(call, settings=replace(SETTINGS, transfer_targets=(
        ("sales", "+15550001111"), ("desk", "sip:desk@example.com"))))
    transfer = with_transfer.tools()[-1]
    assert transfer.name == "transfer_call"
    assert transfer.parameters["properties"]["target"]["enum"] == ["sales", "desk"]


@pytest.mark.parametrize("result_first", [True, False])
async def test_output_then_one_response_create_after_done(result_first: bool) -> None:
    call, gate = FakeCall(), Gate()
    feature = make_tools(call, gated(gate))
    await call.model_event(ev.ResponseCreated("resp_1"))
    await call.model_event(fc("call_1", "lookup", '{"order_id": "A1"}'))
    await gate.entered.wait()
    if result_first:
        gate.opened.set()
        await call.wait(lambda c: c.outputs())
        assert "response.create" not in call.kinds()  # the response that made it is not done
        await call.model_event(done())
    else:
        await call.model_event(done())
        assert call.kinds() == []
        gate.opened.set()
    await call.wait(count("response.create"))
    assert call.kinds() == ["conversation.item.create:function_call_output", "response.create"]
    assert call.outputs() == {"call_1": {"order": "A1", "status": "shipped"}}
    finished = [n for n in call.events if isinstance(n, ToolFinished)]
    assert [(n.name, n.outcome) for n in finished] == [("lookup", "ok")]
    await call.close(feature)


async def test_no_response_create_before_done_even_unseen_response() -> None:
    """Even when `response.created` was not seen, the request waits for `response.done`."""
    call, gate = FakeCall(), Gate()
    gate.opened.set()
    feature = make_tools(call, gated(gate))
    await call.model_event(fc("call_1", "lookup", '{"order_id": "A1"}'))
    await call.wait(lambda c: c.outputs())
    await asyncio.sleep(0.05)
    assert "response.create" not in call.kinds()
    await call.model_event(done())
    assert call.kinds()[-1] == "response.create"
    await call.close(feature)


async def test_several_calls_in_one_response_one_create() -> None:
    call, first, second = FakeCall(), Gate(), Gate()
    feature = make_tools(call, gated(first, "one"), gated(second, "two"))
    await call.model_event(ev.ResponseCreated("resp_1"))
    await call.model_event(fc("c1", "one", '{"order_id": "1"}'))
    await call.model_event(fc("c2", "two", '{"order_id": "2"}'))
    await call.model_event(fc("c3", "nope"))  # unknown: an error output, at once
    await call.model_event(done())
    first.opened.set()
    await call.wait(lambda c: len(c.outputs()) == 2)
    assert "response.create" not in call.kinds()
    second.opened.set()
    await call.wait(count("response.create"))
    kinds = call.kinds()
    assert kinds.count("conversation.item.create:function_call_output") == 3
    assert kinds[-1] == "response.create" and kinds.count("response.create") == 1
    assert call.outputs()["c3"] == {"error": "there is no tool named 'nope'"}
    # the same call again (e.g. response.done repeating it) is not run twice
    await call.model_event(ev.ResponseDone("resp_1", "completed", None, {},
                                             (fc("c1", "one", '{"order_id": "1"}'),)))
    assert call.kinds().count("conversation.item.create:function_call_output") == 3
    await call.close(feature)


async def test_calls_found_only_in_response_done_are_run() -> None:
    call, gate = FakeCall(), Gate()
    gate.opened.set()
    feature = make_tools(call, gated(gate))
    await call.model_event(ev.ResponseDone("resp_9", "completed", None, {},
                                             (fc("c9", "lookup", '{"order_id": "9"}', "resp_9"),)))
    await call.wait(count("response.create"))
    assert list(call.outputs()) == ["c9"]
    await call.close(feature)


async def test_caller_turn_answers_instead_of_a_second_request() -> None:
    """The caller talks while the tool runs: the service answers the turn itself; asking too
    would collide, so the bridge only sends the output."""
    call, gate = FakeCall(), Gate()
    feature = make_tools(call, gated(gate))
    await call.model_event(fc("c1", "lookup", '{"order_id": "1"}'))
    await call.model_event(done())
    await call.model_event(ev.SpeechStarted("item_u", 0))
    gate.opened.set()
    await call.wait(lambda c: c.outputs())
    await call.model_event(ev.SpeechStopped("item_u", 900))
    await call.model_event(ev.ResponseCreated("resp_2"))  # the service's own answer
    await call.model_event(done("resp_2"))
    await asyncio.sleep(0.05)
    assert "response.create" not in call.kinds()
    await call.close(feature)


async def test_refused_request_is_sent_again() -> None:
    call, gate = FakeCall(), Gate()
    gate.opened.set()
    feature = make_tools(call, gated(gate))
    await call.model_event(fc("c1", "lookup", '{"order_id": "1"}'))
    await call.model_event(done())
    await call.wait(count("response.create"))
    (create,) = [e for side, e in call.sent if e.get("type") == "response.create"]
    await call.model_event(ev.ModelError("conversation_already_has_active_response", "busy",
                                create["event_id"], False))
    await call.model_event(done("resp_other"))
    await call.wait(lambda c: c.kinds().count("response.create") == 2)
    await call.close(feature)


async def test_hang_up_cancels_running_tools() -> None:
    call, gate = FakeCall(), Gate()
    feature = make_tools(call, gated(gate))
    await call.model_event(fc("c1", "lookup", '{"order_id": "1"}'))
    await gate.entered.wait()
    await call.close(feature)
    assert gate.cancelled
    assert not call.tasks
    assert [(n.name, n.outcome) for n in call.events if isinstance(n, ToolFinished)] == [
        ("lookup", "cancelled")]
    assert call.outputs() == {}


async def test_hold_audio_then_clear_before_the_model_speaks() -> None:
    call, gate = FakeCall(), Gate()
    settings = replace(SETTINGS, hold_audio=Settings(openai_api_key="x").hold_audio)
    feature = make_tools(call, gated(gate), settings=settings, hold_after=0.05)
    call.played.clear()  # the model's "let me check" is still playing
    await call.model_event(ev.ResponseCreated("resp_1"))
    await call.model_event(fc("c1", "lookup", '{"order_id": "1"}'))
    await call.model_event(done())
    await asyncio.sleep(0.15)
    assert "twilio:media" not in call.kinds()  # never over the model's own words
    call.played.set()
    await call.wait(lambda c: c.kinds().count("twilio:media") >= 2)
    gate.opened.set()
    await call.wait(count("response.create"))
    kinds = call.kinds()
    clear = kinds.index("twilio:clear")
    assert kinds[clear - 1:] == ["conversation.item.create:function_call_output",
                                 "twilio:clear", "response.create"]
    assert kinds.count("twilio:clear") == 1
    media = [e for side, e in call.sent if side == "caller" and e["event"] == "media"]
    assert all(set(m) == {"event", "streamSid", "media"} for m in media)
    await call.close(feature)


async def test_hold_stops_when_the_caller_talks() -> None:
    call, gate = FakeCall(), Gate()
    settings = replace(SETTINGS, hold_audio=Settings(openai_api_key="x").hold_audio)
    feature = make_tools(call, gated(gate), settings=settings, hold_after=0.01)
    await call.model_event(fc("c1", "lookup", '{"order_id": "1"}'))
    await call.model_event(done())
    await call.wait(count("twilio:media"))
    await call.model_event(ev.SpeechStarted("item_u", 0))
    assert call.kinds()[-1] == "twilio:clear"
    sent = len(call.sent)
    await asyncio.sleep(0.05)
    assert len(call.sent) == sent  # nothing more of it
    await call.close(feature)


async def test_fast_tool_gets_no_hold_audio() -> None:
    call, gate = FakeCall(), Gate()
    gate.opened.set()
    settings = replace(SETTINGS, hold_audio=Settings(openai_api_key="x").hold_audio)
    feature = make_tools(call, gated(gate), settings=settings, hold_after=0.2)
    await call.model_event(fc("c1", "lookup", '{"order_id": "1"}'))
    await call.model_event(done())
    await call.wait(count("response.create"))
    await asyncio.sleep(0.3)
    assert not [k for k in call.kinds() if k.startswith("twilio")]
    await call.close(feature)


async def test_end_call_after_the_goodbye_played() -> None:
    call = FakeCall()
    feature = make_tools(call)
    call.played.clear()  # the goodbye is still playing
    await call.model_event(fc("c1", "end_call"))
    await call.model_event(done())
    await asyncio.sleep(0.05)
    assert call.endings == []
    call.played.set()
    await asyncio.wait_for(call.ended.wait(), 3)
    [ending] = call.endings
    assert (ending.kind, ending.reason, ending.decision) == (
        EndKind.ASSISTANT_ENDED, "assistant ended the call", tw.HANGUP)
    assert "response.create" not in call.kinds()
    await call.close(feature)


async def test_end_call_bounded_wait() -> None:
    call = FakeCall()
    feature = make_tools(call, goodbye_wait=0.05)
    call.played.clear()  # marks never come back
    await call.model_event(fc("c1", "end_call"))
    await call.model_event(done())
    await asyncio.wait_for(call.ended.wait(), 3)
    assert [e.kind for e in call.endings] == [EndKind.ASSISTANT_ENDED]
    await call.close(feature)


async def test_end_call_interrupted_goes_on() -> None:
    call = FakeCall()
    feature = make_tools(call)
    await call.model_event(fc("c1", "end_call"))
    await call.model_event(done(status="cancelled"))
    await asyncio.sleep(0.05)
    assert call.endings == []
    assert "error" in call.outputs()["c1"]
    await call.close(feature)


async def test_transfer() -> None:
    settings = replace(SETTINGS, transfer_targets=(("sales", "+15550009999"),))
    call = FakeCall(settings)
    feature = make_tools(call, settings=settings)
    await call.model_event(fc("c1", "transfer_call", '{"target": "sales"}'))
    await call.model_event(done())
    await asyncio.wait_for(call.ended.wait(), 3)
    [ending] = call.endings
    assert (ending.kind, ending.reason) == (EndKind.TRANSFERRED, "transferred to sales")
    assert ending.decision == tw.Decision("dial", target="+15550009999")  # no callerId
    await call.close(feature)


async def test_transfer_to_an_unknown_target_is_an_error_output() -> None:
    settings = replace(SETTINGS, transfer_targets=(("sales", "+15550009999"),))
    call = FakeCall(settings)
    feature = make_tools(call, settings=settings)
    await call.model_event(fc("c1", "transfer_call", '{"target": "ceo"}'))
    await call.model_event(done())
    await call.wait(count("response.create"))
    assert call.outputs() == {"c1": {"error": "target must be one of sales"}}
    assert call.endings == []
    await call.close(feature)


async def test_tool_gets_the_call_context() -> None:
    seen: list[CallContext] = []

    @tool
    def who(ctx: CallContext) -> str:
        """Who is calling."""
        seen.append(ctx)
        return ctx.caller

    call = FakeCall()
    feature = make_tools(call, who)
    await call.model_event(fc("c1", "who"))
    await call.model_event(done())
    await call.wait(count("response.create"))
    assert call.outputs() == {"c1": "+15550001111"}
    assert (seen[0].call_sid, seen[0].called) == ("CA1", "+15550002222")
    await call.close(feature)


# --- Keypad ---


def make_keypad(call: FakeCall, timeout: float = 0.05) -> keypad.KeypadFeature:
    factory = keypad.factory(replace(call.settings, keypad_timeout=timeout))
    assert factory is not None
    feature = factory(call)
    assert isinstance(feature, keypad.KeypadFeature)
    call.add(feature)
    return feature


def texts(call: FakeCall) -> list[str]:
    return [e["item"]["content"][0]["text"] for side, e in call.sent
            if side == "model" and e.get("item", {}).get("type") == "message"]


async def test_keypad_pause_ends_an_entry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.call")
    call = FakeCall()
    feature = make_keypad(call)
    for digit in "1234":
        await feature.on_twilio(tw.Dtmf(digit))
    assert call.sent == []
    await call.wait(count("response.create"))
    assert texts(call) == ["The caller typed 1 2 3 4 on the keypad."]
    assert call.kinds() == ["conversation.item.create:message", "response.create"]
    assert call.events == [KeypadEntry("1234")]
    assert "1234" not in caplog.text and "4 key(s)" in caplog.text
    await call.close(feature)


async def test_keypad_hash_ends_an_entry_and_waits_for_the_response() -> None:
    call = FakeCall(replace(SETTINGS, log_pii=True))
    feature = make_keypad(call, timeout=5.0)
    await call.model_event(ev.ResponseCreated("resp_1"))  # the assistant is talking
    for digit in "42#":
        await feature.on_twilio(tw.Dtmf(digit))
    assert call.kinds() == ["conversation.item.create:message"]  # text now, answer later
    await call.model_event(done())
    assert call.kinds() == ["conversation.item.create:message", "response.create"]
    assert texts(call) == ["The caller typed 4 2 on the keypad."]
    await call.close(feature)


def test_keypad_off() -> None:
    assert keypad.factory(replace(SETTINGS, keypad=False)) is None


# --- Greeting ---


async def test_greeting_on_the_first_session_only() -> None:
    settings = replace(SETTINGS, greeting="Hello, thanks for calling {{ called }}!",
                       prompts_dir=PROMPTS)
    call = FakeCall(settings)
    resolved = Plans(settings).resolve(call.plan)  # what the call does with its plan
    assert resolved.greeting is not None
    call.greeting = resolved.greeting.render({"called": call.called})
    feature = greeting.factory()(call)
    assert feature is not None
    await feature.on_session_ready(True)
    await feature.on_session_ready(False)
    assert call.kinds() == ["response.create"]
    instructions = call.sent[0][1]["response"]["instructions"]
    assert 'saying exactly: "Hello, thanks for calling +15550002222!"' in instructions


def test_greeting_checks_placeholders() -> None:
    assert Plans(replace(SETTINGS, prompts_dir=PROMPTS)).default_greeting is None
    with pytest.raises(ConfigError, match=r"GREETING: .*unknown placeholder"):
        Plans(replace(SETTINGS, greeting="Hi {{name}}", prompts_dir=PROMPTS))
