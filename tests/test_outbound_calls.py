"""Outbound calls end to end: POST /calls, the fake Twilio placing the call and playing the
callee (a person, an answering machine, a fax, busy, no answer), the bridge's answering-machine
handling, the call's record through its statuses, and POST /calls' refusals."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.app import METRICS, REGISTRY
from server.outbound import cli
from server.testing.inbox import wait_until
from server.testing.standin import STANDIN_SESSIONS, StandinOptions, StandinSession
from server.testing.twilio_rest import Callee, FakeCall, answering_machine, speech
from tests.conftest import API_KEY, subprocess_env
from tests.outbound_rig import ADMIN, AUTH, FROM, Line, MakeLine

TO = "+15550100001"


def heard_ms(call: FakeCall) -> int:
    """Audio the bridge sent the callee, in ms (mu-law: 8 bytes a ms)."""
    return sum(len(base64.b64decode(m["media"]["payload"])) for s in call.streams
               for m in s.received if m.get("event") == "media") // 8


def first_media_at(call: FakeCall) -> float | None:
    for stream in call.streams:
        for message, at in zip(stream.received, stream.arrivals, strict=True):
            if message.get("event") == "media":
                return at
    return None


def amd_at(line: Line, sid: str) -> float:
    (callback,) = [c for c in line.fake.callbacks if c.kind == "amd"
                   and c.form["CallSid"] == sid]
    return callback.at


def sessions(line: Line) -> list[StandinSession]:
    found: list[StandinSession] = line.rig.standin.app[STANDIN_SESSIONS]
    return list(found)


def creates(session: StandinSession) -> list[dict[str, Any]]:
    return [e for e in session.received if e.get("type") == "response.create"]


def metric(line: Line, end: str) -> float:
    value = line.rig.app[METRICS].registry.get_sample_value(
        "bridge_calls_total", {"end": end, "direction": "outbound"})
    return value or 0.0


@pytest.mark.parametrize("prewarm", [True, False])
async def test_a_person_is_greeted_after_the_answer_with_the_calls_variables(
        make_line: MakeLine, prewarm: bool) -> None:
    line = await make_line(prewarm=prewarm)
    # The callee says "hello?" (500 ms); AMD says human 0.7 s after the answer; the callee
    # hangs up 1.6 s after answering.
    line.fake.callees[TO] = Callee("human", audio=speech(500), amd_after_s=0.7,
                                   hang_up_after_s=1.6)
    sid = await line.place(to=TO, greeting="Hello {{name}}, this is the clinic.",
                           prompt={"id": "reminders"},
                           variables={"name": "Ann", "day": "Tuesday"},
                           metadata={"ticket": 42})
    call = await line.ended(sid)
    (session,) = sessions(line)  # opened at the TwiML request (or the stream), used by it
    update = session.received[0]
    assert update["type"] == "session.update"
    assert "Call Ann about their appointment on Tuesday" in update["session"]["instructions"]
    (greeting,) = creates(session)
    assert '"Hello Ann, this is the clinic."' in greeting["response"]["instructions"]
    # Nothing reached the callee before the AMD result: not the greeting, not an answer to
    # their "hello?" (the model only listened).
    first = first_media_at(call)
    assert first is not None and first > amd_at(line, sid)
    listen_only = [e for e in session.received if e.get("type") == "session.update"
                   and e["session"].get("audio", {}).get("input", {}).get(
                       "turn_detection", {}).get("create_response") is False]
    assert listen_only, "the model was never told to only listen"
    assert call.errors == [] and call.hung_up_by == "callee"
    record = await line.record(sid, lambda r: r.get("status") == "completed")
    assert (record["direction"], record["answered_by"], record["end_kind"]) == (
        "outbound", "human", "caller_hung_up")
    assert (record["from"], record["to"]) == (FROM, TO)
    assert record["metadata"] == {"ticket": 42}
    assert record["prompt"].startswith("reminders version 1")
    # The callee heard the greeting, and nothing else (the stand-in says "<kind> of N ms").
    (said,) = [e for e in record["timeline"] if e["kind"] == "assistant"]
    assert heard_ms(call) == int(said["text"].split()[-2])
    assert line.fake.creates()[0].form["Url"].startswith(
        "https://bridge.example/incoming-call?plan=pl_")
    assert await line.rig.app[REGISTRY].state.active() == 0  # the slot went with the call


async def test_voicemail_is_left_after_the_beep_then_the_call_hangs_up(
        make_line: MakeLine) -> None:
    line = await make_line()
    line.fake.callees[TO] = Callee("machine", audio=answering_machine(700, 200))
    sid = await line.place(to=TO, greeting="Hi, this is the clinic.",
                           voicemail="Please call the clinic back.")
    call = await line.ended(sid)
    (session,) = sessions(line)
    said = [e["response"]["instructions"] for e in creates(session)]
    # The greeting was made at the webhook (kept back, never played), then the message.
    assert len(said) == 2 and "Hi, this is the clinic." in said[0]
    assert "Please call the clinic back." in said[1]
    truncated = [e for e in session.received if e.get("type") == "conversation.item.truncate"]
    assert [t["audio_end_ms"] for t in truncated] == [0]  # the model knows none was heard
    first = first_media_at(call)
    assert first is not None and first > amd_at(line, sid)
    hang_ups = [p for p in line.fake.posts if p.path.endswith(f"/{sid}.json")
                and p.form.get("Status") == "completed"]
    assert len(hang_ups) == 1 and call.hung_up_by in ("api", "server")
    record = await line.record(sid)
    assert (record["end_kind"], record["answered_by"], record["status"]) == (
        "voicemail", "machine_end_beep", "completed")
    assert metric(line, "voicemail") == 1
    greeting, message = [e for e in record["timeline"] if e["kind"] == "assistant"]
    assert (greeting["interrupted"], greeting["heard_ms"]) == (True, 0)
    # The callee's line heard the message whole (the stand-in says "<kind> of N ms"), and
    # only after it had played did the bridge hang up.
    assert "interrupted" not in message
    assert heard_ms(call) == int(message["text"].split()[-2])


async def test_voicemail_hangup_ends_the_call_at_the_machine_result(
        make_line: MakeLine) -> None:
    line = await make_line()
    line.fake.callees[TO] = Callee("machine", audio=answering_machine(500, 200))
    sid = await line.place(to=TO, greeting="Hi there.", voicemail="hangup")
    call = await line.ended(sid)
    assert heard_ms(call) == 0  # the greeting kept back was never played
    (session,) = sessions(line)
    assert len(creates(session)) == 1  # the greeting made at the webhook, nothing after
    record = await line.record(sid)
    assert (record["end_kind"], record["answered_by"]) == ("machine", "machine_end_beep")
    assert any(p.form.get("Status") == "completed" for p in line.fake.posts)


async def test_a_fax_ends_the_call(make_line: MakeLine) -> None:
    line = await make_line()
    line.fake.callees[TO] = Callee("fax", audio=speech(200), amd_after_s=0.3)
    sid = await line.place(to=TO, voicemail="A message.")
    await line.ended(sid)
    record = await line.record(sid)
    assert (record["end_kind"], record["answered_by"]) == ("machine", "fax")
    assert record["end_reason"] == "a fax machine answered"


async def test_a_machine_result_after_the_assistant_went_on_still_leaves_the_message(
        make_line: MakeLine) -> None:
    """No result within AMD_WAIT_S: the assistant greets; DetectMessageEnd then says machine
    (after the machine's greeting and beep): what plays is cut, the message is left once."""
    line = await make_line(amd_wait_s=0.3, standin=StandinOptions(api_key=API_KEY, pace=1.0,
                                                                  greeting_ms=1500))
    line.fake.callees[TO] = Callee("machine", audio=speech(200), amd_after_s=1.0)
    sid = await line.place(to=TO, greeting="Hello!", voicemail="Call us back.")
    call = await line.ended(sid)
    (session,) = sessions(line)
    said = [e["response"]["instructions"] for e in creates(session)]
    assert len(said) == 2 and "Call us back." in said[1]
    stream = call.streams[0]
    assert stream.counts["clear"] >= 1  # the greeting was still playing: cut
    record = await line.record(sid)
    assert (record["end_kind"], record["answered_by"]) == ("voicemail", "machine_end_beep")


async def test_an_amd_result_before_the_stream_is_kept_for_it(make_line: MakeLine) -> None:
    """The AMD callback races the TwiML request: the result waits for the stream's call."""
    line = await make_line(amd_wait_s=30.0)
    line.fake.callees[TO] = Callee("human", audio=b"", amd_after_s=0.0, hang_up_after_s=1.5)
    sid = await line.place(to=TO, greeting="Good morning.")
    call = await line.ended(sid)
    assert heard_ms(call) == 600  # greeted long before AMD_WAIT_S: the result arrived
    record = await line.record(sid)
    assert record["answered_by"] == "human"


@pytest.mark.parametrize(("answer", "end"), [("busy", "busy"), ("no-answer", "no_answer"),
                                             ("failed", "dial_failed")])
async def test_a_call_that_never_connects_has_a_record_with_its_outcome(
        make_line: MakeLine, answer: str, end: str) -> None:
    line = await make_line(call_webhook_url=None)
    line.fake.callees[TO] = Callee(answer, ring_s=0.2)
    sid = await line.place(to=TO, metadata={"why": "test"})
    await line.ended(sid)
    record = await line.record(sid)
    assert (record["status"], record["end_kind"], record["direction"]) == (answer, end,
                                                                           "outbound")
    assert record["metadata"] == {"why": "test"} and record["stream_sid"] == ""
    assert (record["from"], record["to"]) == (FROM, TO)
    assert sessions(line) == []  # never answered: no model session
    assert await line.rig.app[REGISTRY].state.active() == 0  # its slot released
    assert metric(line, end) == 1


async def test_an_outbound_call_uses_model_api_unless_it_chooses_its_own(
        make_line: MakeLine) -> None:
    """MODEL_API is every plan's default, an outbound call's too: a POST /calls without
    model_api gets GPT-Live here; one that names realtime gets Realtime."""
    line = await make_line(model_api="live")
    state = line.rig.app[REGISTRY].state
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("+15550100021", {}, "live"), ("+15550100022", {"model_api": "realtime"}, "realtime")]
    for number, body, expected in cases:
        line.fake.callees[number] = Callee("no-answer", ring_s=30)  # rings on: plan kept
        sid = await line.place(to=number, **body)
        plan = await state.get_plan(sid)
        assert plan is not None and plan["model_api"] == expected, plan


