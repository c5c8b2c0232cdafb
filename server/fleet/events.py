"""Calls' events beyond their own process: whoever asks, on any instance, can replay a call's
events from its start and then follow it live, and follow every call starting and ending.

Calls publish through their `EventStream`'s sinks; this never waits on the network: events go
into a bounded queue that one writer task drains (a slow or dead Redis loses events, with a
count in the log, and never slows a call). `MemoryBus` serves one process; `RedisBus`
(REDIS_URL) keeps, per call, a capped Redis Stream `<prefix>events:<CallSid>` (kept an hour after
the call ends) and one `<prefix>events:fleet` of every call's start and end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.fleet.redis import DEFAULT_PREFIX, mask_url, stop_tasks

log = logging.getLogger("server.fleet")

FLEET_TYPES = frozenset({"call.started", "call.ended"})
PER_CALL_MAX = 5000  # events kept per call in Redis (capped, approximately)
FLEET_MAX = 10000
KEEP_AFTER_END = 3600  # seconds a call's stream stays readable after the call ended
KEEP_WHILE_LIVE = 6 * 3600  # a stream whose end never came (a crashed instance) lapses too
QUEUE_MAX = 10000  # events waiting for the writer before new ones are dropped
BATCH = 200  # events written in one round trip
BLOCK_MS = 1000  # a follower's blocking read, before it looks again
HANDOVER_FOLLOW_S = 10.0  # a handed-over call is followed this long for its new stream
_ERRORS = (RedisError, OSError, TimeoutError)


class EventBus(Protocol):
    # True when every instance reads the same events (Redis): a handed-over call's events
    # from before and after the handover are all there.
    shared: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def publish(self, event: dict[str, Any]) -> None:
        """A call's event (JSON-ready, with its `call_sid`): queued, never awaited."""

    def call_events(self, call_sid: str) -> AsyncIterator[dict[str, Any]]:
        """That call's events from its start, then live, until it ends (a `call.ended`; with
        a shared bus, one that is not a handover's: the call goes on from another instance)."""

    def fleet_events(self) -> AsyncIterator[dict[str, Any]]:
        """Every call's `call.started` and `call.ended` from now on."""


class _Follower:
    """One reader of in-process events: a bounded queue, `dropped` markers when it lags."""

    def __init__(self, size: int = 1000) -> None:
        self.queue: deque[dict[str, Any]] = deque()
        self.size = size
        self.ready = asyncio.Event()
        self.lost = 0

    def put(self, event: dict[str, Any]) -> None:
        if len(self.queue) >= self.size:
            self.lost += 1
            return
        self.queue.append(event)
        self.ready.set()

    async def next(self) -> dict[str, Any]:
        while not self.queue:
            if self.lost:
                lost, self.lost = self.lost, 0
                return {"type": "dropped", "count": lost}
            self.ready.clear()
            await self.ready.wait()
        return self.queue.popleft()


class MemoryBus:
    """One process: events of calls live here are kept while they last (for late readers)."""

    shared = False

    def __init__(self, per_call: int = PER_CALL_MAX) -> None:
        self._calls: dict[str, deque[dict[str, Any]]] = {}
        self._per_call = per_call
        self._call_followers: dict[str, set[_Follower]] = {}
        self._fleet_followers: set[_Follower] = set()

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        for followers in (*self._call_followers.values(), self._fleet_followers):
            for follower in followers:
                follower.put({"type": "closed"})

    def publish(self, event: dict[str, Any]) -> None:
        call_sid = str(event.get("call_sid", ""))
        kind = event.get("type")
        history = self._calls.setdefault(call_sid, deque(maxlen=self._per_call))
        history.append(event)
        for follower in self._call_followers.get(call_sid, ()):
            follower.put(event)
        if kind in FLEET_TYPES:
            for follower in self._fleet_followers:
                follower.put(event)
        if kind == "call.ended":
            # A late reader of an ended call finds its record in the store, not here.
            self._calls.pop(call_sid, None)

    async def call_events(self, call_sid: str) -> AsyncIterator[dict[str, Any]]:
        follower = _Follower()
        for event in self._calls.get(call_sid, ()):
            follower.put(event)
        self._call_followers.setdefault(call_sid, set()).add(follower)
        try:
            while True:
                event = await follower.next()
                if event.get("type") == "closed":
                    return
                yield event
                if event.get("type") == "call.ended":
                    return
        finally:
            followers = self._call_followers.get(call_sid)
            if followers is not None:
                followers.discard(follower)
                if not followers:
                    del self._call_followers[call_sid]

    async def fleet_events(self) -> AsyncIterator[dict[str, Any]]:
        follower = _Follower()
        self._fleet_followers.add(follower)
        try:
            while True:
                event = await follower.next()
                if event.get("type") == "closed":
                    return
                yield event
        finally:
            self._fleet_followers.discard(follower)


