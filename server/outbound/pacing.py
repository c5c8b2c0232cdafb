"""Pacing of outbound calls: at most OUTBOUND_CPS calls placed per second, fleet-wide.

Twilio queues calls above an account's CPS (1 by default) and rejects them once its queue is
full, so the bridge spaces its own requests. Each placement reserves the next free start time
("a turn") in a `PaceStore`: starts are `1/cps` seconds apart, whoever asks. In one process the
store is memory; across a fleet it is Redis (`RedisPaceStore`: one Lua script on Redis's own
clock, so instances' clocks need not agree). A turn reserved and then not used (the placement was
cancelled) is simply lost: pacing errs on the slow side.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("server.outbound")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
DEFAULT_KEY = "outbound"


class PaceStore(Protocol):
    async def reserve(self, key: str, interval: float) -> float:
        """Reserve the next start for `key`, `interval` seconds after the previous one (or now);
        the seconds to wait until it (0: go now)."""


class MemoryPaceStore:
    """One process's turns; `clock` is injectable for tests."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._next: dict[str, float] = {}

    async def reserve(self, key: str, interval: float) -> float:
        now = self._clock()
        start = max(now, self._next.get(key, now))
        self._next[key] = start + interval
        return start - now


# KEYS: the pace key. ARGV: interval in ms. -> ms to wait. Integer milliseconds throughout
# (string.format), so no float ever reaches Redis in exponent notation.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(now, nxt)
local interval = tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', start + interval),
           'PX', string.format('%d', start + interval - now + 1000))
return start - now
"""


class RedisPaceStore:
    """Turns shared by every instance on one Redis (key `<prefix>pace:<key>`).

    Each reservation is bounded by `timeout`; when Redis fails, this instance paces itself in
    memory (logged once, and once more when Redis answers again): calls go on, and the fleet's
    rate is at most `cps` times the instances meanwhile."""

    def __init__(self, redis: Redis, *, prefix: str = "phone-bridge:", timeout: float = 0.5,
                 clock: Clock = time.monotonic) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout = timeout
        self._script = redis.register_script(_RESERVE)
        self._local = MemoryPaceStore(clock)
        self._degraded = False

    async def reserve(self, key: str, interval: float) -> float:
        interval_ms = max(1, math.ceil(interval * 1000))
        try:
            async with asyncio.timeout(self._timeout):
                waited = await self._script(keys=[f"{self._prefix}pace:{key}"],
                                            args=[interval_ms])
        except (RedisError, OSError, TimeoutError) as e:
            if not self._degraded:
                self._degraded = True
                log.warning("outbound pacing without Redis (%s): this instance paces alone",
                            str(e) or type(e).__name__)
            return await self._local.reserve(key, interval)
        if self._degraded:
            self._degraded = False
            log.info("outbound pacing shared through Redis again")
        return max(0, int(waited)) / 1000


class Pacer:
    """`await pacer.wait_turn()` before each placement: returns once this call may be placed."""

    def __init__(self, cps: float, store: PaceStore | None = None, *, key: str = DEFAULT_KEY,
                 sleep: Sleep = asyncio.sleep) -> None:
        if not cps > 0:
            raise ValueError("calls per second must be positive")
        self.cps = cps
        self.interval = 1.0 / cps
        self._store = store or MemoryPaceStore()
        self._key = key
        self._sleep = sleep

    async def wait_turn(self) -> float:
        """Wait for this caller's turn; the seconds waited."""
        wait = await self._store.reserve(self._key, self.interval)
        if wait > 0:
            await self._sleep(wait)
        return wait
