"""The records over HTTP (bearer ADMIN_TOKEN), the call webhook (signed, retried), and the
`Records` object as the app uses it: track -> finish -> stored -> served -> sent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.call.ending import Ending, EndKind
from server.call.features.transcript import TranscriptFeature
from server.call.record import CallRecord
from server.records.service import Records
from server.records.webhook import SIGNATURE_HEADER, CallWebhook, sign, verify
from server.settings import ConfigError, Settings
from tests.conftest import ROOT
from tests.fake_call import FakeCall
from tests.test_records import T0, make_record, note

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
MakeServer = Callable[..., Awaitable[TestServer]]
ADMIN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
HOOK_SECRET = "hook-secret-abcdef"


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"openai_api_key": "sk-test",
                              "database_url": f"sqlite:///{tmp_path}/calls.db",
                              "admin_token": ADMIN, "recordings_dir": tmp_path / "recordings",
                              "records_spool": tmp_path / "records-spool.jsonl",
                              "prices_file": ROOT / "config" / "prices.json"}
    values.update(overrides)
    return Settings(**values)


async def records_app(settings: Settings, **kwargs: Any) -> tuple[web.Application, Records]:
    """What app.py does: Records in create_app, opened in a cleanup ctx on a ClientSession."""
    app = web.Application()
    records = Records(settings, save_interval=0.05, **kwargs)
    records.add_routes(app)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as http:
            await records.open(http)
            yield
            await records.close()

    app.cleanup_ctx.append(ctx)
    return app, records


@pytest.fixture
async def served(tmp_path: Path, aiohttp_client: MakeClient) -> tuple[Client, Records]:
    app, records = await records_app(settings_for(tmp_path))
    client = await aiohttp_client(app)
    for i in range(5):
        record = make_record(f"CA{i}", T0 + timedelta(hours=i),
                             caller="+15550009999" if i % 2 else "+15550001111")
        note(record, "caller", text=f"question {i}")
        note(record, "assistant", text=f"answer {i}")
        await records.store.save(record.to_dict())
    return client, records


async def test_every_route_needs_the_admin_token(served: tuple[Client, Records]) -> None:
    client, _ = served
    for n, path in enumerate(("/calls", "/calls/CA1", "/calls/CA1/recording.wav", "/calls/CAnope")):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": ADMIN},
                        {"Authorization": f"Basic {ADMIN}"},
                        {"Authorization": f"Bearer {ADMIN[:-1]}"}):
            # (each path from its own address: ten wrong tokens from one get 429, see
            # test_console_auth.py)
            headers = {**headers, "X-Forwarded-For": f"203.0.113.{n}"}
            resp = await client.get(path, headers=headers)
            assert resp.status == 401, (path, headers)
            assert "question" not in await resp.text()
    assert (await client.get("/calls", headers=AUTH)).status == 200


async def test_list_pages_and_filters(served: tuple[Client, Records]) -> None:
    client, _ = served
    resp = await client.get("/calls", params={"limit": "2"}, headers=AUTH)
    page = await resp.json()
    assert [c["call_sid"] for c in page["calls"]] == ["CA4", "CA3"]
    resp = await client.get("/calls", params={"limit": "2", "cursor": page["next"]},
                            headers=AUTH)
    page = await resp.json()
    assert [c["call_sid"] for c in page["calls"]] == ["CA2", "CA1"] and page["next"]
    page = await (await client.get("/calls", params={"number": "+15550009999"},
                                   headers=AUTH)).json()
    assert [c["call_sid"] for c in page["calls"]] == ["CA3", "CA1"] and page["next"] is None
    # An unencoded "+" arrives as a space: still the number.
    page = await (await client.get("/calls?number=+15550009999", headers=AUTH)).json()
    assert [c["call_sid"] for c in page["calls"]] == ["CA3", "CA1"]
    page = await (await client.get("/calls", params={"since": "2025-03-01T13:00:00Z",
                                                     "until": "2025-03-01T15:00:00"},
                                   headers=AUTH)).json()
    assert [c["call_sid"] for c in page["calls"]] == ["CA2", "CA1"]
    page = await (await client.get("/calls", params={"until": "2025-03-01"},
                                   headers=AUTH)).json()
    assert len(page["calls"]) == 5  # a date-only `until` includes that day
    for params in ({"limit": "0"}, {"limit": "x"}, {"since": "last week"},
                   {"cursor": "garbage"}):
        resp = await client.get("/calls", params=params, headers=AUTH)
        assert resp.status == 400, params
        assert "error" in await resp.json()


async def test_one_call_as_json_or_text(served: tuple[Client, Records]) -> None:
    client, _ = served
    record = await (await client.get("/calls/CA2", headers=AUTH)).json()
    assert record["call_sid"] == "CA2" and record["from"] == "+15550001111"
    assert [e["kind"] for e in record["timeline"]] == ["caller", "assistant"]
    resp = await client.get("/calls/CA2", headers={**AUTH, "Accept": "text/plain"})
    assert resp.content_type == "text/plain"
    text = await resp.text()
    assert "Caller: question 2" in text and "Assistant: answer 2" in text
    resp = await client.get("/calls/CAnope", headers=AUTH)
    assert resp.status == 404


async def test_recording_download(served: tuple[Client, Records], tmp_path: Path) -> None:
    client, records = served
    assert (await client.get("/calls/CA1/recording.wav", headers=AUTH)).status == 404
    wav = tmp_path / "CA1.wav"
    wav.write_bytes(b"RIFF....WAVE")
    await records.store.save(make_record("CA1", recording=str(wav)).to_dict())
    resp = await client.get("/calls/CA1/recording.wav", headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
    assert await resp.read() == b"RIFF....WAVE"
    wav.unlink()  # kept by another instance, or deleted: a clear 404
    assert (await client.get("/calls/CA1/recording.wav", headers=AUTH)).status == 404


async def test_routes_are_off_without_an_admin_token(tmp_path: Path,
                                                     aiohttp_client: MakeClient,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "server.records"):
        app, _ = await records_app(settings_for(tmp_path, admin_token=None))
    assert "ADMIN_TOKEN is not set: the /calls records API is off" in caplog.text
    client = await aiohttp_client(app)
    assert (await client.get("/calls", headers=AUTH)).status == 404


def test_a_bad_database_url_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Records(settings_for(tmp_path, database_url="oracle://x"))


# --- the call webhook ---


class Receiver:
    """A webhook receiver on loopback that answers with a scripted list of statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[tuple[bytes, str | None]] = []
        self.got = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append((await request.read(), request.headers.get(SIGNATURE_HEADER)))
        self.got.set()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.bodies) < count:
                self.got.clear()
                await self.got.wait()