async def test_post_calls_refusals(make_line: MakeLine) -> None:
    line = await make_line(max_calls=1)
    line.fake.callees["+15550100002"] = Callee("no-answer", ring_s=30)  # rings on
    line.fake.callees["+15550100003"] = Callee(
        "human", rest_error=(400, 21215, "Account not authorized to call +15550100003."))
    (line.rig.settings.do_not_call).write_text("+15550100004\n")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"to": "555-0100"}, 400, "to must start with +"),
        ({"to": TO, "prompt": {"id": "nope"}}, 400, "prompt: "),
        ({"to": TO, "prompt": {"id": "reminders"}}, 400, "needs {{day}}, {{name}}"),
        ({"to": TO, "colour": "red"}, 400, "unknown field 'colour'"),
        ({"to": "+15550100004"}, 409, "do-not-call"),
    ]
    for body, status, reason in cases:
        got, answer = await line.post("/calls", body)
        assert (got, reason in answer["error"]) == (status, True), (body, answer)
    got, answer = await line.post("/calls", {"to": "+15550100003"})
    assert got == 502 and answer["twilio_code"] == 21215 and answer["twilio_status"] == 400
    assert "not authorized" in answer["error"]
    sid = await line.place(to="+15550100002")  # ringing: it holds the one slot

    async def ringing() -> bool:  # its record follows it before any stream: queued, ringing
        status, record = await line.get(f"/calls/{sid}")
        return bool(status == 200 and record["status"] == "ringing"
                    and record["ended_at"] is None)

    await wait_until(ringing, 5.0, "a record saying the call rings")
    got, answer = await line.post("/calls", {"to": TO})
    assert got == 429 and "MAX_CALLS=1" in answer["error"]
    got, answer = await line.post("/calls", {"to": TO}, headers={"Authorization": "Bearer no"})
    assert got == 401
    assert [p.form["To"] for p in line.fake.creates()] == ["+15550100003", "+15550100002"]
    assert sid in line.fake.calls  # Twilio was asked only for the calls that were allowed


