"""`SharedState` in Redis, for a fleet of bridges (REDIS_URL).

Data model (every key under one prefix, default `phone-bridge:`):
- `instances`       ZSET instance id -> lease expiry (ms, Redis clock). Each instance refreshes
                    its own entry every ~lease/3; an entry past its expiry is a dead instance.
- `slots:<id>`      SET of call sids whose slot instance <id> holds (claimed streams).
- `owners`          HASH call sid -> instance id holding it (routes control actions).
- `reserved`        ZSET call sid -> reservation expiry (ms): webhooks awaiting their stream.
- `token:<sha256>`  single-use stream tokens (SET NX PX), the token itself is never stored.
- `decision:<sid>`, `context:<sid>`  JSON with a TTL.
- channel `control:<id>`  actions for the calls instance <id> holds.

Capacity is counted in one Lua script (atomic, so concurrent webhooks on different instances
cannot both take the last slot): expired reservations are dropped, dead instances are buried
(their slots and owner entries deleted), then live reservations plus live instances' slots are
counted. So a `kill -9` frees its calls' capacity within one lease, with no one cleaning up.
Times come from Redis's own clock (TIME), so instances' clocks need not agree.

If Redis stops answering mid-run nothing raises into a call, and no call waits long for it.
Every operation is bounded (`timeout`, 0.5 s) and falls back to this instance's own memory when
Redis fails. A circuit breaker stops the waiting: after `trip_after` (2) failures in a row the
instance goes local (logged once) and calls no longer touch Redis at all, so a frozen Redis costs
any one request at most about `trip_after * timeout` (1 s). The heartbeat then probes with one
PING per beat; when Redis answers, it re-asserts the slots this instance holds and the instance
uses Redis again (logged once). `ping()` is False meanwhile; readiness does not depend on it.
Needs Redis >= 5 (a single primary; Redis Cluster is not supported: scripts touch keys they
compute).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from server.fleet.state import (
    FETCHED_TTL,
    ControlHandler,
    Dispatcher,
    MemoryState,
    SharedStateError,
    from_json,
    to_json,
)

_CLOSE_WITHIN = 2.0
log = logging.getLogger("server.fleet")

DEFAULT_PREFIX = "phone-bridge:"
DEFAULT_LEASE = 5.0
DEFAULT_TIMEOUT = 0.5  # one operation, all of it (reconnect, health check, reply)
TRIP_AFTER = 2  # failures in a row that open the circuit: a request waits at most this many
TOKEN_MARGIN = 60.0  # keep spent tokens this much longer: another instance's clock may lag
_ERRORS = (RedisError, OSError, TimeoutError)
T = TypeVar("T")


class _CircuitOpen(RedisError):
    """Raised instead of calling Redis while the breaker is open: the caller falls back."""

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function bury(prefix, instances, owners, now)
  local dead = redis.call('ZRANGEBYSCORE', instances, '-inf', string.format('(%d', now))
  for _, id in ipairs(dead) do
    local slots = prefix .. 'slots:' .. id
    for _, sid in ipairs(redis.call('SMEMBERS', slots)) do
      if redis.call('HGET', owners, sid) == id then redis.call('HDEL', owners, sid) end
    end
    redis.call('DEL', slots)
    redis.call('ZREM', instances, id)
  end
end
local function count(prefix, instances, reserved, now)
  redis.call('ZREMRANGEBYSCORE', reserved, '-inf', string.format('%d', now))
  local n = redis.call('ZCARD', reserved)
  for _, id in ipairs(redis.call('ZRANGE', instances, 0, -1)) do
    n = n + redis.call('SCARD', prefix .. 'slots:' .. id)
  end
  return n
end
"""

