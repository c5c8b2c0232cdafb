"""The shared-state layer: the same tests against MemoryState (one process) and RedisState (a
real redis-server on loopback, two instances sharing it), plus what only a fleet has: leases
that lapse when an instance dies, and an outage that degrades instead of failing calls."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from redis.asyncio import Redis

from server.fleet.open import open_state
from server.fleet.redis import RedisState, mask_url
from server.fleet.state import MemoryState, SharedState, SharedStateError
from server.settings import ConfigError, Settings
from tests.redis_server import RedisServer, free_port, start_or_skip

LEASE = 1.0  # short lease for tests: kill -9 must free capacity within it
ROOT = Path(__file__).resolve().parent.parent

MakeState = Callable[[], Awaitable[SharedState]]


def sid() -> str:
    return "CA" + uuid4().hex


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Poll `check` until it is true; the time it took. Fails after `within` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > within:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.02)
    return loop.time() - start


@pytest.fixture(params=["memory", "redis"])
async def make_state(request: pytest.FixtureRequest) -> AsyncIterator[MakeState]:
    """Makes "instances" of one shared store. Memory: one process is one instance, so every
    call returns the same state. Redis: a new RedisState on the shared server each time."""
    if request.param == "memory":
        memory = MemoryState()
        await memory.start()

        async def same() -> SharedState:
            return memory

        yield same
        await memory.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix: str = request.getfixturevalue("redis_prefix")
    made: list[RedisState] = []

    async def new() -> SharedState:
        state = RedisState(server.url, prefix=prefix, lease=LEASE)
        await state.start()
        made.append(state)
        return state

    yield new
    for state in made:
        await state.close()


# -- the contract, on both stores ----------------------------------------------------------


async def test_stream_tokens_are_single_use_across_instances(make_state: MakeState) -> None:
    a, b = await make_state(), await make_state()
    later = time.time() + 60
    assert await a.claim_token("tok-1", later) is True
    assert await b.claim_token("tok-1", later) is False
    assert await a.claim_token("tok-1", later) is False
    assert await b.claim_token("tok-2", later) is True
    assert await a.claim_token("tok-3", time.time() - 1) is False  # already expired


async def test_reserve_respects_max_calls_across_instances(make_state: MakeState) -> None:
    a, b = await make_state(), await make_state()
    one, two, three = sid(), sid(), sid()
    assert await a.reserve(one, max_calls=2, ttl=30)
    assert await b.reserve(two, max_calls=2, ttl=30)
    assert not await a.reserve(three, max_calls=2, ttl=30)
    assert not await b.reserve(three, max_calls=2, ttl=30)
    assert await b.reserve(one, max_calls=2, ttl=30)  # a retried webhook: same slot
    assert await a.active() == 2
    await b.claim(one)  # the stream landed on the other instance
    assert await a.active() == 2
    assert not await a.reserve(three, max_calls=2, ttl=30)
    await b.release(one)
    assert await a.reserve(three, max_calls=2, ttl=30)
    assert await b.reserve(sid(), max_calls=0, ttl=30)  # 0 = unlimited
    assert await a.active() == 3


async def test_concurrent_reserves_never_exceed_max_calls(make_state: MakeState) -> None:
    a, b = await make_state(), await make_state()
    results = await asyncio.gather(
        *(state.reserve(sid(), max_calls=5, ttl=30) for state in [a, b] * 15))
    assert results.count(True) == 5
    assert await b.active() == 5


async def test_reservations_expire_unless_claimed(make_state: MakeState) -> None:
    a, b = await make_state(), await make_state()
    claimed, lapsing = sid(), sid()
    assert await a.reserve(claimed, max_calls=0, ttl=0.3)
    assert await a.reserve(lapsing, max_calls=0, ttl=0.3)
    await b.claim(claimed)
    assert await a.active() == 2

    async def one_left() -> bool:
        return await a.active() == 1

    await eventually(one_left, within=3.0)
    assert await b.reserve(sid(), max_calls=2, ttl=30)  # the lapsed slot is free again
    await b.release(claimed)
    assert await a.active() == 1


async def test_release_keeps_a_handover_reservation(make_state: MakeState) -> None:
    """The `<Connect action>` for a handover can reserve before the old instance releases."""
    old, new = await make_state(), await make_state()
    call = sid()
    assert await old.reserve(call, max_calls=1, ttl=30)
    await old.claim(call)
    assert await new.reserve(call, max_calls=1, ttl=30)  # already counted: not refused
    await old.release(call)
    assert await new.active() == 1  # the reservation for the new stream is still there
    await new.claim(call)
    await new.release(call)
    assert await old.active() == 0


async def test_decisions_are_seen_everywhere_and_waited_for(make_state: MakeState) -> None:
    a, b = await make_state(), await make_state()
    call = sid()
    decision = {"kind": "dial", "to": "+15550001111", "say": "Connecting you."}
    assert await b.get_decision(call) is None
    waiter = asyncio.ensure_future(b.get_decision(call, wait=5.0))
    for _ in range(3):
        await asyncio.sleep(0)  # let it start waiting
    assert not waiter.done()
    started = time.monotonic()
    await a.put_decision(call, decision, ttl=30)
    assert await asyncio.wait_for(waiter, 5.0) == decision
    assert time.monotonic() - started < 1.0
    assert await a.get_decision(call) == decision  # read many times (Twilio may retry)
    await b.put_decision(call, {"kind": "hangup"}, ttl=30)
    assert await a.get_decision(call) == {"kind": "hangup"}  # the latest, from anywhere

    started = time.monotonic()
    assert await b.get_decision(sid(), wait=0.2) is None
    assert 0.15 <= time.monotonic() - started < 1.5


async def test_decisions_expire(make_state: MakeState) -> None:
    a, b = await make_state(), await make_state()
    call = sid()
    await a.put_decision(call, {"kind": "hangup"}, ttl=0.2)

    async def gone() -> bool:
        return await b.get_decision(call) is None

    await eventually(gone, within=3.0)


async def test_context_is_read_once(make_state: MakeState) -> None:
    a, b = await make_state(), await make_state()
    call = sid()
    context = {"turns": [{"role": "user", "text": "my order is A123"}], "voice": "alloy"}
    await a.put_context(call, context, ttl=30)
    assert await b.take_context(call) == context
    assert await a.take_context(call) is None
    assert await b.take_context(call) is None


async def test_values_must_be_json(make_state: MakeState) -> None:
    a = await make_state()
    with pytest.raises(TypeError):
        await a.put_decision(sid(), {"bad": {1, 2}}, ttl=30)


async def test_publish_reaches_the_instance_holding_the_call(make_state: MakeState) -> None:
    holder, other = await make_state(), await make_state()
    received: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def on_action(call_sid: str, action: dict[str, Any]) -> None:
        await received.put((call_sid, action))

    holder.on_control(on_action)
    other.on_control(on_action)
    call = sid()
    await holder.claim(call)
    assert await other.publish(call, {"action": "hangup", "by": "admin"}) is True
    assert await asyncio.wait_for(received.get(), 5.0) == (call, {"action": "hangup",
                                                                  "by": "admin"})
    assert await other.publish(sid(), {"action": "hangup"}) is False  # nobody holds it
    await holder.release(call)
    assert await other.publish(call, {"action": "hangup"}) is False
    assert received.empty()


async def test_ping(make_state: MakeState) -> None:
    assert await (await make_state()).ping() is True


# -- what only a fleet has ---------------------------------------------------------------

CHILD = """
import asyncio, sys
from server.fleet.redis import RedisState

