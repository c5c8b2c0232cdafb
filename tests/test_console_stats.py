"""What the console's history needs from the records: `GET /calls?end_kind=`, `?status=live`,
`GET /stats` (calls per hour, a latency histogram, endings) on SQLite and PostgreSQL, and the
records' `operator_actions`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from server.call.record import CallRecord
from server.console.auth import Operators
from server.records import api
from server.records.store import LATENCY_EDGES_MS, CallQuery, RecordStore, StatsQuery
from tests import test_records
from tests.console_fake import ANN
from tests.test_records import T0, make_record

pg_url = test_records.pg_url
store_url = test_records.store_url
store = test_records.store

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
AUTH = {"Authorization": f"Bearer {ANN}"}


async def seed(store: RecordStore) -> None:
    """Three calls in T0's hour, two two hours later, one before and one after the window."""
    calls: list[tuple[str, timedelta, str | None, Any]] = [
        ("CA1", timedelta(minutes=1), "caller_hung_up", [100, 300]),
        ("CA2", timedelta(minutes=30), "caller_hung_up", [600.5]),
        ("CA3", timedelta(minutes=59, seconds=59), None, []),  # still going
        ("CA4", timedelta(hours=2, minutes=5), "transferred", [1200, 6000]),
        ("CA5", timedelta(hours=2, minutes=6), "transferred", ["fast", None]),  # not numbers
        ("CA6", timedelta(hours=2, minutes=7), "idle", {"ms": 70}),  # not even a list
        ("CA0", timedelta(seconds=-1), "caller_hung_up", [50]),  # before the window
        ("CA9", timedelta(hours=5), "openai_error", [50]),  # after it
    ]
    for sid, offset, kind, latencies in calls:
        record = make_record(sid, T0 + offset)
        record.end_kind = kind
        saved = record.to_dict()
        saved["latencies_ms"] = latencies  # as stored, whatever wrote it
        await store.save(saved)


async def test_stats_count_per_hour_latency_and_endings(store: RecordStore) -> None:
    await seed(store)
    stats = await store.stats(StatsQuery(since=T0, until=T0 + timedelta(hours=3)))
    assert stats["calls"] == 6
    assert stats["per_hour"] == [{"hour": "2025-03-01T12:00:00Z", "calls": 3},
                                 {"hour": "2025-03-01T14:00:00Z", "calls": 3}]
    assert stats["endings"] == [{"kind": "caller_hung_up", "calls": 2},
                                {"kind": "transferred", "calls": 2}, {"kind": None, "calls": 1},
                                {"kind": "idle", "calls": 1}]
    latency = stats["latency_ms"]
    counts = [b["count"] for b in latency["buckets"]]
    # 100 <250, 300 <500, 600.5 <750, 1200 <1250, 6000 in the open last bucket
    assert counts == [1, 1, 1, 0, 1, 0, 0, 0, 0, 1]
    assert [b["from"] for b in latency["buckets"]] == [0, *LATENCY_EDGES_MS]
    assert latency["buckets"][-1]["to"] is None
    assert latency["count"] == 5 and latency["max"] == 6000
    assert latency["mean"] == round((100 + 300 + 600.5 + 1200 + 6000) / 5, 1)
    assert latency["p50"] == 625.0  # the 2.5th of 5, half-way into 500-750
    assert stats["since"] == "2025-03-01T12:00:00.000Z"
    open_ended = await store.stats(StatsQuery(since=T0 + timedelta(hours=2)))
    assert open_ended["calls"] == 4 and open_ended["until"] is None
    empty = await store.stats(StatsQuery(since=T0 + timedelta(days=30)))
    assert empty["calls"] == 0 and empty["per_hour"] == []
    assert empty["latency_ms"]["count"] == 0 and empty["latency_ms"]["p50"] is None


