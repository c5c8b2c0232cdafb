"""The campaigns and do-not-call HTTP API: JSON and CSV bodies, JSON errors, authorisation."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.outbound.campaigns import Campaigns
from server.outbound.numbers import DoNotCall
from server.outbound.routes import add_routes
from server.outbound.store import CampaignStore, open_campaign_store

TOKEN = "operator-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


async def authorize(request: web.Request) -> str:
    """What the console's operator auth will do; here, one bearer token for "ops"."""
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
        raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="operators"'})
    return "ops"


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    store: CampaignStore
    dnc: DoNotCall
    woken: list[str]


@pytest.fixture
async def api(aiohttp_client: MakeClient, tmp_path: Path) -> AsyncIterator[Api]:
    store = open_campaign_store(f"sqlite:///{tmp_path}/calls.db")
    assert store is not None
    await store.open()
    dnc = DoNotCall(tmp_path / "dnc.txt")
    await dnc.load()
    woken: list[str] = []
    campaigns = Campaigns(store, dnc, on_change=lambda: woken.append("wake"))
    app = web.Application()
    add_routes(app, campaigns=lambda: campaigns, do_not_call=lambda: dnc, authorize=authorize,
               check_prompt=lambda pid, v: None if pid == "reminders" else "unknown prompt",
               max_body=64 * 1024)
    client = await aiohttp_client(app)
    yield Api(client, store, dnc, woken)
    await store.close()


async def test_create_from_json_then_progress(api: Api) -> None:
    body = {"name": "Reminders", "concurrency": 2, "retries": {"busy": 1},
            "window": {"start": "09:00", "end": "18:00", "timezone": "America/New_York"},
            "prompt": {"id": "reminders"},
            "calls": [{"to": "+15550001111", "variables": {"name": "Ann"}},
                      {"to": "+15550002222"}, {"to": "12345"}]}
    resp = await api.client.post("/campaigns", json=body, headers=AUTH)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["status"] == "running" and created["total"] == 3
    assert created["to_dial"] == 2 and created["skipped"] == {"invalid": 1}
    assert created["invalid"] == [{"index": 2, "reason": "to must start with + and the country "
                                   "code (E.164: +<country><number>)"}]
    assert resp.headers["Location"] == f"/campaigns/{created['id']}"
    assert api.woken == ["wake"]

    resp = await api.client.get(f"/campaigns/{created['id']}", headers=AUTH)
    progress = await resp.json()
    assert progress["name"] == "Reminders" and progress["created_by"] == "ops"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", progress["created_at"])
    assert progress["states"]["pending"] == 2 and progress["outcomes"] == {"invalid": 1}
    assert progress["settings"]["window"]["timezone"] == "America/New_York"
    assert "calls" not in progress
    resp = await api.client.get(f"/campaigns/{created['id']}?calls=1", headers=AUTH)
    calls = (await resp.json())["calls"]
    assert [(c["number"], c["state"]) for c in calls] == [
        ("+15550001111", "pending"), ("+15550002222", "pending"), ("12345", "skipped")]
    listing = await (await api.client.get("/campaigns", headers=AUTH)).json()
    assert [(c["id"], c["status"], c["created_at"]) for c in listing["campaigns"]] == [
        (created["id"], "running", progress["created_at"])]


async def test_create_from_csv(api: Api) -> None:
    await api.dnc.add(["+15550003333"])
    csv = ("to,first_name,timezone\n+15550001111,Ann,America/Chicago\n"
           "+15550002222,Bob,\n+15550003333,Cy,\n")
    resp = await api.client.post(
        "/campaigns?name=CSV%20run&concurrency=3&retries=busy:2&window=09:00-17:00"
        "&timezone=Europe/Paris&voicemail=Please%20call%20back",
        data=csv.encode(), headers={**AUTH, "Content-Type": "text/csv; charset=utf-8"})
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["total"] == 3 and created["skipped"] == {"do-not-call": 1}
    progress = await (await api.client.get(f"/campaigns/{created['id']}", headers=AUTH)).json()
    settings = progress["settings"]
    assert (settings["name"], settings["concurrency"], settings["retries"]) == (
        "CSV run", 3, {"busy": 2})
    assert settings["window"] == {"start": "09:00", "end": "17:00", "timezone": "Europe/Paris"}
    assert settings["voicemail"] == "Please call back"
    campaign = await api.store.get(created["id"])
    assert campaign is not None and campaign.spec.concurrency == 3