class RedisBus:
    """Redis Streams. A writer task owns every write; each follower reads with its own
    blocking XREAD (a connection of the pool while it waits)."""

    shared = True

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX,
                 per_call: int = PER_CALL_MAX, queue_max: int = QUEUE_MAX) -> None:
        self.url = url
        self._prefix = prefix
        self._per_call = per_call
        # Blocking reads wait up to BLOCK_MS: the socket timeout must outlast them.
        self._redis = Redis.from_url(url, socket_timeout=BLOCK_MS / 1000 + 2.0,
                                     socket_connect_timeout=2.0)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_max)
        self._writer: asyncio.Task[None] | None = None
        self._dropped = 0
        self._failing = False
        self._closing = False

    def _key(self, call_sid: str) -> str:
        return f"{self._prefix}events:{call_sid}"

    @property
    def _fleet_key(self) -> str:
        return f"{self._prefix}events:fleet"

    async def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write(), name="redis-events")

    async def close(self) -> None:
        """Write what is queued (briefly), then stop."""
        self._closing = True
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._queue.join()
            await stop_tasks([writer])
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(2.0):
                await self._redis.aclose()

    def publish(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("events for Redis dropped (%d so far): the writer is behind",
                            self._dropped)

    async def _write(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._send(batch)
                if self._failing:
                    self._failing = False
                    log.info("events reach Redis again at %s", mask_url(self.url))
            except _ERRORS as e:
                if not self._failing:
                    self._failing = True
                    log.warning("cannot write events to Redis (%s): followers on other "
                                "instances miss them until it answers", type(e).__name__)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        async with asyncio.timeout(2.0):
            pipe = self._redis.pipeline(transaction=False)
            for event in batch:
                call_sid = str(event.get("call_sid", ""))
                data = {"e": orjson.dumps(event)}
                key = self._key(call_sid)
                pipe.xadd(key, data, maxlen=self._per_call, approximate=True)  # type: ignore[arg-type]
                kind = event.get("type")
                if kind in FLEET_TYPES:
                    pipe.xadd(self._fleet_key, data, maxlen=FLEET_MAX,  # type: ignore[arg-type]
                              approximate=True)
                    pipe.expire(key, KEEP_AFTER_END if kind == "call.ended" else KEEP_WHILE_LIVE)
            await pipe.execute()

    async def call_events(self, call_sid: str) -> AsyncIterator[dict[str, Any]]:
        key = self._key(call_sid)
        last = "0-0"
        handed_over: float | None = None  # when the call left an instance (monotonic)
        while not self._closing:
            try:
                found: Any = await self._redis.xread({key: last}, count=500, block=BLOCK_MS)
            except _ERRORS as e:
                log.warning("reading call %s's events from Redis failed (%s)", call_sid,
                            type(e).__name__)
                return
            if not found and handed_over is not None \
                    and time.monotonic() - handed_over > HANDOVER_FOLLOW_S:
                return  # no instance took the call up: the caller must have gone
            for _key, entries in found or ():
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    event = _decode(fields)
                    if event is None:
                        continue
                    handed_over = None
                    yield event
                    if event.get("type") == "call.ended":
                        if event.get("kind") != "handover":
                            return
                        handed_over = time.monotonic()

    async def fleet_events(self) -> AsyncIterator[dict[str, Any]]:
        last = "$"  # from now on
        while not self._closing:
            try:
                found: Any = await self._redis.xread({self._fleet_key: last}, count=500,
                                                     block=BLOCK_MS)
            except _ERRORS as e:
                log.warning("reading fleet events from Redis failed (%s)", type(e).__name__)
                await asyncio.sleep(1.0)
                continue
            for _key, entries in found or ():
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    event = _decode(fields)
                    if event is not None:
                        yield event


def _text(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def _decode(fields: Any) -> dict[str, Any] | None:
    raw = fields.get(b"e") if isinstance(fields, dict) else None
    try:
        event = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None
