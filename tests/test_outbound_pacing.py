"""OUTBOUND_CPS pacing: turns 1/cps apart, in one process and across instances on Redis."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis

from server.outbound.pacing import MemoryPaceStore, Pacer, RedisPaceStore
from server.testing.inbox import wait_until
from tests.redis_server import RedisServer, start_or_skip


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


async def test_turns_are_one_interval_apart_and_bursts_wait() -> None:
    t = FakeTime()
    pacer = Pacer(2.0, MemoryPaceStore(t.clock), sleep=t.sleep)  # 2 calls per second
    waits = [await pacer.wait_turn() for _ in range(4)]
    assert waits == [0.0, 0.5, 1.0, 1.5]
    assert t.slept == [0.5, 1.0, 1.5]  # the first goes at once
    t.now += 10  # idle for a while: no credit is saved up beyond "now"
    assert await pacer.wait_turn() == 0.0
    assert await pacer.wait_turn() == 0.5


async def test_concurrent_callers_get_distinct_turns() -> None:
    t = FakeTime()
    pacer = Pacer(1.0, MemoryPaceStore(t.clock), sleep=t.sleep)
    waits = await asyncio.gather(*(pacer.wait_turn() for _ in range(5)))
    assert sorted(waits) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_cps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Pacer(0)


async def test_two_instances_share_turns_through_redis(redis_server: RedisServer,
                                                       redis_prefix: str) -> None:
    clients = [Redis.from_url(redis_server.url) for _ in range(2)]
    try:
        stores = [RedisPaceStore(c, prefix=redis_prefix) for c in clients]
        # Alternate between the two instances, back to back: every turn is a second after
        # the previous one, whoever asked (apart, each would go at once).
        waits = [await stores[i % 2].reserve("outbound", 1.0) for i in range(6)]
        for n, wait in enumerate(waits):
            assert n - 0.3 <= wait <= n, waits
        other = await stores[0].reserve("another-account", 1.0)
        assert other == 0.0  # keys are separate
    finally:
        for c in clients:
            await c.aclose()


async def test_without_redis_an_instance_paces_itself(caplog: pytest.LogCaptureFixture) -> None:
    server = start_or_skip()
    client = Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        t = FakeTime()
        store = RedisPaceStore(client, prefix="test-down:", clock=t.clock)
        assert await store.reserve("outbound", 1.0) == 0.0
        server.stop()
        caplog.set_level(logging.INFO, logger="server.outbound")
        waits = [await store.reserve("outbound", 1.0) for _ in range(3)]
        assert waits == [0.0, 1.0, 2.0]  # the local fallback, on the injected clock
        assert caplog.text.count("outbound pacing without Redis") == 1
        server.start()

        async def shared_again() -> bool:
            await store.reserve("outbound", 1.0)
            return "outbound pacing shared through Redis again" in caplog.text

        await wait_until(shared_again, what="pacing through Redis again")
    finally:
        await client.aclose()
        server.cleanup()