async def receiver(aiohttp_server: MakeServer, statuses: list[int]) -> tuple[Receiver, str]:
    rx = Receiver(statuses)
    app = web.Application()
    app.router.add_post("/hook", rx.handle)
    server = await aiohttp_server(app)
    return rx, str(server.make_url("/hook"))


async def test_webhook_is_signed_and_retried(aiohttp_server: MakeServer) -> None:
    rx, url = await receiver(aiohttp_server, [500, 503])
    async with aiohttp.ClientSession() as http:
        hook = CallWebhook(url, HOOK_SECRET, http, first_delay=0.01)
        hook.send({"call_sid": "CAhook", "end_kind": "caller_hung_up"})
        await rx.wait(3)
        await hook.close()
    assert hook.delivered == 1 and hook.failed == 0
    body, signature = rx.bodies[-1]
    assert orjson.loads(body)["call_sid"] == "CAhook"
    assert signature == sign(HOOK_SECRET, body) and signature.startswith("sha256=")
    assert verify(HOOK_SECRET, body, signature)
    assert not verify(HOOK_SECRET, body + b" ", signature)
    assert not verify("other-secret", body, signature)


async def test_webhook_gives_up_on_a_client_error_and_after_its_deadline(
        aiohttp_server: MakeServer, caplog: pytest.LogCaptureFixture) -> None:
    rx, url = await receiver(aiohttp_server, [400, 500, 500, 500, 500, 500, 500])
    async with aiohttp.ClientSession() as http:
        hook = CallWebhook(url, None, http, first_delay=0.01)
        hook.send({"call_sid": "CAbad"})
        await rx.wait(1)
        await hook.close()
        assert len(rx.bodies) == 1 and hook.failed == 1 and rx.bodies[0][1] is None
        assert "failed after 1 attempt(s): HTTP 400" in caplog.text
        hook = CallWebhook(url, None, http, first_delay=0.01, give_up_after=0.05)
        hook.send({"call_sid": "CAdown"})
        async with asyncio.timeout(5):
            while hook.pending:
                await asyncio.sleep(0.01)
        assert hook.failed == 1 and hook.delivered == 0


