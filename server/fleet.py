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

If Redis stops answering mid-run nothing raises into a call: each operation logs (once per
outage), falls back to this instance's own memory, and `ping()` turns False so /readyz can
report it. When Redis answers again, the heartbeat re-asserts the slots this instance holds.
Needs Redis >= 5 (a single primary; Redis Cluster is not supported: scripts touch keys they
compute).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from server.shared_state import (
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
TOKEN_MARGIN = 60.0  # keep spent tokens this much longer: another instance's clock may lag
_ERRORS = (RedisError, OSError, TimeoutError)

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


class RedisState:
    """`SharedState` in Redis. Create, `await start()`, use, `await close()`.

    `lease` is how long a silent instance keeps its slots (kill -9 frees them within it);
    the heartbeat runs every lease/3.3 seconds unless `heartbeat` is given. `timeout` bounds
    each Redis operation, so an outage costs a call at most that long per operation."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease: float = DEFAULT_LEASE,
        heartbeat: float | None = None,
        timeout: float = 2.0,
        instance_id: str | None = None,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.url = url
        self.instance_id = instance_id or uuid4().hex
        self._prefix = prefix
        self._lease_ms = max(1, round(lease * 1000))
        self._beat = heartbeat if heartbeat is not None else lease / 3.3
        self._local = MemoryState()  # this instance's view: held calls, fallbacks
        self._dispatcher = Dispatcher()
        try:
            self._redis = Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
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
        self._healthy = True
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
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task cancelled inside a redis-py read has been seen to miss its
            # cancellation; shutdown must not wait on it forever.
            _, stuck = await asyncio.wait(tasks, timeout=_CLOSE_WITHIN)
            for task in stuck:
                log.warning("Redis task %s did not stop within %g s; left behind",
                            task.get_name(), _CLOSE_WITHIN)
        await self._dispatcher.close()
        if not self._closed:
            try:
                await self._run(self._sync_script, self._keys2,
                                [self._prefix, self.instance_id, 0])
            except _ERRORS as e:
                log.warning("could not remove instance %s from Redis (its slots lapse with its "
                            "lease): %s", self.instance_id, e)
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
        try:
            await self._client().ping()
        except _ERRORS as e:
            self._failed("ping", e)
            return False
        self._ok()
        return True

    # -- tokens ------------------------------------------------------------------------------

    async def claim_token(self, token: str, expires_at: float) -> bool:
        ttl = expires_at - time.time()
        if ttl <= 0 or not await self._local.claim_token(token, expires_at):
            return False
        key = self._prefix + "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
        try:
            fresh = await self._client().set(
                key, b"1", nx=True, px=math.ceil((ttl + TOKEN_MARGIN) * 1000)
            )
        except _ERRORS as e:
            self._failed("stream token", e)
            return True  # checked against this instance's memory only
        self._ok()
        return bool(fresh)

    # -- capacity ----------------------------------------------------------------------------

    async def reserve(self, call_sid: str, max_calls: int, ttl: float) -> bool:
        try:
            ttl_ms = max(1, round(ttl * 1000))
            ok = await self._run(self._reserve, self._keys3,
                                 [self._prefix, call_sid, max_calls, ttl_ms])
        except _ERRORS as e:
            self._failed("reserve", e)
            return await self._local.reserve(call_sid, max_calls, ttl)  # this instance alone
        self._ok()
        if ok:
            await self._local.reserve(call_sid, 0, ttl)
        return bool(ok)

    async def claim(self, call_sid: str) -> bool:
        if self._local.holds(call_sid):
            return False
        try:
            result = await self._run(self._claim, self._keys3,
                                     [self._prefix, self.instance_id, call_sid])
        except _ERRORS as e:
            self._failed("claim", e)
            self._dirty = True
            return await self._local.claim(call_sid)  # checked on this instance only
        self._ok()
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
            await self._run(self._release, [self._k_owners, self._k_reserved],
                            [self._prefix, self.instance_id, call_sid, 1 if held else 0])
        except _ERRORS as e:
            self._failed("release", e)
            self._dirty = held or self._dirty
            return
        self._ok()

    async def active(self) -> int:
        try:
            n = await self._run(self._count, self._keys3, [self._prefix])
        except _ERRORS as e:
            self._failed("count", e)
            return await self._local.active()
        self._ok()
        return int(n)

    # -- decisions and handover context ------------------------------------------------------

    async def put_decision(self, call_sid: str, decision: dict[str, Any], ttl: float) -> None:
        raw = to_json(decision)
        await self._local.put_decision(call_sid, decision, ttl)  # a copy for Redis outages
        try:
            await self._client().set(self._prefix + "decision:" + call_sid, raw,
                                      px=max(1, round(ttl * 1000)))
        except _ERRORS as e:
            self._failed("decision", e)
            return
        self._ok()

    async def get_decision(self, call_sid: str, wait: float = 0.0) -> dict[str, Any] | None:
        """Polls with a short backoff (10 ms doubling to 100 ms) until `wait` has passed.
        Redis comes first (the latest decision, from any instance, wins); this instance's own
        copies answer when Redis cannot."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.01
        key = self._prefix + "decision:" + call_sid
        while True:
            try:
                raw = await self._client().get(key)
            except _ERRORS as e:
                self._failed("decision", e)
                raw = None
            else:
                self._ok()
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
        try:
            await self._client().set(self._prefix + "fetched:" + call_sid, b"1",
                                      px=round(FETCHED_TTL * 1000))
        except _ERRORS as e:
            self._failed("decision", e)
            return
        self._ok()

    async def fetched(self, call_sid: str) -> bool:
        if await self._local.fetched(call_sid):
            return True
        try:
            found = await self._client().exists(self._prefix + "fetched:" + call_sid)
        except _ERRORS as e:
            self._failed("decision", e)
            return False
        self._ok()
        return bool(found)

    async def put_context(self, call_sid: str, context: dict[str, Any], ttl: float) -> None:
        raw = to_json(context)
        try:
            await self._client().set(self._prefix + "context:" + call_sid, raw,
                                      px=max(1, round(ttl * 1000)))
        except _ERRORS as e:
            self._failed("context", e)
            await self._local.put_context(call_sid, context, ttl)  # only this instance sees it
            return
        self._ok()

    async def take_context(self, call_sid: str) -> dict[str, Any] | None:
        local = await self._local.take_context(call_sid)
        if local is not None:
            return local
        try:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.get(self._prefix + "context:" + call_sid)
                pipe.delete(self._prefix + "context:" + call_sid)
                raw, _ = await pipe.execute()
        except _ERRORS as e:
            self._failed("context", e)
            return None
        self._ok()
        return None if raw is None else from_json(raw, "handover context")

    # -- control -----------------------------------------------------------------------------

    async def publish(self, call_sid: str, action: dict[str, Any]) -> bool:
        if self._local.holds(call_sid):
            return await self._local_deliver(call_sid, action)
        payload = to_json({"call_sid": call_sid, "action": action})
        try:
            receivers = await self._run(self._publish, self._keys2,
                                        [self._prefix, call_sid, payload])
        except _ERRORS as e:
            self._failed("publish", e)
            return False
        self._ok()
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
        while True:
            await asyncio.sleep(self._beat)
            try:
                missing = await self._run(self._heartbeat, [self._k_instances],
                                          [self.instance_id, self._lease_ms])
                if missing or self._dirty:
                    if missing:
                        log.warning("instance %s had lost its lease; restoring its %d slot(s)",
                                    self.instance_id, len(self._local.held_calls()))
                    await self._sync()
            except _ERRORS as e:
                self._failed("heartbeat", e)
                continue
            self._ok()

    async def _listen_loop(self) -> None:
        delay = 0.05
        while True:
            pubsub = self._pubsub
            if pubsub is None:
                return
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except _ERRORS as e:
                # The next get_message reconnects and re-subscribes.
                self._failed("control channel", e)
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
            await self._sync()
        except _ERRORS as e:
            self._failed("heartbeat", e)
            self._dirty = True

    # -- health ------------------------------------------------------------------------------

    def _client(self) -> Redis:
        if self._closed:
            raise ConnectionError("the shared state is closed")
        return self._redis

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        return await script(keys=keys, args=args, client=self._client())

    def _failed(self, what: str, error: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            log.warning("Redis unavailable (%s: %s); calls continue on this instance's own "
                        "state until it is back", what, str(error) or type(error).__name__)
        else:
            log.debug("Redis still unavailable (%s: %s)", what, error)

    def _ok(self) -> None:
        if not self._healthy:
            self._healthy = True
            self._dirty = True
            log.info("Redis reachable again at %s", mask_url(self.url))
