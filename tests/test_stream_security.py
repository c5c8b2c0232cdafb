"""A media stream that did not come from a signed webhook never reaches OpenAI."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSCloseCode

from server.testing.standin import STANDIN_SESSIONS
from server.wire.twilio import compute_signature
from tests.conftest import AUTH_TOKEN, MakeRig, Rig, heard, loud, speak


async def start(rig: Rig, url: str, call_sid: str, params: dict[str, str]) -> None:
    stream = await rig.open_stream(url)
    await stream.send_connected()
    await stream.send_start(call_sid=call_sid, stream_sid="MZ" + "9" * 32,
                            custom_parameters=params)
    await asyncio.wait_for(stream.closed.wait(), 2.0)
    assert stream.close_code == WSCloseCode.POLICY_VIOLATION


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"token": None}, "no stream token"),
        ({"token": "123.abc"}, "malformed stream token"),
        ({"token": "123.abc.def"}, "stream token does not match this call"),
        ({"call_sid": "CA" + "f" * 32}, "stream token does not match this call"),
    ],
)
async def test_forged_or_misbound_stream_is_refused(
    make_rig: MakeRig, change: dict[str, str | None], reason: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(prewarm=False)  # the stream's own doing: no session from the webhook
    call_sid = "CA" + "8" * 32
    url, params = await rig.webhook(call_sid)
    if "token" in change:
        params.pop("token")
        if change["token"] is not None:
            params["token"] = change["token"]
    await start(rig, url, change.get("call_sid") or call_sid, params)
    assert f"rejected stream: {reason}" in caplog.text
    assert rig.standin.app[STANDIN_SESSIONS] == []


async def test_token_is_single_use(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    call_sid = "CA" + "7" * 32
    url, params = await rig.webhook(call_sid)
    stream = await rig.open_stream(url)
    await stream.send_connected()
    await stream.send_start(call_sid=call_sid, stream_sid="MZ1", custom_parameters=params)
    await speak(stream, frames=3)
    await stream.wait_for("mark")
    await start(rig, url, call_sid, params)  # replay of the same TwiML
    assert "stream token already used" in caplog.text
    assert len(rig.standin.app[STANDIN_SESSIONS]) == 1


async def test_unsigned_webhook_is_refused(rig: Rig) -> None:
    resp = await rig.bridge.post("/incoming-call", data={"CallSid": "CA1"})
    assert resp.status == 403


async def test_upgrade_signature_checked_when_present(rig: Rig) -> None:
    url, params = await rig.webhook("CA" + "4" * 32)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await rig.open_stream(url, headers={"X-Twilio-Signature": "bm90IHJpZ2h0"})
    assert caught.value.status == 403
    good = compute_signature(AUTH_TOKEN, url, {})
    stream = await rig.open_stream(url, headers={"X-Twilio-Signature": good})
    await stream.send_connected()
    await stream.send_start(call_sid="CA" + "4" * 32, stream_sid="MZ2", custom_parameters=params)
    await speak(stream, frames=3, variant=5)
    await stream.wait_for("mark")
    assert loud(5) in heard(stream)
