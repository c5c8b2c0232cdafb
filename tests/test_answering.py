"""The answering-machine feature on its own, against the fake call and a real response gate:
what it holds back until the AMD result, and what each result makes it do."""

from __future__ import annotations

from typing import Any

from server.call.ending import EndKind
from server.call.events import MachineDetection
from server.call.features.answering import Answering, factory
from server.call.features.greeting import GreetingFeature
from server.call.gate import ResponseGate
from server.call.plan import CallPlan
from server.models import events as ev
from server.settings import Settings
from tests.fake_call import FakeCall


def outbound(voicemail: str | None = "Please call back.", greeting: str | None = "Hi Ann",
             wait_s: float = 30.0) -> tuple[FakeCall, Answering, list[str]]:
    call = FakeCall("CAout")
    call.plan = CallPlan(direction="outbound", voicemail=voicemail)
    call.greeting = greeting
    hung_up: list[str] = []
    feature = Answering(call, wait_s, hung_up.append)
    call.add(feature)
    call.add(GreetingFeature(call))  # says nothing on an outbound call
    return call, feature, hung_up


def created(call: FakeCall) -> list[dict[str, Any]]:
    return [e for side, e in call.sent if side == "model" and e["type"] == "response.create"]


def held(call: FakeCall) -> bool:
    return call.gate.held


def listening(call: FakeCall) -> list[bool]:
    """Each session.update's create_response, in order (False: listen only)."""
    return [e["session"]["audio"]["input"]["turn_detection"]["create_response"]
            for side, e in call.sent if side == "model" and e["type"] == "session.update"]


async def test_the_assistant_waits_for_the_result_then_greets_a_person() -> None:
    call, _, hung_up = outbound()
    assert call.record.status == "in-progress"
    await call.session_ready()
    assert call.holds == ["listen only", "hold"] and listening(call) == [False]
    assert created(call) == [] and held(call)
    call.publish(MachineDetection("human"))
    await call.wait(lambda c: len(created(c)) == 1)
    assert "Hi Ann" in created(call)[0]["response"]["instructions"]
    assert call.holds == ["listen only", "hold", "answer", "release"]
    assert listening(call) == [False, True] and not held(call)
    call.publish(MachineDetection("human"))  # a repeated result changes nothing
    await call.model_event(ev.ResponseCreated("resp_1"))
    assert len(created(call)) == 1 and hung_up == [] and call.endings == []


async def test_the_voicemail_is_left_as_soon_as_the_machine_stops_talking() -> None:
    call, _, hung_up = outbound()
    call.gate = ResponseGate(call, auto_wait=60.0)  # type: ignore[arg-type]
    await call.session_ready()
    await call.model_event(ev.SpeechStarted("item_1", 0))  # the machine's greeting
    call.publish(MachineDetection("machine_end_beep"))
    await call.wait(lambda c: "cut" in c.holds)
    assert created(call) == []  # not over the machine's own words
    await call.model_event(ev.SpeechStopped("item_1", 4000))
    # At once: the model only listens, so no response of its own is awaited after the turn.
    await call.wait(lambda c: len(created(c)) == 1)
    assert "Please call back." in created(call)[0]["response"]["instructions"]
    assert "Hi Ann" not in created(call)[0]["response"]["instructions"]
    await call.model_event(ev.ResponseCreated("resp_vm"))
    assert call.endings == []
    await call.model_event(ev.ResponseDone("resp_vm", "completed", None, {}))
    await call.ended.wait()
    (ending,) = call.endings
    assert ending.kind == EndKind.VOICEMAIL and ending.decision is not None
    assert ending.decision.action == "hangup"
    assert hung_up == ["CAout"]  # and through the REST API


async def test_a_machine_after_the_wait_cuts_the_assistant_and_leaves_one_message() -> None:
    call, _, hung_up = outbound(wait_s=0.0)
    await call.session_ready()  # no time to wait: the assistant greets at once
    await call.wait(lambda c: len(created(c)) == 1)
    await call.model_event(ev.ResponseCreated("resp_greeting"))
    call.publish(MachineDetection("machine_end_other"))  # while the greeting is under way
    await call.wait(lambda c: "cut" in c.holds)
    assert len(created(call)) == 1  # the reply under way ends first (its audio is dropped)
    await call.model_event(ev.ResponseDone("resp_greeting", "completed", None, {}))
    await call.wait(lambda c: len(created(c)) == 2)
    assert "cut" in call.holds and listening(call)[-1] is False
    call.publish(MachineDetection("machine_end_beep"))  # never a second message
    await call.model_event(ev.ResponseCreated("resp_vm"))
    await call.model_event(ev.ResponseDone("resp_vm", "completed", None, {}))
    await call.ended.wait()
    assert len(created(call)) == 2 and len(call.endings) == 1 and hung_up == ["CAout"]


async def test_a_machine_without_a_message_and_a_fax_end_the_call_at_once() -> None:
    for voicemail, result, reason in ((None, "machine_end_silence", "hung up without a message"),
                                      ("A message.", "fax", "a fax machine answered")):
        call, _, hung_up = outbound(voicemail=voicemail)
        await call.session_ready()
        call.publish(MachineDetection(result))
        await call.ended.wait()
        (ending,) = call.endings
        assert ending.kind == EndKind.MACHINE and reason in ending.reason
        assert created(call) == [] and hung_up == ["CAout"]


async def test_a_result_known_before_the_session_is_acted_on_when_it_is_ready() -> None:
    call, _, hung_up = outbound()
    call.record.answered_by = "human"  # delivered while the stream was starting
    feature = Answering(call, 30.0, hung_up.append)
    call.features = [feature]
    await call.session_ready()
    await call.wait(lambda c: len(created(c)) == 1)
    assert call.holds[-1] == "release"


def test_only_outbound_calls_get_the_feature() -> None:
    make = factory(Settings(openai_api_key="sk-test"))
    inbound = FakeCall()
    assert make(inbound) is None
    inbound.plan = CallPlan(direction="outbound")
    assert isinstance(make(inbound), Answering)


async def test_a_model_that_takes_its_own_turns_leaves_the_message_too() -> None:
    """GPT-Live has no responses to follow: its first words after the request are the
    message, and the call ends once they have played."""
    call, _, hung_up = outbound()
    call.model.decides_turns = True
    await call.session_ready()
    call.publish(MachineDetection("machine_end_beep"))
    await call.wait(lambda c: len(created(c)) == 1)  # the gate passes it on at once
    assert "Please call back." in created(call)[0]["response"]["instructions"]
    assert call.endings == []
    await call.model_event(ev.TranscriptDelta("assistant", "", "Please "))
    await call.ended.wait()
    assert call.endings[0].kind == EndKind.VOICEMAIL and hung_up == ["CAout"]
