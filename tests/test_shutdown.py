"""Shutdown: stop taking calls, let live ones drain, end the rest with GOING_AWAY, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSCloseCode
from aiohttp.test_utils import TestServer

from server.app import drain
from server.testing.simulator import TwilioStream
from server.testing.standin import StandinOptions, create_standin_app, next_session
from tests.conftest import MakeRig, heard, loud, speak

ROOT = Path(__file__).resolve().parent.parent


async def test_shutdown_ends_calls_with_going_away(make_rig: MakeRig) -> None:
    rig = await make_rig()
    stream, session = await rig.place()
    await rig.bridge.server.close()
    await asyncio.wait_for(stream.closed.wait(), 3.0)
    assert stream.close_code == WSCloseCode.GOING_AWAY
    await asyncio.wait_for(session.closed.wait(), 1.0)


async def test_drain_lets_a_live_call_finish(make_rig: MakeRig) -> None:
    rig = await make_rig()
    stream, _ = await rig.place()
    draining = asyncio.create_task(drain(rig.app, 30.0, asyncio.Event()))
    await speak(stream, frames=4, variant=9)  # the call still works while draining
    await stream.wait_for("mark")
    assert loud(9) in heard(stream)
    assert not draining.done()
    await stream.send_stop()
    await asyncio.wait_for(draining, 3.0)  # returns as soon as the last call ends
    assert stream.close_code == WSCloseCode.OK


async def test_second_signal_cuts_the_drain_short(make_rig: MakeRig) -> None:
    rig = await make_rig()
    stream, _ = await rig.place()
    hurry = asyncio.Event()
    draining = asyncio.create_task(drain(rig.app, 30.0, hurry))
    hurry.set()
    await asyncio.wait_for(draining, 1.0)
    assert not stream.closed.is_set()  # the runner's shutdown ends it next, with GOING_AWAY


@pytest.mark.parametrize("drain_seconds", [0, 30])
async def test_sigterm_exits_cleanly(
    aiohttp_server: Callable[..., Awaitable[TestServer]], unused_tcp_port: int,
    drain_seconds: int,
) -> None:
    standin = await aiohttp_server(create_standin_app(StandinOptions()))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "OPENAI_API_KEY": "sk-subprocess",
        "OPENAI_REALTIME_URL": str(standin.make_url("/v1/realtime")).replace("http", "ws", 1),
        "HOST": "127.0.0.1",
        "PORT": str(unused_tcp_port),
        "PYTHONPATH": str(ROOT),
        "SHUTDOWN_DRAIN_SECONDS": str(drain_seconds),
        "VAD_SILENCE_MS": "100",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    base = f"http://127.0.0.1:{unused_tcp_port}"
    log: list[str] = []

    async def log_line(containing: str) -> None:
        assert proc.stderr is not None
        while not any(containing in line for line in log):
            line = (await proc.stderr.readline()).decode()
            assert line, f"bridge exited before logging {containing!r}: {log}"
            log.append(line)

    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.wait_for(log_line("Twilio voice webhook"), 10.0)
            for _ in range(200):  # the log line comes just before the port opens
                try:
                    async with http.get(base + "/") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            async with http.post(base + "/incoming-call", data={"CallSid": "CA1"}) as resp:
                stream_el = ET.fromstring(await resp.text()).find("./Connect/Stream")
            assert stream_el is not None
            stream = await TwilioStream.connect(http, stream_el.get("url", ""))
            await stream.send_connected()
            await stream.send_start(call_sid="CA1", stream_sid="MZ1", custom_parameters={})
            session = await next_session(standin.app)
            await session.wait_for("session.update")
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(log_line("no longer accepting calls"), 5.0)
            if drain_seconds:
                await speak(stream, frames=4, variant=11)  # still served while draining
                await stream.wait_for("mark")
                assert loud(11) in heard(stream)
                await stream.send_stop()
            await asyncio.wait_for(stream.closed.wait(), 5.0)
            expected = WSCloseCode.OK if drain_seconds else WSCloseCode.GOING_AWAY
            assert stream.close_code == expected
            await stream.close()
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        rest = (await proc.stderr.read()).decode()
        text = "".join(log) + rest
        assert "stopped" in rest
        assert ("server shutting down" in text) == (not drain_seconds)
        assert "sk-subprocess" not in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
