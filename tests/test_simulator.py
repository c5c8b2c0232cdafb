"""The call simulator against a real bridge with signatures on, and its failure reports."""

from __future__ import annotations

import asyncio
import base64
import sys
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.app import REGISTRY
from server.fleet.state import MemoryState
from server.testing import audio
from server.testing.inbox import Inbox, wait_until
from server.testing.simulator import TwilioStream, balancer, place_call, rebase, sample_wav
from server.testing.standin import STANDIN_SESSIONS, StandinOptions, tool_call
from server.testing.twiml import parse_twiml
from server.wire import twilio as tw
from tests.conftest import API_KEY, AUTH_TOKEN, MakeRig, Rig

REPLY_MS = 600  # the stand-in's reply="tone" answer to a caller turn


def short_wav(path: Path) -> Path:
    """0.3 s of a loud tone: a quick caller turn."""
    pcm = audio.ulaw_decode(audio.tone(300, 300.0, 12000))
    audio.write_wav(path, pcm)
    return path


async def test_call_with_barge_in(make_rig: MakeRig, tmp_path: Path) -> None:
    # The stand-in answers every turn with a 600 ms tone; the caller talks over the first
    # reply once 100 ms of it has played.
    rig = await make_rig(StandinOptions(api_key=API_KEY, reply="tone"))
    lines: list[str] = []
    base = str(rig.bridge.make_url("")).rstrip("/")
    result = await place_call(base, wav=short_wav(tmp_path / "say.wav"), turns=1,
                              barge_in_ms=100, out=tmp_path / "heard.wav",
                              auth_token=AUTH_TOKEN, settle=0.2, echo=lines.append)
    assert result.ok, result
    assert result.clears == 1
    assert len(result.latencies_ms) == 2  # the reply, and the reply to the interruption
    assert any("barge-in handled" in line for line in lines)
    assert any("caller hung up" in line for line in lines)
    assert result.marks_echoed > 0
    with wave.open(str(tmp_path / "heard.wav")) as heard:
        assert heard.getframerate() == 8000
        assert heard.getnframes() // 8 == result.heard_ms
    # Heard: at least 100 ms of the first reply (the barge-in waits for that much), then all
    # of the second; and not all of the first, which `clear` cut short. Without the cut it
    # would be 1200 ms: the bound leaves the clear 500 ms to arrive, however loaded the box.
    assert 100 + REPLY_MS <= result.heard_ms < 2 * REPLY_MS


async def test_wrong_token_fails_clearly(rig: Rig, tmp_path: Path) -> None:
    base = str(rig.bridge.make_url("")).rstrip("/")
    lines: list[str] = []
    result = await place_call(base, wav=short_wav(tmp_path / "say.wav"), auth_token="wrong",
                              echo=lines.append)
    assert not result.ok
    assert "webhook answered HTTP 403" in result.error
    assert lines[-1].endswith(result.error)


