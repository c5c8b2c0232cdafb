"""Prometheus metrics, /metrics, /healthz and /readyz.

Each app has its own CollectorRegistry, so several apps in one process (tests) never collide.
Nothing here runs per audio frame: frames are counted by the call on its record (one int
increment), and a custom collector sums live calls' counters plus finished calls' totals at
scrape time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.features.base import CallControl, Feature
    from server.record import CallRecord

log = logging.getLogger("server.metrics")

LATENCY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)
SETUP_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
READY_PING_TIMEOUT = 2.0


class Metrics:
    """Every metric of one app; the calls' metrics feature moves them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.live: dict[int, CallRecord] = {}  # id(record): records are not hashable
        self.finished_frames = {"in": 0, "out": 0}
        self.calls_active = Gauge("bridge_calls_active", "Calls being relayed now", registry=r)
        self.calls_active.set_function(lambda: len(self.live))
        self.calls_total = Counter("bridge_calls_total", "Calls ended, by kind of ending",
                                   ["end"], registry=r)
        self.response_latency = Histogram(
            "bridge_response_latency_seconds",
            "Caller's end of speech to the first reply audio sent to Twilio",
            buckets=LATENCY_BUCKETS, registry=r)
        self.barge_ins = Counter("bridge_barge_ins_total",
                                 "Times a caller talked over the assistant", registry=r)
        self.openai_errors = Counter("bridge_openai_errors_total",
                                     "OpenAI error events, by code", ["code"], registry=r)
        self.tool_calls = Counter("bridge_tool_calls_total", "Function calls run, by outcome",
                                  ["tool", "outcome"], registry=r)
        self.calls_refused = Counter(
            "bridge_calls_refused_total",
            "Calls turned away before they started, by reason (capacity, bad_token, "
            "duplicate_stream, draining)", ["reason"], registry=r)
        self.call_setup = Histogram(
            "bridge_call_setup_seconds",
            "Stream opened to the model session ready (session.updated)",
            buckets=SETUP_BUCKETS, registry=r)
        r.register(_FramesCollector(self))

    @property
    def feature(self) -> Callable[[CallControl], Feature]:
        """The factory to put in each call's feature list."""
        from server.features.metrics import CallMetrics

        return lambda call: CallMetrics(call, self)

    def call_started(self, record: CallRecord) -> None:
        self.live[id(record)] = record

    def call_ended(self, record: CallRecord, kind: str) -> None:
        if self.live.pop(id(record), None) is not None:
            self.finished_frames["in"] += record.frames_in
            self.finished_frames["out"] += record.frames_out
        self.calls_total.labels(end=kind).inc()

    def call_refused(self, reason: str) -> None:
        self.calls_refused.labels(reason=reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _FramesCollector(Collector):
    """bridge_frames_total{direction}: read at scrape time, never counted per frame."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        live = list(m.live.values())
        family = CounterMetricFamily("bridge_frames_total",
                                     "Media frames relayed (in: caller to model; out: model "
                                     "audio pieces to the caller)", labels=["direction"])
        family.add_metric(["in"], m.finished_frames["in"] + sum(r.frames_in for r in live))
        family.add_metric(["out"], m.finished_frames["out"] + sum(r.frames_out for r in live))
        yield family


def add_routes(app: web.Application, metrics: Metrics, *, token: str | None,
               draining: Callable[[], bool],
               ping: Callable[[], Awaitable[bool]] | None = None) -> None:
    """GET /metrics (bearer METRICS_TOKEN when set), /healthz, /readyz."""

    async def metrics_handler(request: web.Request) -> web.Response:
        if token is not None and not bearer_ok(request, token):
            return _unauthorized()
        return web.Response(body=metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if draining():
            return web.Response(status=503, text="draining\n")
        if ping is not None:
            try:
                async with asyncio.timeout(READY_PING_TIMEOUT):
                    ok = await ping()
            except TimeoutError:
                ok = False
            except Exception:
                ok = False
            if not ok:
                return web.Response(status=503, text="database unreachable\n")
        return web.Response(text="ready\n")

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def bearer_ok(request: web.Request, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _unauthorized() -> web.Response:
    return web.Response(status=401, text="unauthorized\n",
                        headers={"WWW-Authenticate": 'Bearer realm="bridge"'})