# KEYS: instances, owners, reserved. ARGV: prefix, sid, max_calls, ttl_ms. -> 1 reserved, 0 full
_RESERVE = _PRELUDE + """
local now = now_ms()
bury(ARGV[1], KEYS[1], KEYS[2], now)
local n = count(ARGV[1], KEYS[1], KEYS[3], now)
local sid, max = ARGV[2], tonumber(ARGV[3])
local known = redis.call('ZSCORE', KEYS[3], sid) or redis.call('HEXISTS', KEYS[2], sid) == 1
if not known and max > 0 and n >= max then return 0 end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), sid)
return 1
"""

# KEYS: instances, owners, reserved. ARGV: prefix. -> active count
_COUNT = _PRELUDE + """
local now = now_ms()
bury(ARGV[1], KEYS[1], KEYS[2], now)
return count(ARGV[1], KEYS[1], KEYS[3], now)
"""

# KEYS: instances. ARGV: id, lease_ms. -> 1 if the instance was missing (buried or new)
_HEARTBEAT = _PRELUDE + """
return redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
"""

# KEYS: instances, owners, reserved. ARGV: prefix, id, sid.
# -> 1 claimed, 0 claimed but this instance is not registered (re-sync), -1 a live stream on a
#    live instance already holds the call (a duplicate: nothing changed)
_CLAIM = _PRELUDE + """
local sid, id = ARGV[3], ARGV[2]
local prev = redis.call('HGET', KEYS[2], sid)
if prev then
  local expiry = redis.call('ZSCORE', KEYS[1], prev)
  if expiry and tonumber(expiry) >= now_ms() then return -1 end
  redis.call('SREM', ARGV[1] .. 'slots:' .. prev, sid)
end
redis.call('ZREM', KEYS[3], sid)
redis.call('HSET', KEYS[2], sid, id)
redis.call('SADD', ARGV[1] .. 'slots:' .. id, sid)
if redis.call('ZSCORE', KEYS[1], id) then return 1 end
return 0
"""

# KEYS: owners, reserved. ARGV: prefix, id, sid, held (1/0).
_RELEASE = """
local sid, id = ARGV[3], ARGV[2]
if ARGV[4] == '1' then
  redis.call('SREM', ARGV[1] .. 'slots:' .. id, sid)
  if redis.call('HGET', KEYS[1], sid) == id then redis.call('HDEL', KEYS[1], sid) end
else
  redis.call('ZREM', KEYS[2], sid)
end
return 1
"""

# KEYS: instances, owners. ARGV: prefix, id, lease_ms (0 = leave), held sids...
# Makes Redis hold exactly this instance's slots; with lease 0 the instance leaves.
_SYNC = _PRELUDE + """
local prefix, id = ARGV[1], ARGV[2]
local slots = prefix .. 'slots:' .. id
for _, sid in ipairs(redis.call('SMEMBERS', slots)) do
  if redis.call('HGET', KEYS[2], sid) == id then redis.call('HDEL', KEYS[2], sid) end
end
redis.call('DEL', slots)
if tonumber(ARGV[3]) == 0 then
  redis.call('ZREM', KEYS[1], id)
  return 0
end
for i = 4, #ARGV do
  redis.call('SADD', slots, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], id)
end
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[3]), id)
return 1
"""

# KEYS: instances, owners. ARGV: prefix, sid, payload. -> receivers, or -1 if no live holder
_PUBLISH = _PRELUDE + """
local owner = redis.call('HGET', KEYS[2], ARGV[2])
if not owner then return -1 end
local expiry = redis.call('ZSCORE', KEYS[1], owner)
if not expiry or tonumber(expiry) < now_ms() then return -1 end
return redis.call('PUBLISH', ARGV[1] .. 'control:' .. owner, ARGV[3])
"""


