"""What the operator console shares across the fleet: the live calls' index, answers to
operator actions, and call audio between instances.

- The live calls' index: each instance keeps a summary of each of its live calls (who is
  speaking, the latest latency, tools running, who has taken it over); `calls()` reads the
  whole fleet's. In one process it is a dict; with Redis each instance writes its own hash
  `<prefix>live:<instance>` (listed in the set `<prefix>live-instances`), coalesced every
  FLUSH_EVERY and kept alive every KEEPALIVE, expiring LIVE_TTL after its instance stops.
- Answers: an operator action published on the shared state's control channel to the instance
  holding the call is answered through `reply` (a Redis list that the asking instance pops,
  `<prefix>reply:<uuid>`, with BLPOP).
- Audio: Redis pub/sub channels (`<prefix>listen:<CallSid>`, `<prefix>talk:<CallSid>`), each
  message a JSON list of strings; used only while someone listens or talks from another
  instance. A publish returns how many instances receive it (0: nobody listens any more).

Nothing here raises into a call: a Redis that fails is logged and answered with what this
instance knows (an empty index, no answer, nobody listening).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Mapping
from typing import Any, Protocol
from uuid import uuid4

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from server.fleet.redis import RedisState, mask_url, stop_tasks
from server.fleet.state import SharedState

log = logging.getLogger("server.fleet")

FLUSH_EVERY = 0.05  # changes to this instance's calls are written at most this often ...
KEEPALIVE = 5.0  # ... and its index is re-asserted this often
LIVE_TTL = 15.0  # an instance's index outlives its last write by this much (a crash)
REPLY_TTL = 10.0
_TIMEOUT = 2.0
_ERRORS = (RedisError, OSError, TimeoutError)


class Subscription(Protocol):
    async def get(self, timeout: float) -> list[str] | None:
        """The next message (a list of strings), or None when `timeout` passed without one."""

    async def close(self) -> None: ...


class LiveBoard(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def fleet(self) -> bool:
        """True when other instances may hold calls (Redis): the audio pipes are needed."""

    def put(self, call_sid: str, summary: Mapping[str, Any]) -> None:
        """This instance's live call, changed (its summary is read at the next write)."""

    def remove(self, call_sid: str) -> None:
        """This instance's call ended."""

    async def calls(self) -> list[dict[str, Any]]:
        """The live calls of the whole fleet (copies of their summaries)."""

    def reply_key(self) -> str:
        """A new place for one answer."""

    async def reply(self, key: str, answer: dict[str, Any]) -> None: ...

    async def wait_reply(self, key: str, timeout: float) -> dict[str, Any] | None:
        """The answer put at `key`, or None after `timeout`."""

    async def publish(self, channel: str, items: list[str]) -> int:
        """Send to whoever subscribed to `channel` (anywhere); how many got it."""

    async def subscribe(self, channel: str) -> Subscription:
        """Messages on `channel` from now on (subscribed when this returns)."""


class _QueueSubscription:
    def __init__(self, board: MemoryBoard, channel: str) -> None:
        self._board = board
        self.channel = channel
        self.queue: asyncio.Queue[list[str]] = asyncio.Queue(maxsize=500)

    async def get(self, timeout: float) -> list[str] | None:
        try:
            async with asyncio.timeout(timeout):
                return await self.queue.get()
        except TimeoutError:
            return None

    async def close(self) -> None:
        self._board.unsubscribe(self)


