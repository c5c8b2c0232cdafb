"""Deploys do not drop calls: SHUTDOWN_MODE=handover moves a live call to another instance."""

from __future__ import annotations

import asyncio

from aiohttp import WSCloseCode

from server.app import REGISTRY
from server.call.call import Call
from server.fleet.state import MemoryState
from server.testing.dial import TwilioStream, call_form
from server.testing.inbox import wait_until
from server.testing.standin import next_session
from server.testing.twiml import Twiml, parse_twiml
from server.wire.twilio import compute_signature
from tests.conftest import AUTH_TOKEN, MakeRig, Rig, heard, loud, speak

WAIT = 10.0


async def until_transcribed(call: Call) -> None:
    await wait_until(lambda: {"caller", "assistant"} <= {e["kind"] for e in call.record.timeline},
                     WAIT, "both turns transcribed")


async def signed_post(rig: Rig, public: str, path: str, form: dict[str, str]) -> Twiml:
    """What Twilio sends through the load balancer: signed for the public URL."""
    signature = compute_signature(AUTH_TOKEN, public + path, form)
    resp = await rig.bridge.post(path, data=form, headers={"X-Twilio-Signature": signature})
    assert resp.status == 200, await resp.text()
    return parse_twiml(await resp.text())


async def test_handover_moves_a_live_call_to_another_instance(make_rig: MakeRig) -> None:
    state = MemoryState()  # what Redis is to a fleet: both instances read and write it
    await state.start()
    public = "http://fleet.example"  # both sit behind one public URL (a load balancer)
    old = await make_rig(state=state, shutdown_mode="handover", public_url=public)
    new = await make_rig(state=state, public_url=public)
    http = old.bridge.session
    call_sid = "CA" + "a" * 32

    # The call starts on the old instance and one turn is spoken and answered.
    form = call_form(call_sid, "+15550001111", "+15550002222")
    twiml = await signed_post(old, public, "/incoming-call", form)
    stream = await TwilioStream.connect(http, str(old.bridge.make_url("/media-stream")))
    old.streams.append(stream)
    await stream.send_connected()
    await stream.send_start(call_sid, "MZ" + "1" * 32, twiml.parameters)
    first = await next_session(old.standin.app)
    await first.wait_for("session.update")
    (call,) = old.live_calls()
    await speak(stream, frames=10, variant=1)
    await stream.wait_for("mark", count=2)
    await until_transcribed(call)

    # SIGTERM on the old instance: the call is handed over, not dropped.
    await old.app[REGISTRY].close_all(grace=WAIT)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.OK
    assert call.ending is not None and call.ending.kind == "handover"

    # Twilio asks <Connect action> what next; the load balancer sends it to the new instance,
    # whose answer is a new stream (with a fresh token) to the public URL.
    again = await signed_post(new, public, "/connect-action",
                              {**form, "CallStatus": "in-progress"})
    assert again.stream_url == "ws://fleet.example/media-stream/resume"
    assert again.parameters["resume"] == "1"
    assert again.parameters["token"] != twiml.parameters["token"]

    resumed = await TwilioStream.connect(http, str(new.bridge.make_url("/media-stream/resume")))
    new.streams.append(resumed)
    await resumed.send_connected()
    await resumed.send_start(call_sid, "MZ" + "2" * 32, again.parameters)
    second = await next_session(new.standin.app)
    await second.wait_for("session.update")
    # The new session knows what was said on the old instance.
    said = await second.wait_for("conversation.item.create", count=1)
    assert said["item"]["content"][0]["text"].startswith("caller turn 1")
    await second.wait_for("conversation.item.create", count=2)
    await speak(resumed, frames=6, variant=4)
    await resumed.wait_for("mark", count=1)
    assert loud(4) in heard(resumed)
    (moved,) = new.live_calls()
    assert moved.record.timeline[0]["kind"] == "caller"  # the record continues
    assert moved.record.to_dict()["started_at"] == call.record.to_dict()["started_at"]
    assert [s.get("ended_because") for s in moved.record.sessions] == [
        "handed over to another instance", None]
    await resumed.send_stop()
    await asyncio.wait_for(resumed.closed.wait(), WAIT)
    await state.close()
