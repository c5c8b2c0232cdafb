"""The call simulator against a real bridge with signatures on, and its failure reports."""

from __future__ import annotations

import asyncio
import base64
import sys
import time
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.testing import audio
from server.testing.simulator import TwilioStream, place_call, sample_wav
from tests.conftest import AUTH_TOKEN, Rig


def short_wav(path: Path) -> Path:
    """0.3 s of a loud tone: a quick caller turn."""
    pcm = audio.ulaw_decode(audio.tone(300, 300.0, 12000))
    audio.write_wav(path, pcm)
    return path


async def test_call_with_barge_in(rig: Rig, tmp_path: Path) -> None:
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
    # Heard: the first 100 ms or so of the reply (until the caller's speech was detected and
    # playback cleared), then all of the second reply. Without the cut it would be 600 ms.
    assert 300 + 100 <= result.heard_ms < 300 + 200


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
    echoes: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    server_ws: list[web.WebSocketResponse] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        server_ws.append(ws)
        async for msg in ws:
            event = orjson.loads(msg.data)
            if event["event"] == "mark":
                echoes.put_nowait((event["mark"]["name"], time.monotonic()))
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    client = await aiohttp_client(app)
    stream = await TwilioStream.connect(client.session, str(client.make_url("/ws")),
                                        marks="playback")
    await stream.send_connected()
    while not server_ws:
        await asyncio.sleep(0)
    ws = server_ws[0]

    async def send(message: dict[str, object]) -> None:
        await ws.send_str(orjson.dumps(message).decode())

    def media(ms: int) -> dict[str, object]:
        return {"event": "media", "streamSid": "MZ1",
                "media": {"payload": base64.b64encode(b"\x01" * (ms * 8)).decode()}}

    sent = time.monotonic()
    await send(media(60))
    await send({"event": "mark", "streamSid": "MZ1", "mark": {"name": "a"}})
    name, at = await asyncio.wait_for(echoes.get(), 2)
    assert name == "a" and at - sent >= 0.06  # not before its 60 ms of audio played
    await send(media(5000))
    await send({"event": "mark", "streamSid": "MZ1", "mark": {"name": "b"}})
    await send(media(5000))
    await send({"event": "mark", "streamSid": "MZ1", "mark": {"name": "c"}})
    await send({"event": "clear", "streamSid": "MZ1"})
    assert [(await asyncio.wait_for(echoes.get(), 2))[0] for _ in range(2)] == ["b", "c"]
    assert len(stream.heard) < 60 * 8 + 5000 * 8  # the cleared audio was never played
    assert not stream.playing
    await ws.send_bytes(b"\x00")
    await send({"event": "media", "streamSid": "MZ1", "media": {"payload": "", "x": 1}})
    await stream.wait_for("media", count=4)
    assert stream.violations == ["BINARY frame", stream.violations[1]]
    assert "31951" in stream.violations[1]
    await stream.close()
