"""Faults a review found in the call core, each reproduced and fixed: duplicate streams, bad
tokens, capacity without webhook auth, a handover's slot, repeated warnings, exposure of numbers
in logs, the true response latency, the call time limit, the conversation without records, and
refused calls in the metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSCloseCode

from server.app import LISTENERS, REGISTRY, create_app
from server.call.call import Call
from server.call.ending import Ending
from server.call.events import CallEnded, CallEvent
from server.fleet.state import MemoryState
from server.settings import ConfigError, Settings
from server.testing.dial import TwilioStream, action_form, call_form, dial, post_webhook
from server.testing.inbox import wait_until
from server.testing.standin import next_session
from server.wire.twilio import compute_signature
from tests.conftest import (
    API_KEY,
    AUTH_TOKEN,
    CALLED,
    CALLER,
    PROMPTS,
    SILENCE,
    MakeRig,
    Rig,
    heard,
    loud,
    speak,
)

WAIT = 10.0


class Seen:
    """Every call that ended or was refused, with its ending (a lossless listener, as the
    records and the metrics are)."""

    def __init__(self) -> None:
        self.ended: list[tuple[Call, Ending]] = []
        self.refused: list[tuple[Call, Ending]] = []

    def on_call_event(self, call: Call, event: CallEvent) -> None:
        if isinstance(event, CallEnded) and call.ending is not None:
            (self.refused if event.refused else self.ended).append((call, call.ending))

    async def reasons(self) -> list[str]:
        """Why streams were refused, once one was (its socket closes first)."""
        await wait_until(lambda: bool(self.refused), WAIT, "a refused stream")
        return [c.refusal.reason if c.refusal else "?" for c, _ in self.refused]

    async def endings(self) -> list[Ending]:
        await wait_until(lambda: bool(self.ended), WAIT, "an ended call")
        return [ending for _, ending in self.ended]


def watch(rig: Rig) -> Seen:
    seen = Seen()
    rig.app[LISTENERS].append(seen)
    return seen


async def metric(rig: Rig, name: str, **labels: str) -> float:
    text = await (await rig.bridge.get("/metrics")).text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    found = re.search(r"^" + pattern + "$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def still_relays(stream: TwilioStream, variant: int) -> None:
    """The call answers a turn: its audio comes back (the stand-in echoes it)."""
    before = len(heard(stream))
    await speak(stream, frames=6, variant=variant)
    await wait_until(lambda: loud(variant) in bytes(heard(stream))[before:], WAIT,
                     "the echo of the turn")


# --- one live stream per call ---


async def test_a_second_stream_for_a_live_call_is_refused(rig: Rig) -> None:
    seen = watch(rig)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    # A replayed signed webhook mints a fresh, valid token for the same call...
    url, parameters = await rig.webhook(call.call_sid)
    second = await rig.open_stream(url)
    await second.send_connected()
    await second.send_start(call.call_sid, "MZ" + "9" * 32, parameters)
    # ...but the call already has a live stream: the second one is refused, nothing else.
    await asyncio.wait_for(second.closed.wait(), WAIT)
    assert second.close_code == WSCloseCode.POLICY_VIOLATION
    assert await seen.reasons() == ["duplicate_stream"]
    assert call.stream_sid == call.record.stream_sid != "MZ" + "9" * 32
    await still_relays(stream, 3)
    assert await metric(rig, "bridge_calls_refused_total", reason="duplicate_stream") == 1
    assert seen.ended == []


async def test_a_call_resumed_after_its_stream_ended_is_not_a_duplicate() -> None:
    state = MemoryState()
    assert await state.reserve("CA1", 0, 30)
    assert await state.claim("CA1")
    assert not await state.claim("CA1")  # a second live stream
    await state.release("CA1")
    assert await state.claim("CA1")  # the stream that resumes it (a handover)


# --- stream tokens ---


@pytest.mark.parametrize("token", ["١٢٣٤٥٦٧٨٩٠.nonce.mac", "9" * 5000 + ".nonce.mac",
                                   "1700000000.nonce.mäc"])
async def test_malformed_tokens_are_refused_as_bad_tokens(rig: Rig, token: str) -> None:
    seen = watch(rig)
    call = await dial(rig.bridge.session, str(rig.bridge.make_url("")), auth_token=AUTH_TOKEN,
                      parameters={"caller": CALLER, "called": CALLED, "token": token})
    rig.streams.append(call.stream)
    await asyncio.wait_for(call.stream.closed.wait(), WAIT)
    assert call.stream.close_code == WSCloseCode.POLICY_VIOLATION
    assert await seen.reasons() == ["bad_token"]
    assert [ending.kind for _, ending in seen.refused] == ["rejected"]
    assert await metric(rig, "bridge_calls_refused_total", reason="bad_token") == 1
    assert await metric(rig, "bridge_calls_total", end="internal_error", direction="inbound") == 0


# --- capacity ---


async def test_capacity_holds_without_webhook_authentication(make_rig: MakeRig) -> None:
    rig = await make_rig(twilio_auth_token=None, max_calls=1)
    seen = watch(rig)
    first, _ = await rig.place()
    # A stream no webhook announced (nothing is signed, so nothing stops it being opened).
    stray = await rig.open_stream(str(rig.bridge.make_url("/media-stream")))
    await stray.send_connected()
    await stray.send_start("CA" + "7" * 32, "MZ" + "7" * 32, {})
    await asyncio.wait_for(stray.closed.wait(), WAIT)
    assert stray.close_code == WSCloseCode.POLICY_VIOLATION
    assert await seen.reasons() == ["capacity"]
    await wait_until(lambda: len(rig.live_calls()) == 1, WAIT, "the refused stream gone")
    await still_relays(first, 4)


async def test_a_handover_keeps_the_calls_slot(make_rig: MakeRig) -> None:
    state = MemoryState()
    await state.start()
    public = "http://fleet.example"
    old = await make_rig(state=state, shutdown_mode="handover", public_url=public, max_calls=1)
    new = await make_rig(state=state, public_url=public, max_calls=1)
    http = old.bridge.session
    call_sid = "CA" + "b" * 32

    async def post(rig: Rig, path: str, form: dict[str, str]) -> str:
        signature = compute_signature(AUTH_TOKEN, public + path, form)
        resp = await rig.bridge.post(path, data=form, headers={"X-Twilio-Signature": signature})
        assert resp.status == 200
        return await resp.text()

    twiml = await post_webhook(http, str(old.bridge.make_url("/incoming-call")),
                               call_form(call_sid, CALLER, CALLED), AUTH_TOKEN,
                               sign_url=public + "/incoming-call")
    stream = await old.open_stream(str(old.bridge.make_url("/media-stream")))
    await stream.send_connected()
    await stream.send_start(call_sid, "MZ" + "1" * 32, twiml.parameters)
    await (await next_session(old.standin.app)).wait_for("session.update")
    await old.app[REGISTRY].close_all(grace=WAIT)  # SIGTERM: hand it over
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    # Between the old stream's end and the new one's start, a new caller finds no free slot.
    busy = await post(new, "/incoming-call", call_form("CA" + "c" * 32, "+15550009999", CALLED))
    assert "<Connect" not in busy and "<Say>" in busy
    # The handed-over call itself gets its new stream.
    again = await post(new, "/connect-action", action_form(call_sid, CALLER, CALLED))
    assert "media-stream/resume" in again


# --- logs ---


async def test_repeated_warnings_from_one_call_are_rate_limited(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    for _ in range(10):
        await stream.send_start(call.call_sid, call.stream_sid, {})
        await stream.send_dtmf("X")
    await still_relays(stream, 5)  # every frame before it was read
    await stream.send_stop()
    await asyncio.wait_for(call.finished.wait(), WAIT)
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("ignored a repeated 'start' event") == 3
    assert lines.count("keypad: ignored an unknown key") == 3
    assert "ignored a repeated 'start' event (7 more times)" in lines
    assert "keypad: ignored an unknown key (7 more times)" in lines


async def test_a_rejected_get_webhook_never_logs_the_number(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    resp = await rig.bridge.get("/incoming-call", params={
        "CallSid": "CA" + "d" * 32, "From": "+15557654321", "To": "+15550004444"})
    assert resp.status == 403
    # (aiohttp's access log, which the server turns off, is the test client's own)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    assert "rejected webhook" in text
    assert "7654321" not in text and "0004444" not in text


# --- the true response latency ---


async def paced_turn(stream: TwilioStream, frames: int, silence: int, variant: int) -> float:
    """Speech then silence in real time (a frame every 20 ms, as Twilio sends them); the
    monotonic time the last speech frame was sent."""
    start = time.monotonic()
    last = start
    for n in range(frames + silence):
        delay = start + n * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await stream.send_media(loud(variant) if n < frames else SILENCE)
        if n == frames - 1:
            last = time.monotonic()
    return last


async def test_latency_is_measured_from_the_callers_end_of_speech(make_rig: MakeRig) -> None:
    rig = await make_rig(vad_silence_ms=200)
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    before = len(stream.received)
    stopped = await paced_turn(stream, frames=10, silence=20, variant=6)
    await stream.wait_for("media")
    first = next(t for m, t in zip(stream.received[before:], stream.arrivals[before:],
                                   strict=True) if m["event"] == "media")
    heard_by_caller_ms = (first - stopped) * 1000
    await wait_until(lambda: bool(call.record.latencies_ms), WAIT, "the turn's latency")
    [recorded] = call.record.latencies_ms
    # The VAD's 200 ms of silence is part of what the caller waits: counted.
    assert recorded >= 200
    assert abs(recorded - heard_by_caller_ms) <= 20, (recorded, heard_by_caller_ms)
    count = await metric(rig, "bridge_response_latency_seconds_count")
    total = await metric(rig, "bridge_response_latency_seconds_sum")
    assert count == 1 and abs(total * 1000 - recorded) <= 1


# --- MAX_CALL_SECONDS ---


async def test_a_call_at_its_time_limit_says_goodbye_and_ends(make_rig: MakeRig) -> None:
    rig = await make_rig(max_call_seconds=1.0)
    seen = watch(rig)
    stream, session = await rig.place(marks="immediate")
    goodbye = await session.wait_for("response.create", timeout=WAIT)
    assert "time limit" in goodbye["response"]["instructions"]
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.OK
    assert heard(stream)  # the goodbye was played before the end
    [ending] = await seen.endings()
    assert ending.kind == "time_limit" and ending.decision is not None
    assert ending.decision.action == "hangup"


# --- the conversation, whatever the records configuration ---


async def test_conversation_restored_after_reconnect_without_records(make_rig: MakeRig) -> None:
    rig = await make_rig(database_url="off")
    stream, first = await rig.place()
    (call,) = rig.live_calls()
    await speak(stream, frames=10, variant=1)
    await stream.wait_for("mark", count=2)
    await wait_until(lambda: {"caller", "assistant"} <= {e["kind"] for e in
                                                         call.record.timeline},
                     WAIT, "both turns in the conversation")
    await first.close(code=1011)
    second = await next_session(rig.standin.app)
    user = await second.wait_for("conversation.item.create", count=1)
    assert user["item"]["content"][0]["text"].startswith("caller turn 1")


# --- refused calls in the metrics, and the drain ---


async def test_refusals_are_counted_and_new_streams_get_503_while_draining(
        make_rig: MakeRig) -> None:
    rig = await make_rig(max_calls=1)
    await rig.place()
    with pytest.raises(ValueError, match="no <Connect><Stream>"):
        await dial(rig.bridge.session, str(rig.bridge.make_url("")), auth_token=AUTH_TOKEN)
    assert await metric(rig, "bridge_calls_refused_total", reason="capacity") == 1
    rig.app[REGISTRY].draining = True
    assert (await rig.bridge.get("/readyz")).status == 503
    assert (await rig.bridge.get("/healthz")).status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await rig.bridge.session.ws_connect(rig.bridge.make_url("/media-stream"))
    assert refused.value.status == 503
    assert await metric(rig, "bridge_calls_refused_total", reason="draining") == 1
    # A handed-over call's stream is not a new call: still taken.
    ws = await rig.bridge.session.ws_connect(rig.bridge.make_url("/media-stream/resume"))
    await ws.close()


async def test_hang_up_route_answers_json_errors(make_rig: MakeRig) -> None:
    rig = await make_rig(admin_token="admin-token-0123456789")
    resp = await rig.bridge.post("/calls/CA404/hangup")
    assert resp.status == 401 and "error" in await resp.json()
    resp = await rig.bridge.post("/calls/CA404/hangup",
                                 headers={"Authorization": "Bearer admin-token-0123456789"})
    assert resp.status == 404 and "no live call" in (await resp.json())["error"]


# --- startup checks ---


def test_recordings_dir_must_be_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = Settings(openai_api_key=API_KEY, prompts_dir=PROMPTS, record_calls=True,
                        recordings_dir=blocker / "recordings",
                        database_url=f"sqlite:///{tmp_path}/calls.db")
    with pytest.raises(ConfigError, match=r"^RECORDINGS_DIR: .* is not a writable directory"):
        create_app(settings)
    create_app(Settings(openai_api_key=API_KEY, prompts_dir=PROMPTS, record_calls=True,
                        recordings_dir=tmp_path / "fine",
                        database_url=f"sqlite:///{tmp_path}/calls.db"))
    assert (tmp_path / "fine").is_dir()


def test_transcription_model_off_turns_transcription_off() -> None:
    for value in ("off", "OFF", ""):
        settings = Settings.from_env({"OPENAI_API_KEY": "k", "TRANSCRIPTION_MODEL": value})
        assert settings.transcription_model is None