async def test_webhook_tasks_are_cancelled_at_close(aiohttp_server: MakeServer) -> None:
    rx, url = await receiver(aiohttp_server, [500] * 100)
    async with aiohttp.ClientSession() as http:
        hook = CallWebhook(url, None, http, first_delay=30)
        hook.send({"call_sid": "CAslow"})
        await rx.wait(1)
        await hook.close(grace=0.01)
        assert hook.pending == 0 and hook.delivered == 0


# --- Records end to end: the lifecycle app.py and call.py drive ---


async def test_a_call_is_stored_served_and_sent(tmp_path: Path, aiohttp_client: MakeClient,
                                                aiohttp_server: MakeServer) -> None:
    rx, url = await receiver(aiohttp_server, [])
    settings = settings_for(tmp_path, call_webhook_url=url, call_webhook_secret=HOOK_SECRET,
                            record_calls=True)
    app, records = await records_app(settings)
    client = await aiohttp_client(app)
    call = FakeCall("CAe2e", settings)
    assert records.active_recorder is not None
    for factory in (TranscriptFeature.factory(records.prices), records.active_recorder.feature()):
        call.add(factory(call))
    assert {f.name for f in call.features} == {"transcript", "recording"}
    call.listen(records)  # the call starts: its record is tracked
    note(call.record, "caller", text="hello?")
    async with asyncio.timeout(5):  # the 5 s (here 0.05 s) save of a live call
        while await records.store.get("CAe2e") is None:
            await asyncio.sleep(0.02)
    live = await (await client.get("/calls/CAe2e", headers=AUTH)).json()
    assert live["ended_at"] is None and live["timeline"][0]["text"] == "hello?"

    for feature in call.features:
        feature.on_caller_audio("/////w==")  # 4 bytes of mu-law silence
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    call.record.ended_at = call.record.started_at + timedelta(seconds=5)
    call.record.end_kind, call.record.end_reason = EndKind.CALLER_HUNG_UP, "caller hung up"
    records.writer.finish(call.record)
    await rx.wait(1)
    sent = orjson.loads(rx.bodies[0][0])
    assert sent["call_sid"] == "CAe2e" and sent["end_kind"] == EndKind.CALLER_HUNG_UP
    assert verify(HOOK_SECRET, rx.bodies[0][0], rx.bodies[0][1])
    async with asyncio.timeout(5):
        while records.writer.pending:
            await asyncio.sleep(0.02)
    stored = await (await client.get("/calls/CAe2e", headers=AUTH)).json()
    assert stored["end_kind"] == EndKind.CALLER_HUNG_UP and stored["duration_seconds"] == 5.0
    assert stored["recording"].endswith("CAe2e.wav")
    await records.recorder.close() if records.recorder else None
    resp = await client.get("/calls/CAe2e/recording.wav", headers=AUTH)
    assert resp.status == 200 and (await resp.read())[:4] == b"RIFF"


async def test_shutdown_flushes_a_live_call(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    _, records = await records_app(settings)
    async with aiohttp.ClientSession() as http:
        await records.open(http)
        record = CallRecord(call_sid="CAflush", caller="+15550001111")
        records.writer.track(record)
        note(record, "caller", text="are you there?")
        await records.close()
    _, again = await records_app(settings)
    async with aiohttp.ClientSession() as http:
        await again.open(http)
        stored = await again.store.get("CAflush")
        await again.close()
    assert stored is not None and stored["end_kind"] == "shutdown"
    assert stored["timeline"][0]["text"] == "are you there?"
