"""Shutdown: stop taking calls, let live ones drain, end the rest with GOING_AWAY, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSCloseCode
from aiohttp.test_utils import TestServer

from server.app import drain
from server.testing.dial import dial
from server.testing.process import ServerFailed, free_port, server_process
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
    aiohttp_server: Callable[..., Awaitable[TestServer]], drain_seconds: int,
) -> None:
    standin = await aiohttp_server(create_standin_app(StandinOptions()))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "OPENAI_API_KEY": "sk-subprocess",
        "OPENAI_REALTIME_URL": str(standin.make_url("/v1/realtime")).replace("http", "ws", 1),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "PYTHONPATH": str(ROOT),
        "SHUTDOWN_DRAIN_SECONDS": str(drain_seconds),
        "VAD_SILENCE_MS": "100",
    }
    async with server_process(env) as bridge, aiohttp.ClientSession() as http:
        stream = (await dial(http, bridge.url)).stream  # unsigned: no TWILIO_AUTH_TOKEN
        try:
            session = await next_session(standin.app)
            await session.wait_for("session.update")
            bridge.send_signal(signal.SIGTERM)
            await bridge.wait_for_line("no longer accepting calls")
            if drain_seconds:
                await speak(stream, frames=4, variant=11)  # still served while draining
                await stream.wait_for("mark")
                assert loud(11) in heard(stream)
                await stream.send_stop()
            await asyncio.wait_for(stream.closed.wait(), 5.0)
            expected = WSCloseCode.OK if drain_seconds else WSCloseCode.GOING_AWAY
            assert stream.close_code == expected
        finally:
            await stream.close()
        assert await bridge.wait(10.0) == 0
        text = bridge.output()
        assert "server: stopped\n" in text, text
        assert ("server shutting down" in text) == (not drain_seconds)
        assert "sk-subprocess" not in text


async def test_a_server_that_never_comes_up_fails_loudly() -> None:
    """The helper above must not fall through: it raises with the child's stderr."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOST": "127.0.0.1",
           "PORT": str(free_port()), "OPENAI_API_KEY": "sk-x", "VOICE": "no-such-voice"}
    with pytest.raises(ServerFailed, match=r"(?s)exited with status 2 .*configuration error"):
        async with server_process(env):
            pass
    with pytest.raises(ServerFailed, match=r"did not answer .* within"):
        async with server_process({**env, "VOICE": "alloy"}, ready_timeout=0.0):
            pass
