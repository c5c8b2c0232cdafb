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

from server.simulator import TwilioStream
from server.standin import StandinOptions, create_standin_app, next_session
from tests.conftest import MakeRig, heard, loud, speak

ROOT = Path(__file__).resolve().parent.parent


async def test_shutdown_ends_calls_with_going_away(make_rig: MakeRig) -> None:
    rig = await make_rig()
    stream, session = await rig.place()
    await rig.bridge.server.close()
    await asyncio.wait_for(stream.closed.wait(), 3.0)
    assert stream.close_code == WSCloseCode.GOING_AWAY
    await asyncio.wait_for(session.closed.wait(), 1.0)


async def test_drain_lets_a_live_call_finish(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    rig = await make_rig(shutdown_drain_seconds=30.0)
    stream, session = await rig.place()
    closing = asyncio.create_task(rig.bridge.server.close())
    while "waiting up to 30 s for 1 call(s)" not in caplog.text:
        assert not closing.done()
        await asyncio.sleep(0)
    await speak(stream, frames=4, variant=9)  # the call still works while draining
    await stream.wait_for("mark")
    assert loud(9) in heard(stream)
    await stream.send_stop()
    await asyncio.wait_for(closing, 3.0)
    assert stream.close_code == WSCloseCode.OK


async def test_sigterm_exits_cleanly(
    aiohttp_server: Callable[..., Awaitable[TestServer]], unused_tcp_port: int
) -> None:
    standin = await aiohttp_server(create_standin_app(StandinOptions()))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "OPENAI_API_KEY": "sk-subprocess",
        "OPENAI_REALTIME_URL": str(standin.make_url("/v1/realtime")).replace("http", "ws", 1),
        "HOST": "127.0.0.1",
        "PORT": str(unused_tcp_port),
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # wait for the port to open (bounded)
                try:
                    async with http.get(base + "/") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            async with http.post(base + "/incoming-call", data={"CallSid": "CA1"}) as resp:
                stream_el = ET.fromstring(await resp.text()).find("./Connect/Stream")
            assert stream_el is not None
            stream = await TwilioStream.connect(http, stream_el.get("url", ""))
            await stream.send_connected()
            await stream.send_start(call_sid="CA1", stream_sid="MZ1", custom_parameters={})
            session = await next_session(standin.app)
            await session.wait_for("session.update")
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(stream.closed.wait(), 5.0)
            assert stream.close_code == WSCloseCode.GOING_AWAY
            await stream.close()
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "server shutting down" in log and "sk-subprocess" not in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
