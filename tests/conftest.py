"""Shared rig: the bridge on a loopback port, the Realtime stand-in as OpenAI, and a Twilio
stream client, all over real sockets."""

from __future__ import annotations

import weakref
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import uuid4

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import CALLS, create_app
from server.call import Call
from server.settings import Settings
from server.testing.simulator import TwilioStream
from server.testing.standin import StandinOptions, StandinSession, create_standin_app, next_session
from server.twilio_protocol import compute_signature

API_KEY = "sk-test-0123456789abcdef"
AUTH_TOKEN = "twilio-auth-token-0123456789"

LOUD = bytes([0x80, 0x00] * 80)  # one 20 ms mu-law frame at full scale: speech to any VAD
SILENCE = b"\xff" * 160


def loud(variant: int = 0) -> bytes:
    """A loud frame whose bytes are distinct per variant, to tell calls' audio apart."""
    return bytes([0x80 + variant, 0x00 + variant] * 80)


@dataclass
class Rig:
    standin: TestServer
    bridge: TestClient[web.Request, web.Application]
    settings: Settings
    streams: list[TwilioStream] = field(default_factory=list)

    @property
    def app(self) -> web.Application:
        return self.bridge.app

    async def webhook(self, call_sid: str, sign: bool = True) -> tuple[str, dict[str, str]]:
        """Do what Twilio does on an incoming call; return the stream URL and parameters."""
        form = {"CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "From": "+15550001111",
                "To": "+15550002222", "CallStatus": "ringing", "Direction": "inbound"}
        headers = {}
        if sign and self.settings.twilio_auth_token:
            url = str(self.bridge.make_url("/incoming-call"))
            headers["X-Twilio-Signature"] = compute_signature(
                self.settings.twilio_auth_token, url, form)
        resp = await self.bridge.post("/incoming-call", data=form, headers=headers)
        assert resp.status == 200, await resp.text()
        stream = ET.fromstring(await resp.text()).find("./Connect/Stream")
        assert stream is not None
        params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return stream.get("url", ""), params

    async def open_stream(self, url: str, marks: str = "manual",
                          headers: dict[str, str] | None = None) -> TwilioStream:
        stream = await TwilioStream.connect(self.bridge.session, url, headers=headers,
                                            marks=marks)
        self.streams.append(stream)
        return stream

    async def place(self, marks: str = "manual", **start: Any) -> tuple[TwilioStream,
                                                                        StandinSession]:
        """A whole call set-up: webhook, stream, connected + start, the OpenAI session."""
        call_sid = "CA" + uuid4().hex
        url, params = await self.webhook(call_sid)
        stream = await self.open_stream(url, marks=marks)
        await stream.send_connected()
        await stream.send_start(call_sid=call_sid, stream_sid="MZ" + uuid4().hex,
                                custom_parameters=start.get("parameters", params))
        session = await next_session(self.standin.app)
        await session.wait_for("session.update")
        return stream, session

    def live_calls(self) -> list[Call]:
        calls: weakref.WeakSet[Call] = self.app[CALLS]
        return list(calls)


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> Any:
    rigs: list[Rig] = []

    async def make(standin: StandinOptions | None = None, **overrides: Any) -> Rig:
        standin_server = await aiohttp_server(
            create_standin_app(standin or StandinOptions(api_key=API_KEY)))
        settings = Settings(
            openai_api_key=API_KEY,
            openai_realtime_url=str(standin_server.make_url("/v1/realtime")).replace(
                "http://", "ws://"),
            twilio_auth_token=AUTH_TOKEN,
            vad_silence_ms=100,
            openai_connect_timeout=2.0,
            stream_start_timeout=2.0,
        )
        settings = replace(settings, **overrides)
        bridge = await aiohttp_client(create_app(settings))
        rig = Rig(standin_server, bridge, settings)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        for stream in rig.streams:
            await stream.close()


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    return await make_rig()


async def speak(stream: TwilioStream, frames: int = 10, variant: int = 0,
                silence: int = 8) -> bytes:
    """Send one caller turn: speech frames, then enough silence to end the turn."""
    spoken = loud(variant)
    for _ in range(frames):
        await stream.send_media(spoken)
    for _ in range(silence):
        await stream.send_media(SILENCE)
    return spoken


def heard(stream: TwilioStream) -> bytes:
    """All audio the bridge sent to this stream, decoded from base64, in order."""
    import base64

    return b"".join(base64.b64decode(m["media"]["payload"])
                    for m in stream.received if m.get("event") == "media")

