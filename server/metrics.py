"""Prometheus metrics, /metrics, /healthz and /readyz.

Each app has its own CollectorRegistry, so several apps in one process (tests) never collide.
Nothing here runs per audio frame: frames are counted by the call on its record (one int
increment), and moved onto `bridge_frames_total` at a call's end, at each scrape, and every
few seconds by a small task of the app's.

With WORKERS>1 every scrape must show the whole machine, not the one worker the kernel handed
the connection to: the supervisor (server.workers) gives its workers a fresh directory in
PROMETHEUS_MULTIPROC_DIR, each worker's metrics live in files there (prometheus-client's
multiprocess mode), and /metrics sums them. That mode has no callback gauges and no custom
collectors, hence a live-sum gauge moved by inc/dec and frame counters moved in steps.
One process (WORKERS=1, tests) keeps its metrics in memory, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from server.call.events import (
    BargeIn,
    CallEnded,
    CallEvent,
    CallStarted,
    ModelErrored,
    ModelReady,
    ReplyStarted,
    ToolFinished,
)

if TYPE_CHECKING:
    from server.call.call import Call
    from server.call.record import CallRecord

log = logging.getLogger("server.metrics")

LATENCY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)
SETUP_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
READY_PING_TIMEOUT = 2.0
FRAMES_EVERY = 5.0  # seconds between moves of bridge_frames_total for live calls
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# bridge_calls_refused_total{reason}: a call turned away before it could start
REFUSED_CAPACITY = "capacity"  # MAX_CALLS reached (the webhook answered busy)
REFUSED_BAD_TOKEN = "bad_token"  # a stream with a missing, forged, expired or spent token
REFUSED_DUPLICATE = "duplicate_stream"  # a second live stream for one CallSid
REFUSED_DRAINING = "draining"  # the instance is shutting down
REFUSED_REASONS = (REFUSED_CAPACITY, REFUSED_BAD_TOKEN, REFUSED_DUPLICATE, REFUSED_DRAINING)


def multiprocess_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR when set (by the WORKERS supervisor), with prometheus-client
    switched to its file-backed values: it chooses them once, at import, and the supervisor
    imported it (checking the settings) before the directory existed."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return path


@dataclass(slots=True)
class _Live:
    """A live call's record and how many of its frames are already on the counter."""

    record: CallRecord
    frames_in: int = 0
    frames_out: int = 0


class Metrics:
    """Every metric of one app; the calls' metrics feature moves them."""

    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.live: dict[int, _Live] = {}  # id(record): records are not hashable
        # livesum: the sum over running workers (a dead worker's calls are not live)
        self.calls_active = Gauge("bridge_calls_active", "Calls being relayed now",
                                  registry=r, multiprocess_mode="livesum")
        self.calls_total = Counter("bridge_calls_total",
                                   "Calls ended, by kind of ending and direction",
                                   ["end", "direction"], registry=r)
        self.calls_refused = Counter(
            "bridge_calls_refused_total",
            "Calls turned away before they started, by reason", ["reason"], registry=r)
        for reason in REFUSED_REASONS:
            self.calls_refused.labels(reason=reason)  # shown at 0 before the first one
        frames = Counter("bridge_frames_total",
                         "Media frames relayed, 20 ms each (in: caller to model; out: model "
                         "audio to the caller)", ["direction"], registry=r)
        self.frames_in, self.frames_out = frames.labels(direction="in"), frames.labels(
            direction="out")
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
        # Model sessions opened at the webhook that no stream has taken yet (pre-warm)
        self.prewarmed = Gauge("bridge_prewarmed_sessions",
                               "Model sessions opened at the webhook, not yet taken by a stream",
                               registry=r, multiprocess_mode="livesum")
        self.call_setup = Histogram(
            "bridge_call_setup_seconds",
            "Stream opened to the model session ready (session.updated)",
            buckets=SETUP_BUCKETS, registry=r)

    def on_call_event(self, call: Call, event: CallEvent) -> None:
        """The app's lossless listener on every call: the metrics move with its events, and
        each ending is counted here, once."""
        if isinstance(event, CallStarted):
            self.call_started(call.record)
        elif isinstance(event, ModelReady):
            if event.first:
                self.call_setup.observe(event.setup_seconds)
        elif isinstance(event, ReplyStarted):
            if event.latency is not None:
                self.response_latency.observe(event.latency)
        elif isinstance(event, BargeIn):
            self.barge_ins.inc()
        elif isinstance(event, ToolFinished):
            # The model may name a tool that does not exist: one label for all of those.
            tool = "unknown" if event.outcome == "unknown_tool" else event.name[:64]
            self.tool_calls.labels(tool=tool, outcome=event.outcome).inc()
        elif isinstance(event, ModelErrored):
            self.openai_errors.labels(code=event.code[:64]).inc()
        elif isinstance(event, CallEnded):
            self.call_ended(call.record, event.kind)
            if event.refused is not None:
                self.call_refused(event.refused)

    def call_started(self, record: CallRecord) -> None:
        if id(record) not in self.live:
            self.live[id(record)] = _Live(record)
            self.calls_active.inc()

    def call_ended(self, record: CallRecord, kind: str) -> None:
        """A call's end, counted once; also for an outbound call that never connected (it
        never started here: no frames, no live gauge)."""
        live = self.live.pop(id(record), None)
        if live is not None:
            self._count_frames(live)
            self.calls_active.dec()
        self.calls_total.labels(end=kind, direction=record.direction).inc()

    def call_refused(self, reason: str) -> None:
        """A call turned away before it started (one of REFUSED_REASONS)."""
        if reason not in REFUSED_REASONS:
            log.warning("refused-call reason %r is not one of %s; counted as is",
                        reason[:32], ", ".join(REFUSED_REASONS))
        self.calls_refused.labels(reason=reason[:32]).inc()

    def count_frames(self) -> None:
        """Move bridge_frames_total up to what the live calls have relayed so far."""
        for live in self.live.values():
            self._count_frames(live)

    def _count_frames(self, live: _Live) -> None:
        record = live.record
        if record.frames_in > live.frames_in:
            self.frames_in.inc(record.frames_in - live.frames_in)
            live.frames_in = record.frames_in
        if record.frames_out > live.frames_out:
            self.frames_out.inc(record.frames_out - live.frames_out)
            live.frames_out = record.frames_out

    async def count_frames_every(self, seconds: float) -> None:
        """Runs for the app's life: with WORKERS>1 a scrape reaches one worker, and the
        others' live calls must reach the shared files without waiting for their end."""
        while True:
            await asyncio.sleep(seconds)
            self.count_frames()

    def exposition(self) -> bytes:
        """The text format: this process's metrics, or every worker's summed."""
        self.count_frames()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        summed = CollectorRegistry()
        MultiProcessCollector(summed, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(summed)


def add_routes(app: web.Application, metrics: Metrics, *, token: str | None,
               draining: Callable[[], bool],
               ping: Callable[[], Awaitable[bool]] | None = None,
               frames_every: float = FRAMES_EVERY) -> None:
    """GET /metrics (bearer METRICS_TOKEN when set), /healthz, /readyz; and, for the app's
    life, the task that moves live calls' frames onto the counter every `frames_every`."""

    async def count_frames(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(
            metrics.count_frames_every(frames_every), name="metrics-frames")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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

    app.cleanup_ctx.append(count_frames)
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
