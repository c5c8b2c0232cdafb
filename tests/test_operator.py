"""An operator's powers on a real call (stand-in + Twilio stream over loopback, the console's
routes with a bearer token): whisper, take over with the operator's audio mixed into the
model's input and the turns attributed, hand back, the talk socket dropping, one operator at a
time, listen-in (a slow listener never slows the call), transfer and hang-up."""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from typing import Any

import aiohttp
import pytest

from server.app import STATE
from server.call.call import Call
from server.call.conversation import CallerTurn, OperatorTurn, Whisper
from server.call.features.operator import (
    SAY_IT_NOW,
    Activity,
    Mixer,
    OperatorCall,
    OperatorFeature,
    mix,
    ulaw_linear,
    voiced,
)
from server.console.live import ListenTap
from server.models.live import HANDED_BACK, TAKEN_OVER
from server.testing.audio import tone
from server.testing.inbox import wait_until
from server.testing.standin import next_session
from tests.conftest import LIVE_OPTIONS, SILENCE, MakeRig, Rig, loud, speak

ADMIN = "admin-token-0123456789abcdef"
ANN = "ann-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"
WAIT = 10.0
TARGETS = (("sales", "+15550100001"), ("support", "sip:desk@example.com"))
OPERATOR_VOICE = tone(20, 1000.0, 9000)  # one 20 ms frame of the operator's microphone


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def console_rig(make_rig: MakeRig, **overrides: Any) -> Rig:
    return await make_rig(admin_token=ADMIN, operator_tokens=(("ann", ANN), ("bob", BOB)),
                          transfer_targets=TARGETS, **overrides)


def operator_call(call: Call) -> OperatorCall:
    """(mypy checks here that a `Call` is what the operator feature needs.)"""
    return call


def feature_of(rig: Rig) -> OperatorFeature:
    (call,) = rig.live_calls()
    feature = call.feature(OperatorFeature)
    assert feature is not None
    return feature


async def post(rig: Rig, path: str, token: str = ANN, body: Any = None) -> tuple[int, Any]:
    async with rig.bridge.post(path, headers=bearer(token), json=body) as response:
        return response.status, await response.json()


def appended(session: Any, since: int = 0) -> list[bytes]:
    """The caller audio the model got, frame by frame, from client event `since` on."""
    return [base64.b64decode(e["audio"]) for e in session.received[since:]
            if e.get("type") == "input_audio_buffer.append"]


# --- mixing and who spoke: the arithmetic ---


