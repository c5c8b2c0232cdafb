"""The voice webhook: TwiML shape, signatures, the stream URL behind proxies, status."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server import app as app_module
from server.app import STATE, create_app
from server.settings import Settings
from server.wire.twilio import HANGUP, compute_signature, dial
from tests.conftest import PROMPTS

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]

FORM = {"CallSid": "CA" + "1" * 32, "From": "+15551230000", "To": "+15559870000",
        "AccountSid": "AC" + "2" * 32}


DATABASE = {"url": ""}


@pytest.fixture(autouse=True)
def _database_in_tmp(tmp_path: Path) -> None:
    DATABASE["url"] = f"sqlite:///{tmp_path}/calls.db"


def settings(**kw: Any) -> Settings:
    return Settings(openai_api_key="sk-test", database_url=DATABASE["url"],
                    prompts_dir=PROMPTS, **kw)


def stream_of(body: str) -> tuple[str, dict[str, str], str]:
    """(stream URL, parameters, the <Connect action> URL)."""
    root = ET.fromstring(body)
    connect = root.find("./Connect")
    stream = root.find("./Connect/Stream")
    assert connect is not None and stream is not None, body
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    assert root.find("./Say") is None  # what follows is decided per call by the action
    return stream.get("url", ""), params, connect.get("action", "")


async def test_twiml_connects_the_stream(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    resp = await client.post("/incoming-call", data=FORM)
    assert resp.status == 200
    assert resp.content_type == "application/xml"
    url, params, action = stream_of(await resp.text())
    assert url == f"ws://{client.host}:{client.port}/media-stream"
    assert "?" not in url
    assert params == {"caller": FORM["From"], "called": FORM["To"]}
    assert action == f"http://{client.host}:{client.port}/connect-action"


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
    client = await aiohttp_client(create_app(settings(max_calls=1)))
    first = await (await client.post("/incoming-call", data=FORM)).text()
    stream_of(first)  # the first call's reservation holds the only slot ...
    other = {**FORM, "CallSid": "CA" + "3" * 32}
    root = ET.fromstring(await (await client.post("/incoming-call", data=other)).text())
    assert root.find("./Connect") is None  # ... so a second caller hears "busy"
    assert root.find("./Hangup") is not None
    again = await (await client.post("/incoming-call", data=FORM)).text()
    stream_of(again)  # Twilio retrying the same call is not a second call


async def test_connect_action_follows_the_decision(
    aiohttp_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "DECISION_WAIT", 0.3)
    client = await aiohttp_client(create_app(settings(twilio_auth_token="tw-secret",
                                                      public_url="https://pub.example",
                                                      fallback_message="Sorry!")))
    state = client.app[STATE]

    async def action(call_sid: str, status: str = "in-progress", sign: bool = True) -> str:
        form = {"CallSid": call_sid, "CallStatus": status, "From": "+1", "To": "+2"}
        url = "https://pub.example/connect-action"
        headers = {"X-Twilio-Signature": compute_signature("tw-secret", url, form)} if sign \
            else {}
        resp = await client.post("/connect-action", data=form, headers=headers)
        assert resp.status == (200 if sign else 403)
        return await resp.text()

    await action("CA1", sign=False)  # forged: 403
    await state.put_decision("CA1", HANGUP.to_dict(), 60)
    assert (await action("CA1")).endswith("<Response><Hangup /></Response>")
    await state.put_decision("CA2", dial("+15550001111").to_dict(), 60)
    assert "<Number>+15550001111</Number>" in await action("CA2")
    # The stream has not finished closing yet: the answer waits for the decision.
    waiting = asyncio.create_task(action("CA3"))
    await asyncio.sleep(0)
    await state.put_decision("CA3", dial("sip:desk@example.com").to_dict(), 60)
    assert "<Sip>sip:desk@example.com</Sip>" in await waiting
    # A call the bridge never heard of: the fallback, then hang up.
    unknown = await action("CA" + "9" * 32)
    assert "<Say>Sorry!</Say><Hangup />" in unknown
    # The caller has hung up already: nothing to instruct.
    assert (await action("CA2", status="completed")).endswith("<Hangup /></Response>")


async def test_status_tells_details_only_to_the_admin(aiohttp_client: MakeClient) -> None:
    admin = "admin-token-0123456789abcdef"
    client = await aiohttp_client(create_app(settings(admin_token=admin)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {admin}"}):
        resp = await client.get("/", headers=headers)
        assert resp.status == 200  # a load balancer's or uptime check's "alive"
        assert await resp.json() == {"ok": True}
    body = await (await client.get("/", headers={"Authorization": f"Bearer {admin}"})).json()
    assert body["ok"] is True
    assert body["name"] == "phone-bridge"
    assert body["active_calls"] == 0
    assert body["prompt"].startswith("default version 1")
    assert body["model"] and body["authenticated_webhooks"] is False
    assert "sk-test" not in str(body) and admin not in str(body)
    # Without ADMIN_TOKEN nobody gets the details.
    bare = await aiohttp_client(create_app(settings()))
    assert await (await bare.get("/")).json() == {"ok": True}