def mask_url(url: str) -> str:
    """The URL with any password replaced, for log lines and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], within: float = _CLOSE_WITHIN) -> None:
    """Cancel tasks that talk to Redis and wait until they have ended. redis-py can swallow a
    cancellation that lands inside a command (redis/redis-py#2028; here about one command in
    two when cancelled mid-flight), and a task that missed it runs on: so one still running is
    cancelled again every 0.1 s. After `within` seconds one still running is left, with a
    WARNING: shutdown must not wait on it forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    running = {task for task in tasks if not task.done()}
    while running:
        for task in running:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, running = await asyncio.wait(running, timeout=min(0.1, left))
    for task in running:
        log.warning("Redis task %s did not stop within %g s; left behind", task.get_name(),
                    within)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("Redis task %s had failed: %r", task.get_name(), task.exception())


class RedisState:
    """`SharedState` in Redis. Create, `await start()`, use, `await close()`.

    `lease` is how long a silent instance keeps its slots (kill -9 frees them within it);
    the heartbeat runs every lease/3.3 seconds unless `heartbeat` is given. `timeout` bounds
    each Redis operation; after `trip_after` failures in a row Redis is left alone (the circuit
    is open) until the heartbeat's probe finds it answering."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease: float = DEFAULT_LEASE,
        heartbeat: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        trip_after: int = TRIP_AFTER,
        instance_id: str | None = None,
    ) -> None:
        if lease <= 0 or timeout <= 0 or trip_after < 1:
            raise ValueError("lease and timeout must be positive, trip_after at least 1")
        self.url = url
        self.instance_id = instance_id or uuid4().hex
        self._prefix = prefix
        self._lease_ms = max(1, round(lease * 1000))
        self._beat = heartbeat if heartbeat is not None else lease / 3.3
        self._local = MemoryState()  # this instance's view: held calls, fallbacks
        self._dispatcher = Dispatcher()
        self._timeout = timeout
        self._trip_after = trip_after
        self._failures = 0  # in a row
        self._open = False  # the breaker: True while this instance runs without Redis
        try:
            # A socket read or connect gives up a little before the whole operation does, so
            # the common case (one command, no reply) fails inside redis-py, cleanly; the
            # operation's own bound (`_call`) catches reconnects and health checks on top.
            # Only a dropped connection is retried (once): a timeout is not retried.
            self._redis = Redis.from_url(
                url,
                socket_timeout=timeout * 0.8,
                socket_connect_timeout=timeout * 0.8,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1,
                            supported_errors=(RedisConnectionError,)),
                health_check_interval=15,
                client_name=f"phone-bridge-{self.instance_id[:12]}",
            )
        except ValueError as e:
            raise SharedStateError(f"REDIS_URL {mask_url(url)}: {e}") from None
        self._closed = False
        self._reserve = self._redis.register_script(_RESERVE)
        self._count = self._redis.register_script(_COUNT)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._sync_script = self._redis.register_script(_SYNC)
        self._publish = self._redis.register_script(_PUBLISH)
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = False  # a write was lost: re-assert our slots on the next heartbeat
        self._k_instances = prefix + "instances"
        self._k_owners = prefix + "owners"
        self._k_reserved = prefix + "reserved"
        self._keys2 = [self._k_instances, self._k_owners]
        self._keys3 = [self._k_instances, self._k_owners, self._k_reserved]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register this instance and subscribe to its control channel.

        Raises SharedStateError naming the (masked) URL if Redis cannot be reached."""
        client = self._client()
        try:
            await client.ping()
            await self._sync()
            self._pubsub = client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(self._prefix + "control:" + self.instance_id)
        except (*_ERRORS, ValueError) as e:
            await self._close_clients()
            raise SharedStateError(f"cannot use Redis at {mask_url(self.url)}: {e}") from None
        log.info("shared state in Redis at %s (instance %s, lease %g s)",
                 mask_url(self.url), self.instance_id, self._lease_ms / 1000)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeat_loop(), name="redis-heartbeat"),
            loop.create_task(self._listen_loop(), name="redis-control"),
        ]

    async def close(self) -> None:
        """Stop, and give up this instance's slots (it is going away: its calls are over)."""
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks)
        await self._dispatcher.close()
        if not self._closed:
            try:
                await self._call("leave", lambda: self._run(
                    self._sync_script, self._keys2, [self._prefix, self.instance_id, 0]))
            except _ERRORS as e:
                log.warning("could not remove instance %s from Redis (its slots lapse with its "
                            "lease): %s", self.instance_id, str(e) or type(e).__name__)
        await self._close_clients()
        await self._local.close()

    async def _close_clients(self) -> None:
        if self._closed:
            return
        self._closed = True
        pubsub, self._pubsub = self._pubsub, None
        try:
            async with asyncio.timeout(_CLOSE_WITHIN):
                if pubsub is not None:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await self._redis.aclose()
        except TimeoutError:
            log.warning("Redis connections did not close within %g s; dropped", _CLOSE_WITHIN)

    async def ping(self) -> bool:
        """True when Redis answers; while the circuit is open this is the probe."""
        if self._open:
            return await self._probe()
        try:
            await self._call("ping", lambda: self._client().ping())
        except _ERRORS:
            return False
        return True

    @property
    def prefix(self) -> str:
        """The prefix of every key and channel (what the console's live board shares)."""
        return self._prefix

    @property
    def circuit_open(self) -> bool:
        """True while this instance runs on its own state, leaving Redis alone."""
        return self._open

    # -- tokens ------------------------------------------------------------------------------

    async def claim_token(self, token: str, expires_at: float) -> bool:
        ttl = expires_at - time.time()
        if ttl <= 0 or not await self._local.claim_token(token, expires_at):
            return False
        key = self._prefix + "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
        px = math.ceil((ttl + TOKEN_MARGIN) * 1000)
        try:
            fresh = await self._call("stream token",
                                     lambda: self._client().set(key, b"1", nx=True, px=px))
        except _ERRORS:
            return True  # checked against this instance's memory only
        return bool(fresh)

    # -- capacity ----------------------------------------------------------------------------

    async def reserve(self, call_sid: str, max_calls: int, ttl: float) -> bool:
        ttl_ms = max(1, round(ttl * 1000))
        try:
            ok = await self._call("reserve", lambda: self._run(
                self._reserve, self._keys3, [self._prefix, call_sid, max_calls, ttl_ms]))
        except _ERRORS:
            return await self._local.reserve(call_sid, max_calls, ttl)  # this instance alone
        if ok:
            await self._local.reserve(call_sid, 0, ttl)
        return bool(ok)

    async def claim(self, call_sid: str) -> bool:
        if self._local.holds(call_sid):
            return False
        try:
            result = await self._call("claim", lambda: self._run(
                self._claim, self._keys3, [self._prefix, self.instance_id, call_sid]))
        except _ERRORS:
            self._dirty = True
            return await self._local.claim(call_sid)  # checked on this instance only
        if int(result) < 0:
            return False
        await self._local.claim(call_sid)
        if not int(result):  # our lease lapsed and we were buried: restore every slot now
            await self._resync()
        return True

    async def release(self, call_sid: str) -> None:
        held = self._local.holds(call_sid)
        await self._local.release(call_sid)
        try:
            await self._call("release", lambda: self._run(
                self._release, [self._k_owners, self._k_reserved],
                [self._prefix, self.instance_id, call_sid, 1 if held else 0]))
        except _ERRORS:
            self._dirty = held or self._dirty

    async def active(self) -> int:
        try:
            n = await self._call("count", lambda: self._run(
                self._count, self._keys3, [self._prefix]))
        except _ERRORS:
            return await self._local.active()
        return int(n)

    # -- decisions and handover context ------------------------------------------------------

    async def put_decision(self, call_sid: str, decision: dict[str, Any], ttl: float) -> None:
        raw = to_json(decision)
        await self._local.put_decision(call_sid, decision, ttl)  # a copy for Redis outages
        key, px = self._prefix + "decision:" + call_sid, max(1, round(ttl * 1000))
        with contextlib.suppress(*_ERRORS):
            await self._call("decision", lambda: self._client().set(key, raw, px=px))

    async def get_decision(self, call_sid: str, wait: float = 0.0) -> dict[str, Any] | None:
        """Polls with a short backoff (10 ms doubling to 100 ms) until `wait` has passed.
        Redis comes first (the latest decision, from any instance, wins); this instance's own
        copies answer when Redis cannot. With the circuit open, only those are polled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.01
        key = self._prefix + "decision:" + call_sid
        while True:
            try:
                raw = await self._call("decision", lambda: self._client().get(key))
            except _ERRORS:
                raw = None
            if raw is not None:
                return from_json(raw, "decision")
            local = await self._local.get_decision(call_sid)
            if local is not None:
                return local
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    async def mark_fetched(self, call_sid: str) -> None:
        await self._local.mark_fetched(call_sid)
        key = self._prefix + "fetched:" + call_sid
        with contextlib.suppress(*_ERRORS):
            await self._call("decision", lambda: self._client().set(
                key, b"1", px=round(FETCHED_TTL * 1000)))

    async def fetched(self, call_sid: str) -> bool:
        if await self._local.fetched(call_sid):
            return True
        key = self._prefix + "fetched:" + call_sid
        try:
            found = await self._call("decision", lambda: self._client().exists(key))
        except _ERRORS:
            return False
        return bool(found)

    async def put_plan(self, call_sid: str, plan: dict[str, Any], ttl: float) -> None:
        await self._local.put_plan(call_sid, plan, ttl)  # a copy for Redis outages
        key, raw, px = self._prefix + "plan:" + call_sid, to_json(plan), max(1, round(ttl * 1000))
        with contextlib.suppress(*_ERRORS):
            await self._call("plan", lambda: self._client().set(key, raw, px=px))

    async def get_plan(self, call_sid: str) -> dict[str, Any] | None:
        key = self._prefix + "plan:" + call_sid
        try:
            raw = await self._call("plan", lambda: self._client().get(key))
        except _ERRORS:
            raw = None
        if raw is not None:
            return from_json(raw, "plan")
        return await self._local.get_plan(call_sid)

    async def put_context(self, call_sid: str, context: dict[str, Any], ttl: float) -> None:
        raw = to_json(context)
        key, px = self._prefix + "context:" + call_sid, max(1, round(ttl * 1000))
        try:
            await self._call("context", lambda: self._client().set(key, raw, px=px))
        except _ERRORS:
            await self._local.put_context(call_sid, context, ttl)  # only this instance sees it

    async def take_context(self, call_sid: str) -> dict[str, Any] | None:
        local = await self._local.take_context(call_sid)
        if local is not None:
            return local
        key = self._prefix + "context:" + call_sid

        async def take() -> Any:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.delete(key)
                raw, _ = await pipe.execute()
                return raw

        try:
            raw = await self._call("context", take)
        except _ERRORS:
            return None
        return None if raw is None else from_json(raw, "handover context")

    # -- control -----------------------------------------------------------------------------

    async def publish(self, call_sid: str, action: dict[str, Any]) -> bool:
        if self._local.holds(call_sid):
            return await self._local_deliver(call_sid, action)
        payload = to_json({"call_sid": call_sid, "action": action})
        try:
            receivers = await self._call("publish", lambda: self._run(
                self._publish, self._keys2, [self._prefix, call_sid, payload]))
        except _ERRORS:
            return False
        return int(receivers) > 0

    def on_control(self, handler: ControlHandler) -> None:
        self._dispatcher.handler = handler

    def holds(self, call_sid: str) -> bool:
        """True while this instance holds the call's slot."""
        return self._local.holds(call_sid)

    async def _local_deliver(self, call_sid: str, action: dict[str, Any]) -> bool:
        copy = from_json(to_json(action))
        return copy is not None and self._dispatcher.deliver(call_sid, copy)

    # -- background --------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Renew the lease every beat; while the circuit is open, probe instead."""
        while True:
            await asyncio.sleep(self._beat)
            if self._open:
                await self._probe()
                continue
            try:
                missing = await self._call("heartbeat", lambda: self._run(
                    self._heartbeat, [self._k_instances], [self.instance_id, self._lease_ms]))
                if missing or self._dirty:
                    if missing:
                        log.warning("instance %s had lost its lease; restoring its %d slot(s)",
                                    self.instance_id, len(self._local.held_calls()))
                    await self._call("heartbeat", self._sync)
            except _ERRORS:
                continue

    async def _listen_loop(self) -> None:
        delay = 0.05
        while True:
            pubsub = self._pubsub
            if pubsub is None:
                return
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except _ERRORS as e:
                # The next get_message reconnects and re-subscribes. Not counted by the
                # breaker: this socket idles by design, and no request waits on it.
                log.debug("Redis control channel: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            if message is None or message.get("type") != "message":
                continue
            body = from_json(message["data"], "control message")
            if body is None:
                continue
            call_sid, action = body.get("call_sid"), body.get("action")
            if not isinstance(call_sid, str) or not isinstance(action, dict):
                log.warning("ignoring a control message without call_sid and action")
            elif not self._local.holds(call_sid):
                log.info("control action for call %s ignored: no longer held here", call_sid)
            else:
                self._dispatcher.deliver(call_sid, action)

    async def _sync(self) -> None:
        held = self._local.held_calls()
        await self._run(self._sync_script, self._keys2,
                        [self._prefix, self.instance_id, self._lease_ms, *held])
        self._dirty = False

    async def _resync(self) -> None:
        try:
            await self._call("claim", self._sync)
        except _ERRORS:
            self._dirty = True

    # -- health ------------------------------------------------------------------------------

    def _client(self) -> Redis:
        if self._closed:
            raise ConnectionError("the shared state is closed")
        return self._redis

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        return await script(keys=keys, args=args, client=self._client())

    async def _call(self, what: str, op: Callable[[], Awaitable[T]], *,
                    probe: bool = False) -> T:
        """One Redis operation through the breaker: refused at once (`_CircuitOpen`) while
        the circuit is open, unless it is the probe; otherwise bounded by `timeout` as a whole,
        its failure counted. Raises what it failed with; callers fall back on `_ERRORS`."""
        if self._open and not probe:
            raise _CircuitOpen(f"{what} skipped: Redis is not answering")
        try:
            async with asyncio.timeout(self._timeout):
                result = await op()
        except _ERRORS as e:
            self._failed(what, e)
            raise
        if not probe:
            self._failures = 0
        return result

    async def _probe(self) -> bool:
        """One PING; if Redis answers, put this instance's lease and slots back (the outage
        may have outlived the lease) and close the circuit."""
        try:
            await self._call("probe", lambda: self._client().ping(), probe=True)
            await self._call("probe", self._sync, probe=True)
        except _ERRORS:
            return False
        if self._open:
            self._open, self._failures = False, 0
            log.info("Redis answers again at %s: using it again (%d call(s) of this instance "
                     "re-registered)", mask_url(self.url), len(self._local.held_calls()))
        return True

    def _failed(self, what: str, error: BaseException) -> None:
        self._failures += 1
        reason = str(error) or type(error).__name__
        if self._open:
            log.debug("Redis still not answering (%s: %s)", what, reason)
        elif self._failures >= self._trip_after:
            self._open = True
            log.warning("Redis is not answering (%s: %s, %d failures in a row): this instance "
                        "goes on with its own state (its calls, tokens and limits) and checks "
                        "Redis every %g s", what, reason, self._failures, self._beat)
        else:
            log.info("Redis %s failed (%s): this instance's own state answered", what, reason)