class MemoryBoard:
    """One process (or apps sharing one `MemoryState` in tests): dicts and futures."""

    fleet = False

    def __init__(self) -> None:
        self._calls: dict[str, Mapping[str, Any]] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._channels: dict[str, set[_QueueSubscription]] = {}

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to close (apps sharing a state share this board: each removes its calls)."""

    def put(self, call_sid: str, summary: Mapping[str, Any]) -> None:
        self._calls[call_sid] = summary

    def remove(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)

    async def calls(self) -> list[dict[str, Any]]:
        return [dict(summary) for summary in self._calls.values()]

    def reply_key(self) -> str:
        key = f"reply:{uuid4().hex}"
        self._replies[key] = asyncio.get_running_loop().create_future()
        return key

    async def reply(self, key: str, answer: dict[str, Any]) -> None:
        future = self._replies.get(key)
        if future is not None and not future.done():
            future.set_result(orjson.loads(orjson.dumps(answer)))  # JSON, as through Redis

    async def wait_reply(self, key: str, timeout: float) -> dict[str, Any] | None:
        future = self._replies.get(key)
        if future is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            return None
        finally:
            self._replies.pop(key, None)

    async def publish(self, channel: str, items: list[str]) -> int:
        receivers = 0
        for subscription in self._channels.get(channel, ()):
            with contextlib.suppress(asyncio.QueueFull):  # a reader that fell behind
                subscription.queue.put_nowait(list(items))
                receivers += 1
        return receivers

    async def subscribe(self, channel: str) -> Subscription:
        subscription = _QueueSubscription(self, channel)
        self._channels.setdefault(channel, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: _QueueSubscription) -> None:
        subscribers = self._channels.get(subscription.channel)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._channels[subscription.channel]


class _RedisSubscription:
    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub
        self._closed = False

    async def get(self, timeout: float) -> list[str] | None:
        if self._closed:
            return None
        try:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True,
                                                     timeout=timeout)
        except _ERRORS as e:
            log.warning("console audio from Redis failed: %s", type(e).__name__)
            await asyncio.sleep(min(timeout, 0.5))
            return None
        if message is None or message.get("type") != "message":
            return None
        try:
            items = orjson.loads(message["data"])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(items, list):
            return None
        return [item for item in items if isinstance(item, str)]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(_TIMEOUT):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisBoard:
    """Redis: a writer task owns every index write; reads, replies and audio go straight."""

    fleet = True

    def __init__(self, url: str, *, prefix: str, instance_id: str | None = None) -> None:
        self.url = url
        self._prefix = prefix
        self.instance_id = instance_id or uuid4().hex
        self._redis = Redis.from_url(url, socket_timeout=_TIMEOUT + 3.0,
                                     socket_connect_timeout=_TIMEOUT)
        self._key = f"{prefix}live:{self.instance_id}"
        self._instances = f"{prefix}live-instances"
        self._calls: dict[str, Mapping[str, Any]] = {}
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write(),
                                                              name="redis-live-index")

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await stop_tasks([writer])
        with contextlib.suppress(*_ERRORS):  # this instance's calls are over
            async with asyncio.timeout(_TIMEOUT):
                await self._redis.delete(self._key)
                await self._redis.srem(self._instances, self.instance_id)
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(_TIMEOUT):
                await self._redis.aclose()

    # --- the index ---

    def put(self, call_sid: str, summary: Mapping[str, Any]) -> None:
        self._calls[call_sid] = summary
        self._removed.discard(call_sid)
        self._dirty.add(call_sid)
        self._wake.set()

    def remove(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)
        self._dirty.discard(call_sid)
        self._removed.add(call_sid)
        self._wake.set()

    async def _write(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KEEPALIVE):
                    await self._wake.wait()
            self._wake.clear()
            dirty, removed = self._dirty, self._removed
            self._dirty, self._removed = set(), set()
            try:
                async with asyncio.timeout(_TIMEOUT):
                    pipe = self._redis.pipeline(transaction=False)
                    values = {sid: orjson.dumps(self._calls[sid]) for sid in dirty
                              if sid in self._calls}
                    if values:
                        pipe.hset(self._key, mapping=values)  # type: ignore[arg-type]
                    if removed:
                        pipe.hdel(self._key, *removed)
                    if self._calls:
                        pipe.pexpire(self._key, int(LIVE_TTL * 1000))
                        pipe.sadd(self._instances, self.instance_id)
                    await pipe.execute()
                if self._failing:
                    self._failing = False
                    log.info("the live calls' index reaches Redis again")
            except _ERRORS as e:
                self._dirty |= dirty - set(self._removed)
                self._removed |= removed - set(self._calls)
                if not self._failing:
                    self._failing = True
                    log.warning("cannot write the live calls' index to Redis at %s (%s): "
                                "other instances' consoles miss this one's calls meanwhile",
                                mask_url(self.url), type(e).__name__)
                await asyncio.sleep(0.5)
                self._wake.set()
                continue
            await asyncio.sleep(FLUSH_EVERY)  # coalesce the next changes

    async def calls(self) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(_TIMEOUT):
                members = await self._redis.smembers(self._instances)
                instances = sorted(m.decode() if isinstance(m, bytes) else str(m)
                                   for m in members)
                pipe = self._redis.pipeline(transaction=False)
                for instance in instances:
                    pipe.hgetall(f"{self._prefix}live:{instance}")
                hashes = await pipe.execute()
                gone = [i for i, h in zip(instances, hashes, strict=True) if not h]
                if gone:
                    await self._redis.srem(self._instances, *gone)
        except _ERRORS as e:
            log.warning("reading the live calls' index from Redis failed (%s): this "
                        "instance's calls only", type(e).__name__)
            return [dict(summary) for summary in self._calls.values()]
        found: list[dict[str, Any]] = []
        for values in hashes:
            for raw in values.values():
                try:
                    summary = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(summary, dict):
                    found.append(summary)
        return found

    # --- answers ---

    def reply_key(self) -> str:
        return f"{self._prefix}reply:{uuid4().hex}"

    async def reply(self, key: str, answer: dict[str, Any]) -> None:
        if not key.startswith(f"{self._prefix}reply:"):
            log.warning("ignored a reply key that is not one of ours")
            return
        try:
            async with asyncio.timeout(_TIMEOUT):
                pipe = self._redis.pipeline(transaction=False)
                pipe.lpush(key, orjson.dumps(answer))
                pipe.pexpire(key, int(REPLY_TTL * 1000))
                await pipe.execute()
        except _ERRORS as e:
            log.warning("could not answer an operator action through Redis (%s)",
                        type(e).__name__)

    async def wait_reply(self, key: str, timeout: float) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(timeout + _TIMEOUT):
                found: Any = await self._redis.blpop([key], timeout=timeout)
        except _ERRORS as e:
            log.warning("waiting for an operator action's answer failed (%s)", type(e).__name__)
            return None
        if not found:
            return None
        try:
            answer = orjson.loads(found[1])
        except orjson.JSONDecodeError:
            return None
        return answer if isinstance(answer, dict) else None

    # --- audio ---

    async def publish(self, channel: str, items: list[str]) -> int:
        try:
            async with asyncio.timeout(_TIMEOUT):
                receivers = await self._redis.publish(self._prefix + channel, orjson.dumps(items))
        except _ERRORS as e:
            log.warning("console audio to Redis failed (%s)", type(e).__name__)
            return 0
        return int(receivers)

    async def subscribe(self, channel: str) -> Subscription:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        subscription = _RedisSubscription(pubsub)
        try:
            async with asyncio.timeout(_TIMEOUT):
                await pubsub.subscribe(self._prefix + channel)
        except _ERRORS as e:
            await subscription.close()
            raise ConnectionError(f"cannot subscribe in Redis: {type(e).__name__}") from e
        return subscription


_MEMORY: weakref.WeakKeyDictionary[SharedState, MemoryBoard] = weakref.WeakKeyDictionary()


def board_for(state: SharedState) -> LiveBoard:
    """The board that goes with a shared state: Redis beside a `RedisState` (its URL and
    prefix), else one in memory per state object (apps sharing a state share it)."""
    if isinstance(state, RedisState):
        return RedisBoard(state.url, prefix=state.prefix, instance_id=state.instance_id)
    board = _MEMORY.get(state)
    if board is None:
        board = _MEMORY[state] = MemoryBoard()
    return board
