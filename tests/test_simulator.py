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

from server.testing import audio
from server.testing.simulator import TwilioStream, place_call, sample_wav
from server.testing.standin import StandinOptions
from server.testing.twiml import parse_twiml
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