async def test_without_twilio_settings_post_calls_says_what_to_set(
        make_line: MakeLine) -> None:
    line = await make_line(twilio_account_sid=None)
    got, answer = await line.post("/calls", {"to": TO})
    assert got == 503
    assert answer["error"] == "outbound calling is not configured: set TWILIO_ACCOUNT_SID"
    got, answer = await line.post("/campaigns", {"name": "x", "calls": [{"to": TO}]})
    assert got == 503 and "TWILIO_ACCOUNT_SID" in answer["error"]


async def test_callbacks_are_signature_checked(make_line: MakeLine) -> None:
    line = await make_line()
    for path in ("/call-status", "/amd-status"):
        resp = await line.rig.bridge.post(path, data={"CallSid": "CA1", "CallStatus": "busy"})
        assert resp.status == 403
    resp = await line.rig.bridge.get("/calls", headers=AUTH)  # GET /calls is the records'
    assert resp.status == 200


async def test_the_cli_places_a_call_and_waits_for_its_end(
        make_line: MakeLine, monkeypatch: pytest.MonkeyPatch) -> None:
    line = await make_line()
    line.fake.callees[TO] = Callee("human", audio=b"", amd_after_s=0.1, hang_up_after_s=1.0)
    line.fake.callees["+15550100009"] = Callee("busy", ring_s=0.1)
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN)
    server = str(line.rig.bridge.make_url("")).rstrip("/")
    printed: list[str] = []
    args = cli.call_parser().parse_args([TO, "--greeting", "Hi {{name}}", "--var", "name=Ann",
                                         "--wait", "--server", server])
    assert await cli.place(args, printed.append) == 0
    assert printed[0].startswith("placed CA") and printed[0].endswith(f"to {TO} (queued)")
    assert printed[1] == ("outcome: completed, answered by human; ended: Twilio stopped the "
                          "stream (call over) [caller_hung_up]")
    assert "Outcome: completed, answered by human" in printed[2]
    assert "Assistant:" in printed[2]  # the transcript: the greeting was said
    (session,) = sessions(line)
    assert "Hi Ann" in creates(session)[0]["response"]["instructions"]
    printed.clear()
    args = cli.call_parser().parse_args(["+15550100009", "--wait", "--server", server])
    assert await cli.place(args, printed.append) == 0
    assert printed[1] == "outcome: busy; ended: the line was busy [busy]"
    args = cli.call_parser().parse_args(["+1555", "--server", server])
    with pytest.raises(cli.Failed, match=r"refused \(HTTP 400\): to has 4 digits"):
        await cli.place(args, printed.append)
    monkeypatch.delenv("ADMIN_TOKEN")
    with pytest.raises(cli.Failed, match="ADMIN_TOKEN is not set"):
        await cli.place(args, printed.append)


def test_python_m_server_call_needs_the_admin_token(tmp_path: Path) -> None:
    """The subcommand is wired: without ADMIN_TOKEN it says so and exits 1."""
    done = subprocess.run([sys.executable, "-m", "server", "call", TO], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "ADMIN_TOKEN is not set" in done.stderr