async def test_pause_resume_cancel_routes(api: Api) -> None:
    resp = await api.client.post("/campaigns", headers=AUTH, json={
        "name": "x", "calls": [{"to": "+15550001111"}]})
    cid = (await resp.json())["id"]
    for action, status in (("pause", "paused"), ("resume", "running"),
                           ("cancel", "cancelled")):
        resp = await api.client.post(f"/campaigns/{cid}/{action}", headers=AUTH)
        assert resp.status == 200 and (await resp.json())["status"] == status
    resp = await api.client.post(f"/campaigns/{cid}/resume", headers=AUTH)
    assert resp.status == 409
    assert (await resp.json())["error"] == f"campaign {cid} is cancelled: it cannot resume"
    resp = await api.client.post(f"/campaigns/{cid}/restart", headers=AUTH)
    assert resp.status == 404 and "pause, resume or cancel" in (await resp.json())["error"]
    resp = await api.client.post("/campaigns/cmp_nope/pause", headers=AUTH)
    assert resp.status == 404 and (await resp.json())["error"] == "no campaign cmp_nope"


async def test_do_not_call_route(api: Api) -> None:
    resp = await api.client.post("/do-not-call", headers=AUTH,
                                 json={"numbers": ["+1 555 000 1111", "+15550002222"]})
    assert resp.status == 200
    assert await resp.json() == {"added": ["+15550001111", "+15550002222"], "listed": 2}
    assert "+15550001111" in api.dnc
    resp = await api.client.post("/do-not-call", headers=AUTH,
                                 json={"numbers": ["+15550001111", "call me maybe"]})
    assert resp.status == 400
    assert (await resp.json())["error"].startswith("numbers[1] must start with +")
    resp = await api.client.post("/do-not-call", headers=AUTH, json={"numbers": []})
    assert resp.status == 400


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "error"), [
    ("POST", "/campaigns", {"data": b"{", "headers": {"Content-Type": "application/json"}},
     400, "the body is not JSON"),
    ("POST", "/campaigns", {"json": {"name": "x"}}, 400, "calls must be a non-empty list"),
    ("POST", "/campaigns", {"json": {"name": "x", "calls": [{"to": "+15550001111"}],
                                     "prompt": {"id": "sales"}}}, 400, "prompt: unknown prompt"),
    ("POST", "/campaigns", {"data": b"to\n", "headers": {"Content-Type": "text/csv"}},
     400, "the CSV has no rows below its header"),
    ("POST", "/campaigns", {"data": b"\xff\xfe", "headers": {"Content-Type": "text/csv"}},
     400, "the CSV is not UTF-8 text"),
    ("POST", "/campaigns", {"data": b"to\n+15550001111\n",
                            "headers": {"Content-Type": "text/csv"}}, 400, "name is required"),
    ("POST", "/campaigns", {"data": b"x", "headers": {"Content-Type": "text/plain"}},
     415, "send JSON (application/json) or CSV (text/csv)"),
    ("POST", "/campaigns", {"data": b"to\n" + b"+15550001111\n" * 6000,
                            "headers": {"Content-Type": "text/csv"}}, 413, "larger than"),
    ("DELETE", "/campaigns", {}, 405, "DELETE is not allowed here: use GET, POST"),
    ("GET", "/campaigns/cmp_nope", {}, 404, "no campaign cmp_nope"),
    ("PUT", "/do-not-call", {}, 405, "PUT is not allowed here: use POST"),
])
async def test_errors_are_json(api: Api, method: str, path: str, kwargs: dict[str, object],
                               status: int, error: str) -> None:
    headers = {**AUTH, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    resp = await api.client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert error in (await resp.json())["error"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/campaigns"), ("GET", "/campaigns"), ("GET", "/campaigns/x"),
    ("POST", "/campaigns/x/pause"), ("POST", "/do-not-call")])
async def test_every_route_needs_an_operator(api: Api, method: str, path: str) -> None:
    resp = await api.client.request(method, path, json={"numbers": ["+15550001111"]},
                                    headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    assert await resp.json() == {"error": "unauthorized"}
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="operators"'
    assert len(api.dnc) == 0 and await api.store.list_campaigns() == []


async def test_without_a_database_campaigns_answer_503(aiohttp_client: MakeClient,
                                                       tmp_path: Path) -> None:
    assert open_campaign_store("off") is None
    app = web.Application()
    add_routes(app, campaigns=lambda: None, do_not_call=lambda: None, authorize=authorize)
    client = await aiohttp_client(app)
    resp = await client.get("/campaigns/x", headers=AUTH)
    assert resp.status == 503
    assert (await resp.json())["error"] == "campaigns need a database (DATABASE_URL is off)"