async def main() -> None:
    state = RedisState(sys.argv[1], prefix=sys.argv[2], lease=float(sys.argv[3]))
    await state.start()
    for call_sid in sys.argv[4:]:
        await state.claim(call_sid)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_kill_9_of_an_instance_frees_its_capacity_within_the_lease(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    observer = RedisState(redis_server.url, prefix=redis_prefix, lease=LEASE)
    await observer.start()
    calls = [sid(), sid()]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, redis_server.url, redis_prefix, str(LEASE), *calls,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20.0) == b"ready\n"
        assert await observer.active() == 2
        assert not await observer.reserve(sid(), max_calls=2, ttl=30)
        assert await observer.publish(calls[0], {"action": "hangup"}) is True
        proc.kill()  # SIGKILL: no clean-up of any kind
        await proc.wait()

        async def unheard() -> bool:
            return not await observer.publish(calls[0], {"action": "hangup"})

        await eventually(unheard, within=LEASE)  # its subscription died with it...
        assert await observer.active() == 2  # ...while its lease still runs

        async def freed() -> bool:
            return await observer.active() == 0

        took = await eventually(freed, within=LEASE + 2.0)
        print(f"kill -9: capacity freed {took:.2f} s after the kill (lease {LEASE} s)")
        assert took <= LEASE + 0.5
        assert await observer.reserve(sid(), max_calls=2, ttl=30)
        assert await observer.publish(calls[0], {"action": "hangup"}) is False
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await observer.close()