def test_mixing_adds_the_two_voices_and_silence_changes_nothing() -> None:
    caller, operator = tone(20, 300.0, 6000), OPERATOR_VOICE
    assert mix(caller, b"\xff" * 160) == caller  # mu-law silence is zero: nothing added
    mixed = mix(caller, operator)
    for c, o, m in zip(caller, operator, mixed, strict=True):
        expected = max(-32768, min(32767, ulaw_linear(c) + ulaw_linear(o)))
        assert abs(ulaw_linear(m) - expected) <= max(64, abs(expected) // 16)  # one mu-law step
    assert mix(caller, operator[:80]) [80:] == caller[80:]  # a short operator frame: the rest
    assert voiced(OPERATOR_VOICE) and voiced(loud()) and not voiced(SILENCE)


def test_the_mixer_paces_the_operator_on_the_callers_frames_and_notes_who_spoke() -> None:
    activity = Activity()
    frame = iter(range(100, 200))
    mixer = Mixer(activity, lambda: next(frame), limit=480)
    for _ in range(4):  # 80 ms of the operator, more than the buffer holds: the oldest goes
        mixer.add(OPERATOR_VOICE)
    assert mixer.dropped == 160
    silent = base64.b64encode(SILENCE).decode()
    out = [mixer.mix(silent) for _ in range(4)]
    assert [base64.b64decode(o) for o in out[:3]] == [mix(SILENCE, OPERATOR_VOICE)] * 3
    assert out[3] == silent  # nothing left to mix: the caller's frame passes as it came
    mixer.mix(base64.b64encode(loud()).decode())  # the caller speaks alone
    assert activity.count(100, 105) == (1, 3, 5)  # (caller, operator, frames known)
    assert activity.count(0, 100) == (0, 0, 0)
    assert mixer.mix("not base64!") == "not base64!"


# --- whisper ---


async def test_whisper_reaches_the_model_as_a_system_message(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    events = call.subscribe(replay=False)
    sent = time.monotonic()
    status, body = await post(rig, f"/calls/{call.call_sid}/whisper",
                              body={"text": "Offer the 10 % discount", "respond": False})
    assert status == 202, body
    item = await session.wait_for("conversation.item.create")
    delays = [(time.monotonic() - sent) * 1000]
    assert item["item"]["role"] == "system"
    assert item["item"]["content"] == [{"type": "input_text", "text": "Offer the 10 % discount"}]
    assert not any(e.get("type") == "response.create" for e in session.received)
    entry = call.conversation.entries[-1]
    assert isinstance(entry, Whisper) and (entry.operator, entry.text) == (
        "ann", "Offer the 10 % discount")
    assert [(a["operator"], a["action"]) for a in call.record.operator_actions] == [
        ("ann", "whisper")]
    event = await anext(aiter(events))
    assert (event["type"], event["operator"], event["respond"]) == ("whisper", "ann", False)
    for n in range(2, 21):  # how long a whisper takes to reach the model
        sent = time.monotonic()
        await post(rig, f"/calls/{call.call_sid}/whisper", body={"text": f"note {n}"})
        await session.wait_for("conversation.item.create", count=n)
        delays.append((time.monotonic() - sent) * 1000)
    print(f"whisper, the POST to the model's system message: median "
          f"{statistics.median(delays):.1f} ms, max {max(delays):.1f} ms (n={len(delays)})")
    # "Say it now": the model is asked to respond, through the gate.
    status, _ = await post(rig, f"/calls/{call.call_sid}/whisper",
                           body={"text": "Say the store closes at six", "respond": True})
    assert status == 202
    await session.wait_for("response.create")
    await stream.wait_for("media")  # the stand-in answers
    # Bad whispers: 400, nothing sent.
    for bad in ({"text": ""}, {"text": 5}, {"text": "x", "respond": "yes"}, ["x"]):
        status, body = await post(rig, f"/calls/{call.call_sid}/whisper", body=bad)
        assert status == 400 and "error" in body, bad
    assert len([e for e in session.received if e.get("type") == "conversation.item.create"]) \
        == 21


# --- take over, talk, hand back ---


async def talk_socket(rig: Rig, sid: str, token: str = ANN) -> aiohttp.ClientWebSocketResponse:
    return await rig.bridge.ws_connect(f"/calls/{sid}/talk", headers=bearer(token))


async def say_as_operator(ws: aiohttp.ClientWebSocketResponse, frames: list[bytes]) -> None:
    for frame in frames:
        await ws.send_json({"event": "media", "media": {"payload": base64.b64encode(frame)
                                                        .decode()}})


async def test_take_over_mixes_the_operator_in_attributes_turns_and_hands_back(
        make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    sid = call.call_sid
    feature = feature_of(rig)
    events = call.subscribe(replay=False)
    await speak(stream, frames=10, variant=1)  # the assistant answers, as usual
    await stream.wait_for("media")
    await wait_until(lambda: call.playback.idle is False, WAIT, "the reply playing")

    clears = stream.counts["clear"]
    status, body = await post(rig, f"/calls/{sid}/takeover")
    assert (status, body["taken_over_by"]) == (202, "ann")
    await wait_until(lambda: stream.counts["clear"] > clears, WAIT, "the reply cleared")
    assert call.playback.muted and call.gate.held
    update = await session.wait_for("session.update", count=2)  # listen only
    detection = update["session"]["audio"]["input"]["turn_detection"]
    assert detection["create_response"] is False and detection["interrupt_response"] is False
    # One operator at a time; talking needs the call.
    status, body = await post(rig, f"/calls/{sid}/takeover", token=BOB)
    assert (status, body["operator"]) == (409, "ann")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await talk_socket(rig, sid, BOB)
    assert refused.value.status == 409

    # Bob listens in, and so does ann (who has the call).
    listeners = {name: await rig.bridge.ws_connect(f"/calls/{sid}/listen", headers=bearer(token))
                 for name, token in (("bob", BOB), ("ann", ANN))}
    await wait_until(lambda: len(call.audio_listeners) == 2, WAIT, "the listeners")
    ws = await talk_socket(rig, sid)
    heard_before = len([m for m in stream.received if m.get("event") == "media"])
    voice = [tone(20, 1000.0, 9000 - n) for n in range(10)]  # ten distinct operator frames
    await say_as_operator(ws, voice)
    await wait_until(lambda: feature.control is not None and feature.control.frames == 10, WAIT,
                     "the operator's frames")
    # The caller hears the operator, frame for frame; the model's audio is not played.
    played = [base64.b64decode(m["media"]["payload"]) for m in stream.received
              if m.get("event") == "media"][heard_before:]
    assert played == voice
    # The model hears both: the caller's next frames carry the operator's voice mixed in.
    start = len(session.received)
    for _ in range(18):  # the caller is silent: the operator's words make the turn
        await stream.send_media(SILENCE)
    await wait_until(lambda: any(isinstance(e, OperatorTurn) for e in call.conversation),
                     WAIT, "the operator's turn")
    assert appended(session, start)[:10] == [mix(SILENCE, v) for v in voice]
    operator_turn = next(e for e in call.conversation if isinstance(e, OperatorTurn))
    assert operator_turn.operator == "ann" and operator_turn.text.startswith("caller turn 2")
    # Bob hears what the caller hears; ann is not played her own voice back.
    await stream.send_media(loud(9))  # a caller frame after the operator's: the end
    for name, listener in listeners.items():
        outbound = []
        while True:
            message = await asyncio.wait_for(listener.receive_json(), WAIT)
            if message["media"]["track"] == "outbound":
                outbound.append(base64.b64decode(message["media"]["payload"]))
            elif base64.b64decode(message["media"]["payload"]) == loud(9):
                break
        assert outbound == (voice if name == "bob" else []), name
        await listener.close()
    # Then the caller speaks alone: a caller turn, and still no answer from the model.
    await speak(stream, frames=10, variant=2)
    await wait_until(lambda: sum(isinstance(e, CallerTurn) for e in call.conversation) == 2,
                     WAIT, "the caller's turn")
    assert not any(e.get("type") == "response.create" for e in session.received)
    assert len([m for m in stream.received if m.get("event") == "media"]) == heard_before + 10

    status, _ = await post(rig, f"/calls/{sid}/handback")
    assert status == 202
    await asyncio.wait_for(ws.receive(), WAIT)  # the talk socket is closed by the hand-back
    assert ws.closed
    update = await session.wait_for("session.update", count=3)
    assert update["session"]["audio"]["input"]["turn_detection"].get(
        "create_response", True) is True
    note = [e for e in session.received if e.get("type") == "conversation.item.create"][-1]
    text = note["item"]["content"][0]["text"]
    assert note["item"]["role"] == "system" and "operator" in text
    assert operator_turn.text in text  # the model is told which turns were the operator's
    assert (call.playback.muted, call.gate.held) == (False, False)
    # The assistant has the call again: the caller's next turn is answered and heard.
    before = len([m for m in stream.received if m.get("event") == "media"])
    await speak(stream, frames=10, variant=3)
    await stream.wait_for("media", count=before + 1)
    assert [(a["operator"], a["action"]) for a in call.record.operator_actions] == [
        ("ann", "takeover"), ("bob", "listen"), ("ann", "listen"), ("ann", "handback")]
    seen: list[dict[str, Any]] = []
    async for event in events:
        seen.append(event)
        if event["type"] == "handback":
            break
    transcripts = [(e["role"], e.get("operator")) for e in seen
                   if e["type"] == "transcript" and e["final"]]
    assert ("operator", "ann") in transcripts and ("caller", None) in transcripts
    assert [e["type"] for e in seen if e["type"] in ("takeover", "handback")] == [
        "takeover", "handback"]
    status, _ = await post(rig, f"/calls/{sid}/handback")
    assert status == 409  # nothing to hand back


async def test_a_dropped_talk_socket_hands_the_call_back(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, _session = await rig.place()
    (call,) = rig.live_calls()
    feature = feature_of(rig)
    feature.talk_grace, feature.connect_grace = 0.3, 0.6
    # Nobody ever talks: handed back after the connect grace.
    assert (await post(rig, f"/calls/{call.call_sid}/takeover"))[0] == 202
    await wait_until(lambda: feature.control is None, WAIT, "the hand-back")
    assert call.record.operator_actions[-1]["detail"] == "no audio from the operator's microphone"
    # The talk socket drops mid-sentence: handed back after the talk grace.
    assert (await post(rig, f"/calls/{call.call_sid}/takeover", token=BOB))[0] == 202
    ws = await talk_socket(rig, call.call_sid, BOB)
    await say_as_operator(ws, [OPERATOR_VOICE] * 3)
    await wait_until(lambda: feature.control is not None and feature.control.frames == 3, WAIT,
                     "the operator's audio")
    dropped = time.monotonic()
    await ws.close()
    await wait_until(lambda: feature.control is None, WAIT, "the hand-back")
    assert time.monotonic() - dropped >= 0.25
    assert [(a["operator"], a["action"], a["detail"]) for a in call.record.operator_actions][-1] \
        == ("bob", "handback", "the operator's audio connection dropped")
    assert (call.playback.muted, call.gate.held) == (False, False)
    await speak(stream, frames=10, variant=4)  # the assistant answers again
    await stream.wait_for("media")


async def test_a_new_model_session_while_taken_over_listens_only_too(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    assert operator_call(call).audio_listeners == []
    assert (await post(rig, f"/calls/{call.call_sid}/takeover"))[0] == 202
    await session.wait_for("session.update", count=2)
    await session.close(1011)  # the model's socket drops mid take-over
    replacement = await next_session(rig.standin.app)
    update = await replacement.wait_for("session.update", count=2)
    detection = update["session"]["audio"]["input"]["turn_detection"]
    assert detection["create_response"] is False
    # The caller speaks: the new session answers nothing, the caller hears nothing of it.
    media = stream.counts["media"]
    await speak(stream, frames=10, variant=7)
    await wait_until(lambda: any(e.get("type") == "input_audio_buffer.append"
                                 for e in replacement.received), WAIT, "audio to the new session")
    assert (await post(rig, f"/calls/{call.call_sid}/handback"))[0] == 202
    await replacement.wait_for("session.update", count=3)
    assert stream.counts["media"] == media
    assert not any(e.get("type") == "response.create" for e in replacement.received)


async def test_bad_talk_messages_close_the_socket_not_the_call(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    _stream, _ = await rig.place()
    (call,) = rig.live_calls()
    assert (await post(rig, f"/calls/{call.call_sid}/takeover"))[0] == 202
    for bad, code in (('{"event":"media","media":{"payload":"@@@"}}', 1007),
                      ("not json", 1007), (b"\x00binary", 1003),
                      ('{"event":"media","media":{"payload":"' + "A" * 4000 + '"}}', 1007)):
        ws = await talk_socket(rig, call.call_sid)
        await (ws.send_bytes(bad) if isinstance(bad, bytes) else ws.send_str(bad))
        await ws.receive()
        assert ws.close_code == code, bad
    assert call.ending is None and feature_of(rig).taken_over_by == "ann"


# --- listen in ---


async def test_listen_in_gets_both_tracks_and_the_clear(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    ws = await rig.bridge.ws_connect(f"/calls/{call.call_sid}/listen", headers=bearer(BOB))
    await wait_until(lambda: len(call.audio_listeners) == 1, WAIT, "the listener")
    spoken = await speak(stream, frames=10, variant=5)
    reply = await stream.wait_for("media")
    got: list[dict[str, Any]] = []
    while not any(m["event"] == "media" and m["media"]["track"] == "outbound" for m in got):
        got.append(await asyncio.wait_for(ws.receive_json(), WAIT))
    inbound = [m["media"]["payload"] for m in got if m["media"]["track"] == "inbound"]
    assert base64.b64decode(inbound[0]) == spoken and len(inbound) >= 10
    outbound = next(m for m in got if m["media"]["track"] == "outbound")
    assert outbound == {"event": "media", "media": {"track": "outbound",
                                                    "payload": reply["media"]["payload"]}}
    # A barge-in: the caller talks over the reply; the listener gets the clear.
    await speak(stream, frames=10, variant=6)
    while (await asyncio.wait_for(ws.receive_json(), WAIT))["event"] != "clear":
        pass
    assert [(a["operator"], a["action"]) for a in call.record.operator_actions] == [
        ("bob", "listen")]
    await ws.close()
    await wait_until(lambda: not call.audio_listeners, WAIT, "the listener gone")
    # The call ends: a listener's socket is closed with 1000.
    ws = await rig.bridge.ws_connect(f"/calls/{call.call_sid}/listen", headers=bearer(BOB))
    await stream.send_stop()
    while not ws.closed:
        await asyncio.wait_for(ws.receive(), WAIT)
    assert ws.close_code == 1000


def test_a_listen_tap_is_bounded_and_drops_the_oldest() -> None:
    tap = ListenTap(size=5)
    for n in range(8):
        tap.on_caller_audio(f"frame{n}")
    assert tap.dropped == 3
    tap.on_assistant_audio("reply")
    tap.on_clear()  # queued assistant audio is gone: the caller will not hear it
    messages = tap.take()
    assert [m for m in messages if "reply" in m] == []
    assert messages[-1] == '{"event":"clear"}' and "frame7" in messages[-2]
    assert tap.take() == []


async def test_a_listener_that_never_reads_never_slows_the_call(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    feature = feature_of(rig)
    stuck = ListenTap(size=20)
    feature.add_listener(stuck)  # nobody takes from it, as a socket that never drains
    for turn in range(3):
        before = stream.counts["media"]
        await speak(stream, frames=10, variant=turn)
        await stream.wait_for("media", count=before + 1)
    assert stuck.dropped > 0 and len(stuck.take()) == 20
    assert call.ending is None


# --- transfer, hang up ---


async def test_an_operator_transfers_the_call(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    status, body = await post(rig, f"/calls/{call.call_sid}/transfer", body={"target": "nope"})
    assert status == 400 and "sales" in body["error"]
    status, _ = await post(rig, f"/calls/{call.call_sid}/transfer", token=BOB,
                           body={"target": "support"})
    assert status == 202
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    decision = await rig.app[STATE].get_decision(call.call_sid, wait=WAIT)
    assert decision is not None
    assert (decision["action"], decision["target"]) == ("dial", "sip:desk@example.com")
    assert call.ending is not None and call.ending.kind == "transferred"
    assert call.ending.reason == "transferred to support by operator bob"
    assert [(a["operator"], a["action"], a["detail"]) for a in call.record.operator_actions] \
        == [("bob", "transfer", "support")]
    status, _ = await post(rig, f"/calls/{call.call_sid}/hangup")
    assert status == 404  # ended


async def test_an_operator_hangs_up_and_it_is_recorded(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    status, _ = await post(rig, f"/calls/{call.call_sid}/hangup")
    assert status == 202
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert call.ending is not None and call.ending.kind == "admin_hung_up"
    assert call.ending.reason == "operator ann hung up the call"
    assert [(a["operator"], a["action"]) for a in call.record.operator_actions] == [
        ("ann", "hangup")]


# --- the same powers on GPT-Live (through the ModelSession interface) ---


async def test_on_gpt_live_whisper_take_over_and_hand_back(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig, model_api="live", standin=LIVE_OPTIONS)
    stream, session, line = await rig.place_live()
    (call,) = rig.live_calls()
    sid = call.call_sid
    # A whisper is an instruction; "say it now" asks the model to act in words (it decides
    # its own turns: there is no response to create).
    assert (await post(rig, f"/calls/{sid}/whisper",
                       body={"text": "Offer the 10 % discount", "respond": True}))[0] == 202
    whisper = await session.wait_for("session.instructions.append")
    assert whisper["content"] == "Offer the 10 % discount"
    now = await session.wait_for("session.instructions.append", count=2)
    assert now["content"] == SAY_IT_NOW
    # Taken over: the model is told to listen only, and its audio (it talks all the time)
    # stops reaching the caller; the operator's does.
    await line.say(frames=10, variant=1)
    await wait_until(lambda: stream.counts["media"] > 0, WAIT, "the model's audio")
    assert (await post(rig, f"/calls/{sid}/takeover"))[0] == 202
    told = await session.wait_for("session.instructions.append", count=3)
    assert told["content"] == TAKEN_OVER
    media = stream.counts["media"]
    ws = await talk_socket(rig, sid)
    voice = [tone(20, 1000.0, 9000 - n) for n in range(20)]
    await say_as_operator(ws, voice)
    await line.say(frames=10, variant=2)  # the model answers the caller: nobody hears it
    await stream.wait_for("media", count=media + 20)
    feature = feature_of(rig)
    await wait_until(lambda: call.record.frames_in > 0 and feature.control is not None
                     and feature.control.frames == 20, WAIT, "the operator's frames")
    assert [base64.b64decode(m["media"]["payload"]) for m in stream.received
            if m.get("event") == "media"][media:] == voice
    # The model hears the operator mixed into the caller's line.
    def mixed_in() -> int:
        appended = {base64.b64decode(e["audio"]) for e in session.received
                    if e.get("type") == "session.input_audio.append"}
        return sum(any(mix(caller, v) in appended for caller in (SILENCE, loud(2)))
                   for v in voice)

    await wait_until(lambda: mixed_in() == 20, WAIT, "the operator's voice at the model")
    # Handed back: the model is told, and is heard again.
    assert (await post(rig, f"/calls/{sid}/handback"))[0] == 202
    back = await session.wait_for("session.instructions.append", count=4)
    assert back["content"] == HANDED_BACK
    note = await session.wait_for("session.instructions.append", count=5)
    assert "operator" in note["content"]
    heard_back = stream.counts["media"]
    await line.say(frames=10, variant=3)
    await stream.wait_for("media", count=heard_back + 1)
    await line.close()
