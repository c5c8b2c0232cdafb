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
from server.testing.dial import action_form, call_form, dial, post_webhook
from server.testing.process import ServerFailed, free_port, server_process
from server.testing.simulator import rebase
from server.testing.standin import StandinOptions, create_standin_app, next_session, tool_call
from server.testing.twiml import Twiml
from tests.conftest import AUTH_TOKEN, MakeRig, heard, loud, speak, subprocess_env

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
    env = subprocess_env(
        OPENAI_API_KEY="sk-subprocess",
        OPENAI_REALTIME_URL=str(standin.make_url("/v1/realtime")).replace("http", "ws", 1),
        PORT=str(free_port()), SHUTDOWN_DRAIN_SECONDS=str(drain_seconds), VAD_SILENCE_MS="100",
        SHUTDOWN_ACTION_GRACE="0.5")
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


# --- a stopping process still answers Twilio ---

PUBLIC = "http://bridge.test"  # what Twilio knows; requests are signed for it


async def bridge_for(aiohttp_server: Callable[..., Awaitable[TestServer]],
                     options: StandinOptions, **extra: str) -> tuple[TestServer, dict[str, str]]:
    standin = await aiohttp_server(create_standin_app(options))
    env = subprocess_env(
        OPENAI_API_KEY="sk-subprocess", TWILIO_AUTH_TOKEN=AUTH_TOKEN, PUBLIC_URL=PUBLIC,
        OPENAI_REALTIME_URL=str(standin.make_url("/v1/realtime")).replace("http", "ws", 1),
        PORT=str(free_port()), VAD_SILENCE_MS="100", **extra)
    return standin, env


async def ask_what_next(http: aiohttp.ClientSession, bridge_url: str, call_sid: str) -> Twiml:
    """Twilio's <Connect action> request once the stream has closed (signed for PUBLIC)."""
    return await post_webhook(http, bridge_url + "/connect-action", action_form(call_sid),
                              AUTH_TOKEN, sign_url=PUBLIC + "/connect-action",
                              what="connect action")


async def test_a_transfer_during_the_drain_reaches_dial(
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    standin, env = await bridge_for(
        aiohttp_server, StandinOptions(tool_calls={1: tool_call("transfer_call",
                                                               {"target": "sales"})}),
        SHUTDOWN_DRAIN_SECONDS="30", TRANSFER_TARGETS="sales=+15550001111")
    async with server_process(env) as bridge, aiohttp.ClientSession() as http:
        call = await dial(http, PUBLIC, auth_token=AUTH_TOKEN, marks="immediate",
                          route=lambda url: rebase(url, bridge.url))
        stream = call.stream
        try:
            await (await next_session(standin.app)).wait_for("session.update")
            bridge.send_signal(signal.SIGTERM)
            await bridge.wait_for_line("no longer accepting calls")
            # Draining: not ready, still alive; new calls are turned away, new streams too.
            assert (await http.get(bridge.url + "/readyz")).status == 503
            assert (await http.get(bridge.url + "/healthz")).status == 200
            busy = await post_webhook(http, bridge.url + "/incoming-call",
                                      call_form("CA" + "e" * 32), AUTH_TOKEN,
                                      sign_url=PUBLIC + "/incoming-call")
            assert busy.stream_url is None and busy.say
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(rebase(PUBLIC.replace("http", "ws") + "/media-stream",
                                             bridge.url))
            assert refused.value.status == 503
            # The live call goes on: the caller asks for sales, the assistant transfers.
            await speak(stream, frames=6, variant=2)
            await asyncio.wait_for(stream.closed.wait(), 10.0)
            assert stream.close_code == WSCloseCode.OK
            what_next = await ask_what_next(http, bridge.url, call.call_sid)
            assert what_next.dials == ("+15550001111",)
        finally:
            await stream.close()
        assert await bridge.wait(10.0) == 0
    assert "not fetched" not in bridge.output()  # it waited for Twilio, who asked


async def test_a_call_cut_at_the_end_of_the_drain_hears_the_fallback(
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    standin, env = await bridge_for(aiohttp_server, StandinOptions(),
                                    SHUTDOWN_DRAIN_SECONDS="1",
                                    FALLBACK_MESSAGE="Sorry, we are closing for a moment.")
    async with server_process(env) as bridge, aiohttp.ClientSession() as http:
        call = await dial(http, PUBLIC, auth_token=AUTH_TOKEN,
                          route=lambda url: rebase(url, bridge.url))
        try:
            await (await next_session(standin.app)).wait_for("session.update")
            bridge.send_signal(signal.SIGTERM)
            await asyncio.wait_for(call.stream.closed.wait(), 10.0)
            assert call.stream.close_code == WSCloseCode.GOING_AWAY
            what_next = await ask_what_next(http, bridge.url, call.call_sid)
            assert what_next.say == "Sorry, we are closing for a moment."
            assert what_next.hangs_up
        finally:
            await call.stream.close()
        assert await bridge.wait(10.0) == 0


HUNG_TOOL = """
import threading
from server.tools import tool

@tool
def stuck() -> str:
    \"\"\"A tool whose backend never answers.\"\"\"
    threading.Event().wait()
    return "never"
"""


async def test_hung_sync_tools_do_not_hold_the_shutdown(
        aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path) -> None:
    module = tmp_path / "stuck_tools.py"
    module.write_text(HUNG_TOOL)
    standin, env = await bridge_for(
        aiohttp_server, StandinOptions(tool_calls={1: tool_call("stuck")}),
        TOOLS_MODULE=str(module), TOOL_TIMEOUT="0.5", SHUTDOWN_ACTION_GRACE="0.2")
    async with server_process(env) as bridge, aiohttp.ClientSession() as http:
        call = await dial(http, PUBLIC, auth_token=AUTH_TOKEN, marks="immediate",
                          route=lambda url: rebase(url, bridge.url))
        try:
            await (await next_session(standin.app)).wait_for("session.update")
            await speak(call.stream, frames=6, variant=3)
            await bridge.wait_for_line("tool stuck: timeout", 10.0)
            bridge.send_signal(signal.SIGTERM)
            assert await bridge.wait(10.0) == 0
        finally:
            await call.stream.close()
    assert "1 tool thread(s) still running at shutdown, left behind: stuck" in bridge.output()
