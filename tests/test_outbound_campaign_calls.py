"""Campaigns end to end: POST /campaigns on one of two bridges behind one public URL, both
instances' schedulers placing real calls through the fake Twilio (TwiML, streams, status and
AMD callbacks reaching either instance), an injected clock for windows and retries; and a
restart mid-campaign."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from server.app import CAMPAIGN_CLOCK, OUTBOUND
from server.testing.inbox import wait_until
from server.testing.twilio_rest import Callee, FakeCall
from tests.outbound_rig import Line, MakeLine

START = 1_741_014_000.0  # 2025-03-03 15:00 UTC: 10:00 in New York, midnight in Tokyo
WINDOW = {"start": "09:00", "end": "18:00", "timezone": "America/New_York"}


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+1555020{n:04d}" for n in range(start, start + count)]


def injected(clock: Clock) -> Callable[[web.Application], None]:
    def prepare(app: web.Application) -> None:
        now: Callable[[], float] = clock
        app[CAMPAIGN_CLOCK] = now
    return prepare


def wake(line: Line) -> None:
    for i, rig in enumerate(line.rigs):
        if i in line.down:
            continue
        scheduler = rig.app[OUTBOUND].scheduler
        assert scheduler is not None
        scheduler.wake()


async def progress(line: Line, campaign: str) -> dict[str, Any]:
    status, body = await line.get(f"/campaigns/{campaign}", rig=line.rigs[-1])
    assert status == 200, body
    return dict(body)


async def until(line: Line, campaign: str, check: Callable[[dict[str, Any]], bool],
                what: str, timeout: float = 30.0) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def done() -> bool:
        seen.update(await progress(line, campaign))
        return check(seen)

    await wait_until(done, timeout, what, interval=0.05)
    return seen


def settled(p: dict[str, Any]) -> bool:
    return sum(int(p["states"][s]) for s in ("pending", "placing", "in_progress")) == 0


def most_at_once(calls: list[FakeCall], created: dict[str, float]) -> int:
    """The most calls placed and not yet ended at any moment (Twilio's side)."""
    edges = sorted([(created[c.sid], 1) for c in calls]
                   + [(c.ended_at or float("inf"), -1) for c in calls], key=lambda e: e[0])
    return max(itertools.accumulate(step for _, step in edges))


async def test_fifty_numbers_concurrency_five_across_two_instances(make_line: MakeLine) -> None:
    clock = Clock()
    line = await make_line(instances=2, prepare=injected(clock))
    listed = numbers(50)
    busy, tokyo, blocked = listed[:4], listed[4:9], listed[9:12]
    quick = Callee("human", audio=b"", amd_after_s=0.05, hang_up_after_s=0.3)
    line.fake.default = quick
    for number in busy:
        line.fake.callees[number] = Callee("busy", ring_s=0.05)
    line.rig.settings.do_not_call.write_text("".join(f"{n}\n" for n in blocked))
    calls = [{"to": n, "variables": {"i": str(i)}} for i, n in enumerate(listed)]
    for call in calls:
        if call["to"] in tokyo:
            call["timezone"] = "Asia/Tokyo"  # midnight there: outside its window
    status, created = await line.post("/campaigns", {
        "name": "spring reminders", "calls": calls, "concurrency": 5, "window": WINDOW,
        "retries": {"busy": 1}, "retry_after_s": 60})
    assert status == 201, created
    assert created["skipped"] == {"do-not-call": 3} and created["to_dial"] == 47
    campaign = created["id"]

    # Everyone in the window is called once; busy numbers wait for their retry, Tokyo's for
    # its morning.
    first = await until(line, campaign, lambda p: settled(p) and p["states"]["waiting"] == 9,
                        "the first round")
    assert first["outcomes"] == {"completed": 38, "do-not-call": 3}
    clock.now += 61  # retry_after_s
    wake(line)
    await until(line, campaign, lambda p: settled(p) and p["states"]["waiting"] == 5,
                "the busy numbers' retries")
    opened = time.monotonic()
    clock.now = START + 9 * 3600  # 09:00 in Tokyo
    wake(line)
    final = await until(line, campaign, lambda p: p["status"] == "done", "the campaign's end")
    assert final["outcomes"] == {"completed": 43, "busy": 4, "do-not-call": 3}
    assert final["attempts"] == 43 + 2 * 4

    fake = line.fake
    placed = list(fake.calls.values())  # in the order they were created
    by_sid = dict(zip((c.sid for c in placed), (p.at for p in fake.creates()), strict=True))
    assert len(placed) == 51
    most = most_at_once(placed, by_sid)
    print(f"\n[campaign] outcomes {final['outcomes']}, {final['attempts']} attempts, at most "
          f"{most} calls at once; placed by the two instances: "
          f"{[rig.app[OUTBOUND].placed for rig in line.rigs]}", file=sys.stderr)
    assert most <= 5  # the campaign's concurrency, fleet-wide
    dialled = [c.to for c in placed]
    assert not set(dialled) & set(blocked)
    assert {n: dialled.count(n) for n in set(dialled)} == {
        n: 2 if n in busy else 1 for n in listed if n not in blocked}
    for number in busy:  # one at a time, never overlapping
        first_try, retry = (c for c in placed if c.to == number)
        assert first_try.ended_at is not None and by_sid[retry.sid] > first_try.ended_at
    assert all(by_sid[c.sid] > opened for c in placed if c.to in tokyo)
    assert all(c.errors == [] for c in placed)
    assert all(len(c.streams) == 1 for c in placed if c.to not in busy)  # each one streamed
    # Both instances placed calls, and both took streams and callbacks.
    assert all(rig.app[OUTBOUND].placed > 0 for rig in line.rigs)
    assert sum(rig.app[OUTBOUND].placed for rig in line.rigs) == 51
    record = await line.record(next(c.sid for c in placed if c.to == listed[20]))
    assert record["metadata"]["campaign"]["id"] == campaign
    assert record["answered_by"] == "human" and record["status"] == "completed"


async def test_a_restart_mid_campaign_resumes_it(make_line: MakeLine) -> None:
    """A deploy: a new instance starts on the same database, the old one stops (its live
    calls end, its scheduler with them); the new one resumes the running campaign."""
    clock = Clock()
    line = await make_line(prepare=injected(clock), fleet=True)
    line.fake.default = Callee("human", audio=b"", amd_after_s=0.05, hang_up_after_s=0.6)
    listed = numbers(12, 100)
    status, created = await line.post("/campaigns", {
        "name": "restart", "calls": [{"to": n} for n in listed], "concurrency": 3})
    assert status == 201
    campaign = created["id"]
    await until(line, campaign, lambda p: p["states"]["done"] >= 2, "a few calls done")
    assert line.another is not None
    new = await line.another()
    line.down.add(0)  # the load balancer sends everything to the new instance from now on
    old = line.rigs[0]
    await old.bridge.close()  # the old one stops
    assert old.app[OUTBOUND].placed > 0
    clock.now += 10  # a placement the stopping instance let go waits for no one
    wake(line)
    final = await until(line, campaign, lambda p: p["status"] == "done", "the campaign's end")
    assert new.app[OUTBOUND].placed > 0  # the campaign went on there
    assert final["outcomes"] == {"completed": 12}
    dialled = [c.to for c in line.fake.calls.values()]
    assert sorted(dialled) == sorted(listed)  # each once: nothing lost, nothing twice