async def test_cli_exits_non_zero_when_the_call_fails(unused_tcp_port: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.testing.simulator", "--url", f"http://127.0.0.1:{unused_tcp_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"call failed" in output


def test_sample_is_a_short_phone_wav() -> None:
    with wave.open(str(sample_wav())) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert 1.0 < w.getnframes() / 8000 < 5.0
    assert sample_wav().stat().st_size < 64 * 1024


async def test_playback_marks_and_clear_as_twilio_does(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> None:
    """Marks come back once their audio has played; `clear` echoes every pending mark at once
    and drops the unplayed audio."""
    echoes: asyncio.Queue[tuple[str, int]] = asyncio.Queue()  # (mark, bytes played by then)
    opened: asyncio.Queue[web.WebSocketResponse] = asyncio.Queue()
    streams: list[TwilioStream] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        opened.put_nowait(ws)
        async for msg in ws:
            event = orjson.loads(msg.data)
            if event["event"] == "mark":
                echoes.put_nowait((event["mark"]["name"], len(streams[0].heard)))
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    client = await aiohttp_client(app)
    stream = await TwilioStream.connect(client.session, str(client.make_url("/ws")),
                                        marks="playback")
    streams.append(stream)
    await stream.send_connected()
    ws = await asyncio.wait_for(opened.get(), 5)

    async def send(message: dict[str, object]) -> None:
        await ws.send_str(orjson.dumps(message).decode())

    def media(ms: int) -> dict[str, object]:
        return {"event": "media", "streamSid": "MZ1",
                "media": {"payload": base64.b64encode(b"\x01" * (ms * 8)).decode()}}

    await send(media(60))
    await send({"event": "mark", "streamSid": "MZ1", "mark": {"name": "a"}})
    name, played = await asyncio.wait_for(echoes.get(), 5)
    assert name == "a" and played == 60 * 8  # echoed once its 60 ms of audio had played
    await send(media(5000))
    await send({"event": "mark", "streamSid": "MZ1", "mark": {"name": "b"}})
    await send(media(5000))
    await send({"event": "mark", "streamSid": "MZ1", "mark": {"name": "c"}})
    await send({"event": "clear", "streamSid": "MZ1"})
    assert [(await asyncio.wait_for(echoes.get(), 5))[0] for _ in range(2)] == ["b", "c"]
    assert len(stream.heard) < 60 * 8 + 5000 * 8  # the cleared audio was never played
    assert not stream.playing
    await ws.send_bytes(b"\x00")
    await send({"event": "media", "streamSid": "MZ1", "media": {"payload": "", "x": 1}})
    await stream.wait_for("media", count=4)
    assert stream.violations == ["BINARY frame", stream.violations[1]]
    assert "31951" in stream.violations[1]
    await stream.close()


def test_twiml_parser() -> None:
    twiml = parse_twiml(
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect action="/after" method="POST">'
        '<Stream url="wss://h/media-stream"><Parameter name="token" value="t&amp;&lt;" />'
        '</Stream></Connect><Say>Sorry.</Say></Response>')
    assert (twiml.stream_url, twiml.parameters, twiml.action, twiml.say, twiml.hangs_up) == (
        "wss://h/media-stream", {"token": "t&<"}, "/after", "Sorry.", False)
    busy = parse_twiml("<Response><Say>All lines are busy.</Say><Hangup/></Response>")
    assert (busy.stream_url, busy.action, busy.say, busy.hangs_up) == (
        None, None, "All lines are busy.", True)
    for bad in ("not xml", "<Other/>"):
        with pytest.raises(ValueError):
            parse_twiml(bad)


# --- keys, <Connect action>, handover ---

SPEECH = audio.tone(300, 300.0, 12000)  # a quick, loud caller turn (mu-law)


def base_of(rig: Rig) -> str:
    return str(rig.bridge.make_url("")).rstrip("/")


def user_texts(rig: Rig) -> list[str]:
    return [str(e["item"]["content"][0].get("text"))
            for s in rig.standin.app[STANDIN_SESSIONS] for e in s.received
            if e.get("type") == "conversation.item.create" and e["item"].get("role") == "user"]


@pytest.mark.parametrize("at_turn", [0, 1])
async def test_keys_reach_the_bridge_as_dtmf(make_rig: MakeRig, at_turn: int) -> None:
    rig = await make_rig(StandinOptions(api_key=API_KEY, reply="tone"))
    lines: list[str] = []
    result = await place_call(base_of(rig), speech=SPEECH, turns=1, keys="1234#",
                              keys_at_turn=at_turn, auth_token=AUTH_TOKEN, settle=0.2,
                              echo=lines.append)
    assert result.ok, result
    assert result.keys == "1234#"
    assert result.keys_reply_ms is not None  # the assistant answered the keypad entry
    assert user_texts(rig) == ["The caller typed 1 2 3 4 on the keypad."]
    pressed = next(i for i, line in enumerate(lines) if "caller presses 1 2 3 4 #" in line)
    spoke = next(i for i, line in enumerate(lines) if "caller speaks (turn 1" in line)
    assert (pressed < spoke) == (at_turn == 0)


async def test_end_call_is_followed_to_a_hang_up(make_rig: MakeRig) -> None:
    rig = await make_rig(StandinOptions(api_key=API_KEY,
                                        tool_calls={1: tool_call("end_call", say_ms=200)}))
    lines: list[str] = []
    result = await place_call(base_of(rig), speech=SPEECH, turns=2, auth_token=AUTH_TOKEN,
                              settle=0.2, echo=lines.append)
    assert result.ok, result
    assert (result.hung_up_by, result.actions, result.next_action) == (
        "bridge", ["hangup"], "hangup")
    assert len(result.latencies_ms) == 1  # the goodbye; turn 2 never came
    assert result.heard_ms >= 200
    assert any("the bridge closed the stream (code 1000)" in line for line in lines)
    assert lines[-1].endswith("Twilio hangs up")

    # Told not to follow, the simulator reports the closed stream as a failed call.
    lines.clear()
    result = await place_call(base_of(rig), speech=SPEECH, turns=2, auth_token=AUTH_TOKEN,
                              settle=0.2, echo=lines.append, follow_actions=False)
    assert not result.ok and result.actions == []
    assert "the bridge closed the stream" in result.error


async def test_transfer_is_followed_to_a_dial(make_rig: MakeRig) -> None:
    rig = await make_rig(
        StandinOptions(api_key=API_KEY, tool_calls={
            1: tool_call("transfer_call", {"target": "sales"}, say_ms=200)}),
        transfer_targets=(("sales", "+15550003333"),))
    lines: list[str] = []
    result = await place_call(base_of(rig), speech=SPEECH, turns=2, auth_token=AUTH_TOKEN,
                              settle=0.2, echo=lines.append)
    assert result.ok, result
    assert (result.next_action, result.dialled) == ("dial", "+15550003333")
    assert lines[-1].endswith("Twilio dials +15550003333 (transfer)")


async def test_a_failed_call_is_followed_to_the_spoken_fallback(make_rig: MakeRig) -> None:
    # The model session drops after turn 1 and the stand-in refuses every new one: the bridge
    # gives up, and its <Connect action> answer is the fallback, then a hang-up.
    rig = await make_rig(StandinOptions(api_key=API_KEY, reply="tone", accept_sessions=1))
    sessions = rig.standin.app[STANDIN_SESSIONS]

    async def drop(turn: int) -> None:
        await sessions[0].close(code=1011)

    lines: list[str] = []
    result = await place_call(base_of(rig), speech=SPEECH, turns=2, auth_token=AUTH_TOKEN,
                              settle=0.2, echo=lines.append, after_turn=drop)
    assert not result.ok
    assert (result.next_action, result.said) == ("say", rig.settings.fallback_message)
    assert "the bridge gave up on the call" in result.error
    assert any(line.endswith(f"Twilio says {rig.settings.fallback_message!r} then hangs up")
               for line in lines)


async def test_handover_is_followed_to_another_instance(make_rig: MakeRig) -> None:
    state = MemoryState()
    await state.start()
    public = "https://fleet.example"  # both instances sit behind it; never contacted
    try:
        old = await make_rig(StandinOptions(api_key=API_KEY, reply="tone"), state=state,
                             shutdown_mode="handover", public_url=public)
        new = await make_rig(StandinOptions(api_key=API_KEY, reply="tone"), state=state,
                             public_url=public)
        registry = old.app[REGISTRY]

        async def sigterm(turn: int) -> None:
            if turn == 1:
                registry.draining = True
                await registry.close_all(grace=5.0)

        lines: list[str] = []
        result = await place_call(
            base_of(old), public_url=public, speech=SPEECH, turns=2, auth_token=AUTH_TOKEN,
            settle=0.2, echo=lines.append, after_turn=sigterm,
            action_base=lambda: base_of(new) if registry.draining else base_of(old))
        assert result.ok, result
        assert (result.actions, result.streams, result.hung_up_by) == (["stream"], 2, "caller")
        assert len(result.latencies_ms) == 2  # turn 1 on the old instance, turn 2 on the new
        assert result.handover_gap_ms is not None and result.handover_gap_ms >= 0
        assert result.handover_reply_ms is not None
        assert any(f"(sent to {base_of(new).split('//')[1]})" in line for line in lines)
        # The new instance's model session got the conversation so far, then turn 2.
        [second] = new.standin.app[STANDIN_SESSIONS]
        restored = [e for e in second.received if e.get("type") == "conversation.item.create"]
        assert restored[0]["item"]["content"][0]["text"].startswith("caller turn 1")
        assert len(old.standin.app[STANDIN_SESSIONS]) == 1
    finally:
        await state.close()


def test_rebase_and_balancer() -> None:
    assert rebase("wss://fleet.example/media-stream?x=1", "http://127.0.0.1:5") == \
        "ws://127.0.0.1:5/media-stream?x=1"
    assert rebase("https://fleet.example/connect-action", "http://127.0.0.1:5") == \
        "http://127.0.0.1:5/connect-action"
    assert rebase("ws://a/media-stream", "https://b") == "wss://b/media-stream"
    pick = balancer(["http://a", "http://b"])
    assert [pick() for _ in range(3)] == ["http://a", "http://b", "http://a"]
    assert balancer("http://a")() == "http://a"


def test_twiml_parser_reads_dial_targets_and_the_action() -> None:
    number = parse_twiml(tw.decision_twiml(tw.dial("+15550001111")))
    assert (number.dials, number.dial_caller_id, number.verbs) == (
        ("+15550001111",), None, ("Dial", "Hangup"))
    sip = parse_twiml(tw.decision_twiml(tw.dial("sip:desk@example.com", "+15550002222")))
    assert (sip.dials, sip.dial_caller_id) == (("sip:desk@example.com",), "+15550002222")
    assert parse_twiml("<Response><Dial>+15550003333</Dial></Response>").dials == (
        "+15550003333",)
    connect = parse_twiml(tw.connect_twiml("wss://h/media-stream", {"token": "t"},
                                           "https://h/connect-action"))
    assert (connect.action, connect.stream_url, connect.dials, connect.verbs) == (
        "https://h/connect-action", "wss://h/media-stream", (), ("Connect",))
    said = parse_twiml(tw.decision_twiml(tw.say("Sorry.")))
    assert (said.says, said.dials, said.hangs_up) == (("Sorry.",), (), True)


async def test_inbox_and_wait_until_wait_for_events_and_fail_saying_what() -> None:
    inbox: Inbox[int] = Inbox()
    waiter = asyncio.ensure_future(inbox.wait_for(lambda n: n % 2 == 0, count=2))
    for n in (1, 2, 3):
        inbox.add(n)
    await asyncio.sleep(0)
    assert not waiter.done()  # one even number so far
    inbox.add(4)
    assert await waiter == 4
    with pytest.raises(TimeoutError, match=r"no even number #3 within .* \(2 matched"):
        await inbox.wait_for(lambda n: n % 2 == 0, 3, timeout=0.05, what="even number")
    inbox.close()
    with pytest.raises(EOFError, match="closed before"):
        await inbox.wait_for(lambda n: n > 10)
    polls: list[int] = []

    async def third_time() -> bool:
        polls.append(1)
        return len(polls) == 3

    await wait_until(third_time, interval=0)
    assert len(polls) == 3
    with pytest.raises(TimeoutError, match="the moon was not true"):
        await wait_until(lambda: False, timeout=0.05, what="the moon")