async def test_closing_an_instance_frees_its_capacity_at_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    a = RedisState(redis_server.url, prefix=redis_prefix, lease=30.0)
    b = RedisState(redis_server.url, prefix=redis_prefix, lease=30.0)
    await a.start()
    await b.start()
    try:
        await a.claim(sid())
        await a.claim(sid())
        assert await b.active() == 2
        await a.close()  # without releasing its calls
        assert await b.active() == 0
    finally:
        await a.close()
        await b.close()


async def test_an_instance_that_lost_its_lease_restores_its_slots(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A stalled (not dead) instance is buried by the others; its next heartbeat puts its
    calls back, so the fleet does not over-admit while they go on."""
    a = RedisState(redis_server.url, prefix=redis_prefix, lease=LEASE)
    b = RedisState(redis_server.url, prefix=redis_prefix, lease=LEASE)
    raw = Redis.from_url(redis_server.url)
    await a.start()
    await b.start()
    try:
        call = sid()
        await a.claim(call)
        await raw.zrem(redis_prefix + "instances", a.instance_id)  # as if its lease lapsed
        assert await b.active() == 0

        async def restored() -> bool:
            return await b.active() == 1

        await eventually(restored, within=LEASE + 2.0)
        assert await b.publish(call, {"action": "hangup"}) is True
    finally:
        await raw.aclose()
        await a.close()
        await b.close()


async def test_malformed_control_messages_are_ignored(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    a = RedisState(redis_server.url, prefix=redis_prefix, lease=LEASE)
    raw = Redis.from_url(redis_server.url)
    await a.start()
    received: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def on_action(call_sid: str, action: dict[str, Any]) -> None:
        await received.put((call_sid, action))

    a.on_control(on_action)
    try:
        call = sid()
        await a.claim(call)
        channel = redis_prefix + "control:" + a.instance_id
        for junk in (b"not json", b"[1,2]", b'{"call_sid": 5, "action": {}}',
                     b'{"call_sid": "CAnotheld", "action": {"action": "hangup"}}'):
            await raw.publish(channel, junk)
        await raw.publish(channel, b'{"call_sid": "%s", "action": {"n": 1}}' % call.encode())
        assert await asyncio.wait_for(received.get(), 5.0) == (call, {"n": 1})
        assert received.empty()
    finally:
        await raw.aclose()
        await a.close()


async def test_redis_outage_degrades_and_recovers(redis_prefix: str) -> None:
    """Redis stops mid-run: nothing raises, ping() is False, this instance's own state is used;
    Redis comes back (empty): ping() is True and the held calls are counted again."""
    server = start_or_skip()
    a = RedisState(server.url, prefix=redis_prefix, lease=LEASE, timeout=0.5)
    try:
        await a.start()
        held = sid()
        await a.claim(held)
        await a.put_decision(held, {"kind": "hangup"}, ttl=30)
        server.stop()

        assert await a.ping() is False
        assert await a.active() == 1
        assert not await a.reserve(sid(), max_calls=1, ttl=30)  # counted on this instance
        assert await a.reserve(sid(), max_calls=5, ttl=30)
        later = time.time() + 60
        assert await a.claim_token("tok-outage", later) is True
        assert await a.claim_token("tok-outage", later) is False
        assert await a.get_decision(held, wait=0.1) == {"kind": "hangup"}
        assert await a.get_decision(sid(), wait=0.1) is None
        await a.put_context(held, {"turns": []}, ttl=30)
        assert await a.take_context(held) == {"turns": []}
        assert await a.publish(sid(), {"action": "hangup"}) is False

        server.start()  # same port, empty: the heartbeat must put our slot back

        async def recovered() -> bool:
            return await a.ping()

        await eventually(recovered, within=5.0)
        observer = RedisState(server.url, prefix=redis_prefix, lease=LEASE)
        await observer.start()
        try:
            async def counted() -> bool:
                return await observer.active() >= 1

            await eventually(counted, within=LEASE + 3.0)
            received: asyncio.Queue[str] = asyncio.Queue()

            async def on_action(call_sid: str, action: dict[str, Any]) -> None:
                await received.put(call_sid)

            a.on_control(on_action)

            async def heard() -> bool:  # its control channel re-subscribed
                return await observer.publish(held, {"action": "hangup"})

            await eventually(heard, within=5.0)
            assert await asyncio.wait_for(received.get(), 5.0) == held
        finally:
            await observer.close()
    finally:
        await a.close()
        server.cleanup()


async def test_a_stalled_redis_opens_the_circuit_and_a_probe_closes_it(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis frozen (SIGSTOP): the first failures are bounded by the timeout, then the
    circuit opens (one warning) and nothing waits on Redis any more; once it answers, the
    heartbeat's probe re-registers this instance's calls and Redis is used again."""
    server = start_or_skip()
    timeout = 0.5
    a = RedisState(server.url, prefix=redis_prefix, lease=LEASE, timeout=timeout)
    observer = RedisState(server.url, prefix=redis_prefix, lease=30.0)
    caplog.set_level("INFO", logger="server.fleet")
    try:
        await a.start()
        await observer.start()
        held = sid()
        await a.claim(held)
        loop = asyncio.get_running_loop()
        with server.stalled():
            started = loop.time()
            # What one call does from its webhook to its <Connect action>, all on this instance.
            assert await a.reserve(held, max_calls=5, ttl=30)
            assert await a.claim_token("tok-stall", time.time() + 60) is True
            await a.claim(held)
            await a.put_decision(held, {"kind": "hangup"}, ttl=30)
            assert await a.get_decision(held, wait=1.0) == {"kind": "hangup"}
            assert await a.get_decision(sid(), wait=0.2) is None
            assert await a.take_context(sid()) is None
            await a.release(held)
            await a.claim(held)
            took = loop.time() - started
            assert took < 2 * timeout + 0.2 + 0.5, f"{took:.2f} s spent with Redis frozen"
            assert a.circuit_open

            started = loop.time()  # open: Redis is not even asked
            for _ in range(20):
                assert not await a.reserve(sid(), max_calls=1, ttl=30)  # counted here: held
            assert await a.claim_token("tok-stall", time.time() + 60) is False
            assert loop.time() - started < timeout
            warnings = [r for r in caplog.records
                        if r.name == "server.fleet" and r.levelname == "WARNING"]
            assert len(warnings) == 1 and "not answering" in warnings[0].getMessage()

        async def recovered() -> bool:
            return not a.circuit_open  # the heartbeat's probe closes it

        await eventually(recovered, within=LEASE + 2 * timeout + 2.0)
        assert sum("answers again" in r.getMessage() for r in caplog.records) == 1
        # The frozen server saw every lease lapse; the probe put this instance's call back.
        assert await observer.active() == 1
        assert await observer.publish(held, {"action": "hangup"}) is True
        # Used again: a token claimed now is seen by the rest of the fleet.
        assert await a.claim_token("tok-after", time.time() + 60) is True
        assert await observer.claim_token("tok-after", time.time() + 60) is False
    finally:
        await observer.close()
        await a.close()
        server.cleanup()


async def test_unreachable_redis_at_startup_is_a_clear_error() -> None:
    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    state = RedisState(url, timeout=1.0)
    with pytest.raises(SharedStateError) as failed:
        await state.start()
    message = str(failed.value)
    assert "cannot use Redis at redis://:***@127.0.0.1:" in message
    assert "hunter2secret" not in message
    await state.close()  # safe after a failed start


def test_mask_url() -> None:
    assert mask_url("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert mask_url("rediss://:pw@[::1]:6380") == "rediss://:***@[::1]:6380"
    assert mask_url("redis://h/0") == "redis://h/0"


# -- settings and the factory --------------------------------------------------------------


async def test_open_state_picks_the_store(redis_server: RedisServer) -> None:
    memory = await open_state(Settings(openai_api_key="k"))
    assert isinstance(memory, MemoryState)
    await memory.close()
    fleet = await open_state(Settings(openai_api_key="k", redis_url=redis_server.url))
    assert isinstance(fleet, RedisState)
    assert isinstance(fleet, SharedState)
    await fleet.close()


def test_fleet_settings() -> None:
    env = {"OPENAI_API_KEY": "k"}
    plain = Settings.from_env(env)
    assert (plain.redis_url, plain.workers, plain.shutdown_mode) == (None, 1, "drain")
    fleet = Settings.from_env({**env, "REDIS_URL": "rediss://:pw@redis.internal:6380/2",
                               "WORKERS": "4", "SHUTDOWN_MODE": "handover"})
    assert (fleet.workers, fleet.shutdown_mode) == (4, "handover")
    assert "pw" in fleet.secrets
    assert "pw" not in repr(fleet)
    for name, value in [("REDIS_URL", "http://:pw@host"), ("REDIS_URL", "redis://"),
                        ("WORKERS", "0"), ("WORKERS", "65"), ("WORKERS", "2"),
                        ("SHUTDOWN_MODE", "pause")]:
        with pytest.raises(ConfigError) as bad:
            Settings.from_env({**env, name: value})
        assert bad.value.variable == name
        assert ":pw@" not in str(bad.value)
