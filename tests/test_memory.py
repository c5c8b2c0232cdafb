"""What an ended call leaves in memory (issue 12): its decision, small and bounded in number,
and its spent stream token until the token expires. Counted in bytes (tracemalloc), not time.

`python -m server.testing.memory --only calls` measures the same through a real app."""

from __future__ import annotations

import gc
import logging
import tracemalloc
from uuid import uuid4

import pytest

from server.fleet.registry import DECISION_TTL
from server.fleet.state import MAX_DECISIONS, Expiring, MemoryState
from server.settings import Settings
from server.testing.memory import measure_calls
from server.wire import twilio as tw


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def decision(n: int) -> dict[str, str]:
    """What calls end with: mostly a hang-up, some the spoken fallback or a transfer."""
    if n % 3 == 0:
        return tw.say(Settings.fallback_message).to_dict()
    if n % 3 == 1:
        return tw.HANGUP.to_dict()
    return tw.dial("+15550003333").to_dict()


async def test_50000_ended_calls_keep_a_bounded_number_of_small_decisions() -> None:
    """Before: every decision kept for 10 minutes, each holding orjson's 4 KB buffer (50,000
    calls: about 210 MB). Now at most MAX_DECISIONS, under 1 KB each with its key."""
    calls = 50_000
    state = MemoryState()
    sids = ["CA" + uuid4().hex for _ in range(calls)]  # as the start frame's JSON gives them
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n, sid in enumerate(sids):
            await state.put_decision(sid, decision(n), DECISION_TTL)
        del sids
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    kept = len(state._decisions)
    assert kept == MAX_DECISIONS < calls
    assert held / kept < 1024, f"{held / kept:.0f} bytes per kept decision"
    assert held < MAX_DECISIONS * 1024


async def test_the_oldest_decisions_are_dropped_first(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    state = MemoryState(max_decisions=3)
    for sid in ("CA1", "CA2", "CA3"):
        await state.put_decision(sid, tw.HANGUP.to_dict(), DECISION_TTL)
    await state.put_decision("CA1", tw.say("again").to_dict(), DECISION_TTL)  # now the newest
    await state.put_decision("CA4", tw.HANGUP.to_dict(), DECISION_TTL)
    await state.put_decision("CA5", tw.HANGUP.to_dict(), DECISION_TTL)
    assert await state.get_decision("CA2") is None and await state.get_decision("CA3") is None
    assert await state.get_decision("CA1") == tw.say("again").to_dict()
    assert await state.get_decision("CA5") == tw.HANGUP.to_dict()
    assert caplog.text.count("dropping the oldest") == 1  # said once, not per call


async def test_expired_decisions_go_without_a_full_sweep() -> None:
    clock = Clock()
    state = MemoryState(clock=clock, wall=clock)
    for n in range(1000):
        await state.put_decision(f"CA{n}", tw.HANGUP.to_dict(), 60)
        clock.now += 1  # one call ends a second: at most the last minute's are kept
    assert len(state._decisions._items) <= 61
    assert await state.get_decision("CA999") == tw.HANGUP.to_dict()


async def test_spent_tokens_stay_spent_until_they_expire_then_go() -> None:
    """A token is never forgotten early (it could be replayed); once expired it takes no
    memory."""
    clock = Clock()
    state = MemoryState(clock=clock, wall=clock)
    tokens = [f"{int(clock.now) + 120}.{n}.mac" for n in range(20_000)]
    for token in tokens:
        assert await state.claim_token(token, clock.now + 120)
    assert not any([await state.claim_token(t, clock.now + 120) for t in tokens[::97]])
    clock.now += 121
    assert await state.claim_token("fresh", clock.now + 120)
    assert len(state._tokens._items) == 1


def test_expiring_renews_a_key_put_again() -> None:
    clock = Clock()
    items: Expiring[int] = Expiring(clock, limit=2)
    items.put("a", 1, 10)
    items.put("b", 2, 10)
    items.put("a", 3, 10)
    items.put("c", 4, 10)
    assert (items.get("a"), items.get("b"), items.get("c")) == (3, None, 4)
    assert items.dropped == 1


async def test_the_measurement_tool_finds_what_ended_calls_keep() -> None:
    """`python -m server.testing.memory --only calls`, tiny: real calls through a real app, and
    the decisions they leave attributed to the shared state."""
    result = await measure_calls(calls=12, warmup=3, concurrency=4, settle=0.0)
    assert result.calls == 12 and result.kept > 0
    assert any(where.startswith("fleet/state.py:") for where, size, _ in result.sources
               if size > 0), result.sources
