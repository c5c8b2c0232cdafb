"""The voice webhook: TwiML shape, signatures, the stream URL behind proxies, status."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from server.app import CALLS, PROMPT, SETTINGS, create_app
from server.call import Call, CallDeps
from server.settings import Settings
from server.twilio_protocol import compute_signature

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]

FORM = {"CallSid": "CA" + "1" * 32, "From": "+15551230000", "To": "+15559870000",
        "AccountSid": "AC" + "2" * 32}


def settings(**kw: Any) -> Settings:
    return Settings(openai_api_key="sk-test", **kw)


def stream_of(body: str) -> tuple[str, dict[str, str], str]:
    root = ET.fromstring(body)
    stream = root.find("./Connect/Stream")
    assert stream is not None, body
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    say = root.find("./Say")
    return stream.get("url", ""), params, say.text if say is not None and say.text else ""


async def test_twiml_connects_the_stream(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    resp = await client.post("/incoming-call", data=FORM)
    assert resp.status == 200
    assert resp.content_type == "application/xml"
    url, params, say = stream_of(await resp.text())
    assert url == f"ws://{client.host}:{client.port}/media-stream"
    assert "?" not in url
    assert params == {"caller": FORM["From"], "called": FORM["To"]}
    assert say  # the fallback Twilio speaks if the stream ends abnormally


async def test_get_works_too(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    resp = await client.get("/incoming-call", params={"From": "+1", "To": "+2"})
    assert resp.status == 200
    assert stream_of(await resp.text())[1] == {"caller": "+1", "called": "+2"}


async def test_public_url_and_forwarded_headers(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings(public_url="https://abc.ngrok.app")))
    url = stream_of(await (await client.post("/incoming-call", data=FORM)).text())[0]
    assert url == "wss://abc.ngrok.app/media-stream"
    client = await aiohttp_client(create_app(settings()))
    resp = await client.post("/incoming-call", data=FORM,
                             headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "x.io"})
    assert stream_of(await resp.text())[0] == "wss://x.io/media-stream"


async def test_signature_required_when_token_set(aiohttp_client: MakeClient) -> None:
    app = create_app(settings(twilio_auth_token="tw-secret", public_url="https://pub.example"))
    client = await aiohttp_client(app)
    assert (await client.post("/incoming-call", data=FORM)).status == 403
    wrong = compute_signature("not-the-token", "https://pub.example/incoming-call", FORM)
    resp = await client.post("/incoming-call", data=FORM, headers={"X-Twilio-Signature": wrong})
    assert resp.status == 403
    # Signed for the public URL (what Twilio requested), not the internal address we see.
    good = compute_signature("tw-secret", "https://pub.example/incoming-call", FORM)
    resp = await client.post("/incoming-call", data=FORM, headers={"X-Twilio-Signature": good})
    assert resp.status == 200
    _, params, _ = stream_of(await resp.text())
    assert set(params) == {"caller", "called", "token"}
    tampered = {**FORM, "From": "+19999999999"}
    resp = await client.post("/incoming-call", data=tampered,
                             headers={"X-Twilio-Signature": good})
    assert resp.status == 403


async def test_max_calls_answers_busy(aiohttp_client: MakeClient) -> None:
    app = create_app(settings(max_calls=1))
    client = await aiohttp_client(app)
    live = Call(CallDeps(app[SETTINGS], client.session, app[PROMPT], None),
                web.WebSocketResponse(), peer="test")
    app[CALLS].add(live)  # one call in progress
    root = ET.fromstring(await (await client.post("/incoming-call", data=FORM)).text())
    assert root.find("./Connect") is None
    assert root.find("./Hangup") is not None


async def test_status(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    body = await (await client.get("/")).json()
    assert body["name"] == "phone-bridge"
    assert body["active_calls"] == 0
    assert body["prompt"].startswith("default version 1")
    assert "sk-test" not in str(body)
