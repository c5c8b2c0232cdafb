"""Prometheus metrics moved by the metrics feature, /metrics with and without METRICS_TOKEN,
/healthz and /readyz (draining, database down)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server import metrics as metrics_module
from server.call.ending import Ending, EndKind
from server.call.events import BargeIn, ReplyStarted, ToolFinished
from server.metrics import REFUSED_REASONS, Metrics, add_routes
from server.models import events as ev
from server.testing.inbox import wait_until
from tests.fake_call import FakeCall

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: Client, **headers: str) -> str:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return await resp.text()


class Flags:
    def __init__(self) -> None:
        self.draining = False
        self.db_ok: bool | Exception = True
        self.slow = False

    async def ping(self) -> bool:
        if self.slow:
            await asyncio.sleep(10)
        if isinstance(self.db_ok, Exception):
            raise self.db_ok
        return self.db_ok


async def make_app(aiohttp_client: MakeClient, token: str | None = None,
                   frames_every: float = 5.0) -> tuple[Client, Metrics, Flags]:
    app = web.Application()
    metrics, flags = Metrics(), Flags()
    add_routes(app, metrics, token=token, draining=lambda: flags.draining, ping=flags.ping,
               frames_every=frames_every)
    return await aiohttp_client(app), metrics, flags


async def test_metrics_move_as_a_call_happens(aiohttp_client: MakeClient) -> None:
    client, metrics, _ = await make_app(aiohttp_client)
    call = FakeCall("CAm1")
    call.listen(metrics)
    call.record.session_ready_ms = 420.0
    await call.session_ready()
    call.record.frames_in += 150  # what the relay does per frame
    call.record.frames_out += 40
    await call.model_event(ev.SpeechStopped("item_U1", 3000))
    call.publish(ReplyStarted("resp_1", "item_A1", 420.0))
    call.publish(ReplyStarted("resp_1", "item_A2", None))  # same turn: one latency
    call.publish(BargeIn("item_A1", 500))
    call.publish(ToolFinished("lookup_order", "c1", "{}", "ok", "{}", 0.1))
    call.publish(ToolFinished("made_up_by_the_model", "c2", "{}", "unknown_tool", "{}", 0.0))
    await call.model_event(ev.ModelError("invalid_value", "bad", None, False))

    text = await scrape(client)
    assert value(text, "bridge_calls_active") == 1
    assert value(text, "bridge_frames_total", direction="in") == 150
    assert value(text, "bridge_frames_total", direction="out") == 40
    assert value(text, "bridge_call_setup_seconds_count") == 1
    assert value(text, "bridge_call_setup_seconds_sum") == pytest.approx(0.42)
    assert value(text, "bridge_response_latency_seconds_count") == 1
    assert value(text, "bridge_barge_ins_total") == 1
    assert value(text, "bridge_openai_errors_total", code="invalid_value") == 1
    assert value(text, "bridge_tool_calls_total", tool="lookup_order", outcome="ok") == 1
    assert value(text, "bridge_tool_calls_total", tool="unknown", outcome="unknown_tool") == 1

    second = FakeCall("CAm2")
    second.listen(metrics)
    second.record.frames_in += 10
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    call.record.frames_in += 1000  # after the end: no longer counted
    text = await scrape(client)
    assert value(text, "bridge_calls_active") == 1
    assert value(text, "bridge_calls_total", end="caller_hung_up", direction="inbound") == 1
    assert value(text, "bridge_frames_total", direction="in") == 160
    await second.finish(Ending(EndKind.OPENAI_ERROR, "OpenAI error session_expired"))
    text = await scrape(client)
    assert value(text, "bridge_calls_active") == 0
    assert value(text, "bridge_calls_total", end="openai_error", direction="inbound") == 1
    assert value(text, "bridge_frames_total", direction="in") == 160


async def test_apps_have_their_own_registries(aiohttp_client: MakeClient) -> None:
    one, m1, _ = await make_app(aiohttp_client)
    two, _, _ = await make_app(aiohttp_client)
    m1.barge_ins.inc()
    assert value(await scrape(one), "bridge_barge_ins_total") == 1
    assert value(await scrape(two), "bridge_barge_ins_total") == 0


async def test_metrics_token(aiohttp_client: MakeClient) -> None:
    client, _, _ = await make_app(aiohttp_client, token="scrape-me-please")
    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Basic scrape-me-please"},
                    {"Authorization": "Bearer scrape-me-pleasex"}):
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 401
        assert "bridge_" not in await resp.text()
    assert "bridge_calls_active" in await scrape(
        client, Authorization="Bearer scrape-me-please")
    assert (await client.get("/healthz")).status == 200  # probes need no token


async def test_health_and_readiness(aiohttp_client: MakeClient,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    client, _, flags = await make_app(aiohttp_client)

    async def status(path: str) -> tuple[int, Any]:
        resp = await client.get(path)
        return resp.status, (await resp.text()).strip()

    assert await status("/healthz") == (200, "ok")
    assert await status("/readyz") == (200, "ready")
    flags.draining = True
    assert await status("/readyz") == (503, "draining")
    assert (await status("/healthz"))[0] == 200
    flags.draining = False
    flags.db_ok = False
    assert await status("/readyz") == (503, "database unreachable")
    flags.db_ok = OSError("connection refused")
    assert await status("/readyz") == (503, "database unreachable")
    flags.db_ok, flags.slow = True, True
    monkeypatch.setattr(metrics_module, "READY_PING_TIMEOUT", 0.05)
    assert await status("/readyz") == (503, "database unreachable")


async def test_refused_calls_are_counted_by_reason(aiohttp_client: MakeClient) -> None:
    client, metrics, _ = await make_app(aiohttp_client)
    text = await scrape(client)
    assert set(REFUSED_REASONS) == {"capacity", "bad_token", "duplicate_stream", "draining"}
    for reason in REFUSED_REASONS:  # every reason is there from the start, at 0
        assert ("bridge_calls_refused_total", (("reason", reason),)) in samples(text)
    metrics.call_refused("capacity")
    metrics.call_refused("capacity")
    metrics.call_refused("bad_token")
    text = await scrape(client)
    assert value(text, "bridge_calls_refused_total", reason="capacity") == 2
    assert value(text, "bridge_calls_refused_total", reason="bad_token") == 1
    assert value(text, "bridge_calls_refused_total", reason="draining") == 0
    # a refusal is not an end
    assert value(text, "bridge_calls_total", end="rejected", direction="inbound") == 0


async def test_live_calls_frames_reach_the_counter_without_a_scrape(
    aiohttp_client: MakeClient,
) -> None:
    """With several workers a scrape reaches another process: this one's live calls must
    reach the counter on their own, a few times a minute (never per frame)."""
    _, metrics, _ = await make_app(aiohttp_client, frames_every=0.05)
    call = FakeCall("CAm3")
    call.listen(metrics)
    call.record.frames_in += 30
    call.record.frames_out += 4

    def counted(direction: str, n: int) -> bool:
        return metrics.registry.get_sample_value(
            "bridge_frames_total", {"direction": direction}) == n

    await wait_until(lambda: counted("in", 30) and counted("out", 4), 5.0, "frames counted")
    call.record.frames_in += 5
    await wait_until(lambda: counted("in", 35), 5.0, "more frames counted")
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    assert metrics.registry.get_sample_value("bridge_calls_active") == 0


def test_the_readme_documents_every_metric_and_label_value() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(bridge_\w+)[^`]*` \|(.*)$",
                                                       section, re.M)}
    names = {metric.name + ("_total" if metric.type == "counter" else "")
             for metric in Metrics().registry.collect()}
    assert names == set(rows)
    ends = {str(kind) for kind in EndKind}
    assert "admin_hung_up" in ends
    for end in ends:
        assert f"`{end}`" in rows["bridge_calls_total"], f"end label {end} not in the README"
    for reason in REFUSED_REASONS:
        assert f"`{reason}`" in rows["bridge_calls_refused_total"]