async def test_calls_filter_by_ending(store: RecordStore) -> None:
    await seed(store)
    calls, _ = await store.page(CallQuery(end_kind="transferred"))
    assert [c["call_sid"] for c in calls] == ["CA5", "CA4"]
    calls, _ = await store.page(CallQuery(end_kind="transferred", limit=1))
    assert [c["call_sid"] for c in calls] == ["CA5"]
    calls, _ = await store.page(CallQuery(end_kind="nothing-like-it"))
    assert calls == []


async def client_for(tmp_path: Path, aiohttp_client: MakeClient,
                     live: api.LiveCalls | None = None) -> tuple[Client, RecordStore]:
    from server.records.store import SQLiteStore

    sqlite = SQLiteStore(tmp_path / "calls.db")
    await sqlite.open()
    app = web.Application()
    app.on_cleanup.append(lambda _: sqlite.close())
    if live is not None:
        app[api.LIVE_CALLS] = live
    api.add_routes(app, lambda: sqlite, Operators({"ann": ANN}))
    return await aiohttp_client(app), sqlite


async def test_the_http_api_for_the_history(tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client, sqlite = await client_for(tmp_path, aiohttp_client)
    await seed(sqlite)
    stats = await (await client.get("/stats", params={"since": "2025-03-01T12:00:00Z",
                                                      "until": "2025-03-01T15:00:00Z"},
                                    headers=AUTH)).json()
    assert stats["calls"] == 6 and len(stats["per_hour"]) == 2
    day = await (await client.get("/stats", params={"since": "2025-03-01",
                                                    "until": "2025-03-01"},
                                  headers=AUTH)).json()
    assert day["calls"] == 8  # a date-only `until` includes that day
    recent = await (await client.get("/stats", headers=AUTH)).json()
    assert recent["calls"] == 0  # the last 24 hours by default: the seed is in 2025
    for params in ({"since": "yesterday"}, {"since": "2025-03-02", "until": "2025-03-01"},
                   {"until": "2025-13-01"}):
        response = await client.get("/stats", params=params, headers=AUTH)
        assert response.status == 400, params
        assert "error" in await response.json()
    assert (await client.get("/stats")).status == 401
    page = await (await client.get("/calls", params={"end_kind": "transferred"},
                                   headers=AUTH)).json()
    assert [c["call_sid"] for c in page["calls"]] == ["CA5", "CA4"]
    bad = await client.get("/calls", params={"end_kind": "x" * 300}, headers=AUTH)
    assert bad.status == 400
    # Live calls come from whoever knows them; this server does not.
    response = await client.get("/calls", params={"status": "live"}, headers=AUTH)
    assert response.status == 503 and "error" in await response.json()
    assert (await client.get("/calls", params={"status": "ended"}, headers=AUTH)).status == 400


async def test_live_calls_in_the_records_shape(tmp_path: Path,
                                               aiohttp_client: MakeClient) -> None:
    summary = {"call_sid": "CAlive", "from": "+1555***1111", "direction": "inbound"}

    async def live() -> list[dict[str, Any]]:
        return [summary]

    client, _ = await client_for(tmp_path, aiohttp_client, live)
    page = await (await client.get("/calls", params={"status": "live"}, headers=AUTH)).json()
    assert page == {"calls": [summary], "next": None}


def test_operator_actions_are_kept_and_restored() -> None:
    record = make_record("CA1")
    version = record.version
    entry = record.add_operator_action("ann", "whisper", {"text": "offer the discount"})
    assert record.version > version
    assert set(entry) == {"time", "at", "operator", "action", "detail"}
    assert entry["time"].endswith("Z")
    saved = record.to_dict()
    assert saved["operator_actions"] == [entry]
    resumed = CallRecord(call_sid="CA1")
    resumed.restore(saved)
    resumed.add_operator_action("bob", "hangup")
    actions = resumed.to_dict()["operator_actions"]
    assert [(a["operator"], a["action"]) for a in actions] == [("ann", "whisper"),
                                                               ("bob", "hangup")]
