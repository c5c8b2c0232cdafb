"""Campaigns across instances: two schedulers on one database (a SQLite file, PostgreSQL), an
injected clock, and a fake `place` that knows which numbers are on the line right now."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from server.outbound.campaigns import (
    Campaigns,
    CampaignScheduler,
    Place,
    PlaceDeferred,
    PlaceFailed,
    PlaceResult,
)
from server.outbound.numbers import DoNotCall
from server.outbound.pacing import MemoryPaceStore, Pacer
from server.outbound.spec import CallSpec, CampaignSpec, Window, parse_campaign
from server.outbound.store import (
    Campaign,
    CampaignStore,
    Conflict,
    Entry,
    NotFound,
    open_campaign_store,
)
from server.testing.inbox import wait_until
from tests.pg import Unavailable, postgres_server

START = 1_741_000_000.0  # 2025-03-03 11:06:40 UTC (06:06 in New York)


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


@dataclass
class Phone:
    """Twilio and every callee, as the scheduler sees them: `place` gives a CallSid; the test
    ends calls with `end()`, which reports each one's scripted status to a scheduler."""

    clock: Clock
    script: dict[str, list[str]] = field(default_factory=dict)  # number -> status per attempt
    answered_by: dict[str, str] = field(default_factory=dict)
    live: dict[str, str] = field(default_factory=dict)  # sid -> number, placed and not ended
    dialled: list[tuple[str, float, str]] = field(default_factory=list)  # number, time, by
    violations: list[str] = field(default_factory=list)
    max_live: int = 0
    attempts: dict[str, int] = field(default_factory=dict)  # per number
    per_entry: dict[str, int] = field(default_factory=dict)  # per campaign entry
    plans: dict[str, Entry] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)  # numbers whose first placement never returns

    def place_for(self, instance: str) -> Place:
        async def place(campaign: Campaign, entry: Entry) -> PlaceResult:
            if entry.to in self.live.values():
                self.violations.append(f"{entry.to} dialled while already on the line")
            n = self.per_entry.get(entry.key, 0) + 1
            if entry.attempt != n:
                self.violations.append(f"{entry.to}: attempt {entry.attempt}, expected {n}")
            self.per_entry[entry.key] = n
            self.attempts[entry.to] = self.attempts.get(entry.to, 0) + 1
            self.dialled.append((entry.to, self.clock(), instance))
            sid = "CA" + uuid4().hex
            self.live[sid] = entry.to
            self.plans[sid] = entry
            self.max_live = max(self.max_live, len(self.live))
            if entry.to in self.hang:
                self.hang.discard(entry.to)  # once: a second dial must fail the test, not hang it
                await asyncio.Event().wait()
            return sid

        return place

    def status_of(self, sid: str) -> str:
        number = self.live[sid]
        statuses = self.script.get(number, ["completed"])
        return statuses[min(self.attempts[number], len(statuses)) - 1]

    async def end(self, schedulers: Sequence[CampaignScheduler], count: int) -> None:
        """End the `count` oldest live calls; their callbacks reach the instances in turn."""
        for i, sid in enumerate(list(self.live)[:count]):
            scheduler = schedulers[i % len(schedulers)]
            number = self.live[sid]
            if number in self.answered_by:
                await scheduler.answered_by(sid, self.answered_by[number])
            status = self.status_of(sid)
            del self.live[sid]
            assert await scheduler.outcome(sid, status), f"{sid} ({number}) was not settled"

    def times_dialled(self, number: str) -> list[float]:
        return [t for n, t, _ in self.dialled if n == number]


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+1555010{n:04d}" for n in range(start, start + count)]


@pytest.fixture(scope="module")
def pg_base() -> Iterator[str]:
    try:
        with postgres_server() as url:
            yield url
    except Unavailable as e:
        pytest.skip(f"PostgreSQL tests skipped: {e}")


async def _pg_admin(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database of each kind, shared by every instance of one test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/calls.db"
        return
    base: str = request.getfixturevalue("pg_base")
    name = "c_" + uuid4().hex[:16]
    await _pg_admin(base, f"CREATE DATABASE {name}")
    yield base.rsplit("/", 1)[0] + "/" + name
    await _pg_admin(base, f"DROP DATABASE {name} WITH (FORCE)")


@dataclass
class Fleet:
    """Instances sharing one database, each with its own store (connection) and scheduler."""

    url: str
    clock: Clock
    phone: Phone
    dnc: DoNotCall
    stores: list[CampaignStore] = field(default_factory=list)
    schedulers: list[CampaignScheduler] = field(default_factory=list)
    campaigns: Campaigns | None = None

    async def instance(self, name: str, **options: Any) -> CampaignScheduler:
        store = open_campaign_store(self.url)
        assert store is not None
        await store.open()
        self.stores.append(store)
        options.setdefault("max_inflight", 3)
        options.setdefault("pacer", Pacer(1.0, MemoryPaceStore(self.clock), sleep=no_sleep))
        scheduler = CampaignScheduler(store, self.phone.place_for(name), instance_id=name,
                                      clock=self.clock, do_not_call=self.dnc, **options)
        self.schedulers.append(scheduler)
        if self.campaigns is None:
            self.campaigns = Campaigns(store, self.dnc, clock=self.clock)
        return scheduler

    @property
    def api(self) -> Campaigns:
        assert self.campaigns is not None
        return self.campaigns

    async def round(self, schedulers: Sequence[CampaignScheduler] | None = None) -> int:
        """Every instance claims at once, and their placements finish."""
        active = list(schedulers or self.schedulers)
        claimed = await asyncio.gather(*(s.tick() for s in active))
        await asyncio.gather(*(s.idle() for s in active))
        return sum(claimed)

    async def run(self, campaign_id: str, *, end_per_round: int = 2, step: float = 20.0,
                  rounds: int = 400) -> dict[str, Any]:
        """Claim, end a few calls, let time pass when nothing is live; until the campaign is
        done. The concurrency is checked after every round."""
        for _ in range(rounds):
            await self.round()
            progress = await self.api.progress(campaign_id)
            concurrency = int(progress["settings"]["concurrency"])
            assert len(self.phone.live) <= concurrency
            if progress["status"] == "done":
                return progress
            if self.phone.live:
                await self.phone.end(self.schedulers, end_per_round)
            else:
                self.clock.now += step
        raise AssertionError(f"campaign not done: {progress}")

    async def close(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.close(grace=0)
        for store in self.stores:
            await store.close()


@pytest.fixture
async def fleet(db_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    clock = Clock()
    dnc = DoNotCall(tmp_path / "dnc.txt")
    await dnc.load()
    fleet = Fleet(db_url, clock, Phone(clock), dnc)
    yield fleet
    await fleet.close()


def spec(**fields: Any) -> CampaignSpec:
    data: dict[str, Any] = {"name": "test", "calls": [{"to": "+15550000000"}], **fields}
    return parse_campaign(data)[0]


# --- the acceptance test ---


async def test_fifty_numbers_two_instances(fleet: Fleet) -> None:
    await fleet.instance("A")
    await fleet.instance("B")
    phone = fleet.phone
    listed = numbers(50)
    busy_then_ok, always_busy, no_answer = listed[0:5], listed[5:7], listed[7:9]
    blocked, late_blocked = listed[10:13], listed[13]
    for n in busy_then_ok:
        phone.script[n] = ["busy", "completed"]
    for n in always_busy:
        phone.script[n] = ["busy", "busy", "busy", "busy"]
    for n in no_answer:
        phone.script[n] = ["no-answer", "no-answer", "no-answer"]
    await fleet.dnc.add(blocked)
    calls = [CallSpec(n, {"i": str(i)}) for i, n in enumerate(listed)]
    calls += [CallSpec("555-0100"), CallSpec("+1555"), CallSpec(listed[20])]  # 2 bad, 1 dup
    created = await fleet.api.create(
        spec(concurrency=5, retries={"busy": 2, "no-answer": 1}, retry_after_s=60), calls)
    assert created["skipped"] == {"do-not-call": 3, "invalid": 2, "duplicate": 1}
    assert [i["index"] for i in created["invalid"]] == [50, 51]
    await fleet.dnc.add([late_blocked])  # listed after the campaign was created

    progress = await fleet.run(created["id"])

    assert phone.violations == []
    assert phone.max_live == 5  # reached, never exceeded, with 3 + 3 slots per instance
    assert {by for _, _, by in phone.dialled} == {"A", "B"}  # both instances dialled
    dialled = {n for n, _, _ in phone.dialled}
    assert not dialled & {*blocked, late_blocked}
    expected = {n: 1 for n in listed if n not in blocked and n != late_blocked}
    expected.update({n: 2 for n in busy_then_ok})
    expected.update({n: 3 for n in always_busy})  # 1 + 2 retries, never more
    expected.update({n: 2 for n in no_answer})  # 1 + 1 retry
    assert phone.attempts == expected
    for n in [*busy_then_ok, *always_busy, *no_answer]:
        times = phone.times_dialled(n)
        assert all(later - earlier >= 60 for earlier, later in itertools.pairwise(times)), times
    assert progress["status"] == "done"
    assert progress["outcomes"] == {"completed": 50 - 4 - 2 - 2, "busy": 2, "no-answer": 2,
                                    "do-not-call": 4, "invalid": 2, "duplicate": 1}
    assert progress["total"] == 53 and progress["attempts"] == sum(expected.values())
    assert progress["states"]["done"] == 46 and progress["states"]["skipped"] == 7
    assert sum(n for s, n in progress["states"].items() if s not in ("done", "skipped")) == 0


# --- windows ---


async def test_numbers_outside_the_window_wait_until_it_opens(fleet: Fleet) -> None:
    a = await fleet.instance("A", max_inflight=10)
    window = {"start": "09:00", "end": "18:00", "timezone": "America/New_York"}
    calls = [CallSpec(n) for n in numbers(4)]
    calls.append(CallSpec(numbers(1, 90)[0], timezone="America/Los_Angeles"))
    created = await fleet.api.create(spec(concurrency=10, window=window), calls)
    ny_9am = Window.parse(window).next_open(fleet.clock.now)
    assert ny_9am - fleet.clock.now == pytest.approx(2 * 3600 + 53 * 60 + 20)  # 06:06:40 now

    assert await a.tick() == 0  # 06:06 in New York: nobody is called
    progress = await fleet.api.progress(created["id"])
    assert progress["states"]["waiting"] == 5 and progress["states"]["pending"] == 0
    fleet.clock.now = ny_9am - 1
    assert await a.tick() == 0
    fleet.clock.now = ny_9am
    assert await a.tick() == 4  # New York opens; Los Angeles is still 06:00
    await a.idle()
    fleet.clock.now = ny_9am + 3 * 3600 - 1
    assert await a.tick() == 0
    fleet.clock.now = ny_9am + 3 * 3600  # 09:00 in Los Angeles
    assert await a.tick() == 1
    await a.idle()
    assert [t for _, t, _ in fleet.phone.dialled] == [ny_9am] * 4 + [ny_9am + 3 * 3600]


# --- restarts ---


async def test_a_restart_mid_campaign_resumes(fleet: Fleet) -> None:
    first = await fleet.instance("A", max_inflight=5)
    created = await fleet.api.create(spec(concurrency=4), [CallSpec(n) for n in numbers(10)])
    await fleet.round([first])
    assert len(fleet.phone.live) == 4
    await first.close()  # a graceful stop: placements finished, the calls go on
    await fleet.phone.end([first], 1)  # a call ends while no instance runs a scheduler
    second = await fleet.instance("A2", max_inflight=5)  # the restarted process
    fleet.schedulers.remove(first)
    progress = await fleet.run(created["id"])
    assert progress["outcomes"] == {"completed": 10}
    assert fleet.phone.attempts == dict.fromkeys(numbers(10), 1)
    assert fleet.phone.violations == [] and fleet.phone.max_live == 4
    assert {by for _, _, by in fleet.phone.dialled} == {"A", "A2"}
    assert second.inflight == 0


async def test_a_dead_instances_claims_lapse_by_lease(fleet: Fleet) -> None:
    phone = fleet.phone
    listed = numbers(6)
    phone.hang.add(listed[0])  # the instance dies in the middle of placing this call
    dying = await fleet.instance("dying", max_inflight=1, lease_s=60)
    created = await fleet.api.create(spec(concurrency=3), [CallSpec(n) for n in listed])
    assert await dying.tick() == 1
    await wait_until(lambda: listed[0] in phone.live.values(), what="the hung placement")
    # and it had claimed another number but never got to dial it
    store = fleet.stores[0]
    _campaign, claimed = await store.claim(created["id"], instance="dying", now=fleet.clock(),
                                          lease_until=fleet.clock() + 60, limit=1,
                                          decide=lambda c, e: ("claim", None))
    assert [e.to for e in claimed] == [listed[1]]
    await dying.close(grace=0)  # killed: its task is gone, its claims stay in the database
    fleet.schedulers.remove(dying)
    del phone.live[next(s for s, n in phone.live.items() if n == listed[0])]

    survivor = await fleet.instance("survivor", max_inflight=3)
    assert await survivor.tick() == 1  # two slots are still held by the dead claims
    await survivor.idle()
    fleet.clock.now += 61  # the leases lapse
    progress = await fleet.run(created["id"])
    # the claim that never dialled was dialled by the survivor; the one that was dialling is
    # `unknown` (Twilio may have placed it) and is not dialled again
    assert phone.attempts == dict.fromkeys(listed, 1)
    assert progress["outcomes"] == {"completed": 5, "unknown": 1}
    assert phone.violations == []


async def test_a_call_whose_end_never_comes_becomes_unknown(fleet: Fleet) -> None:
    a = await fleet.instance("A", stale_after_s=3600)
    created = await fleet.api.create(spec(concurrency=1, retries={"unknown": 1}),
                                     [CallSpec(n) for n in numbers(2)])
    await fleet.round()
    assert await a.tick() == 0  # the slot is held
    fleet.clock.now += 3601
    fleet.phone.live.clear()  # its callback was lost
    assert await a.tick() == 1  # settled as unknown (retried later), the next number dialled
    await a.idle()
    progress = await fleet.api.progress(created["id"])
    assert progress["states"]["waiting"] == 1 and progress["states"]["in_progress"] == 1


async def test_a_cancelled_campaigns_lost_call_is_still_settled(fleet: Fleet) -> None:
    a = await fleet.instance("A", stale_after_s=3600)
    created = await fleet.api.create(spec(), [CallSpec(n) for n in numbers(2)])
    await fleet.round()
    await fleet.api.act(created["id"], "cancel")
    fleet.phone.live.clear()  # neither call's end is ever reported
    fleet.clock.now += 3601
    assert await a.tick() == 0
    progress = await fleet.api.progress(created["id"])
    assert progress["states"]["in_progress"] == 0
    assert progress["outcomes"] == {"unknown": 2} and progress["status"] == "cancelled"


# --- operators ---


async def test_pause_resume_and_cancel(fleet: Fleet) -> None:
    a = await fleet.instance("A", max_inflight=10)
    created = await fleet.api.create(spec(concurrency=2), [CallSpec(n) for n in numbers(6)])
    cid = created["id"]
    await fleet.round()
    assert len(fleet.phone.live) == 2
    paused = await fleet.api.act(cid, "pause")
    assert paused["status"] == "paused"
    await fleet.phone.end([a], 2)  # calls on the line end normally
    assert await a.tick() == 0
    assert (await fleet.api.act(cid, "pause"))["status"] == "paused"  # idempotent
    assert (await fleet.api.act(cid, "resume"))["status"] == "running"
    assert await a.tick() == 2
    await a.idle()
    cancelled = await fleet.api.act(cid, "cancel")
    assert cancelled["status"] == "cancelled"
    assert cancelled["outcomes"] == {"completed": 2, "campaign-cancelled": 2}
    assert cancelled["states"]["in_progress"] == 2
    await fleet.phone.end([a], 2)  # live calls still report their end
    progress = await fleet.api.progress(cid)
    assert progress["status"] == "cancelled"
    assert progress["outcomes"] == {"completed": 4, "campaign-cancelled": 2}
    assert await a.tick() == 0
    with pytest.raises(Conflict, match="is cancelled: it cannot resume"):
        await fleet.api.act(cid, "resume")
    with pytest.raises(NotFound):
        await fleet.api.act("cmp_nope", "pause")
    listed = await fleet.api.store.list_campaigns()
    assert [(c["id"], c["status"]) for c in listed] == [(cid, "cancelled")]


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_claims_waiting_for_their_turn_are_let_go_on_pause_or_cancel(
        fleet: Fleet, action: str) -> None:
    turn = asyncio.Event()
    waiting: list[float] = []

    async def held_turn(seconds: float) -> None:
        waiting.append(seconds)
        await turn.wait()

    a = await fleet.instance("A", max_inflight=5,
                             pacer=Pacer(1.0, MemoryPaceStore(fleet.clock), sleep=held_turn))
    created = await fleet.api.create(spec(concurrency=5), [CallSpec(n) for n in numbers(3)])
    assert await a.tick() == 3  # claimed; the 2nd and 3rd wait for their turn (1 call/s)
    await wait_until(lambda: len(waiting) == 2 and len(fleet.phone.dialled) == 1,
                     what="one call placed, two waiting for their turn")
    await fleet.api.act(created["id"], action)
    turn.set()
    await a.idle()
    assert len(fleet.phone.dialled) == 1  # nothing placed after the operator's action
    progress = await fleet.api.progress(created["id"])
    if action == "pause":
        assert progress["states"]["pending"] == 2 and progress["states"]["placing"] == 0
        await fleet.api.act(created["id"], "resume")
        assert await a.tick() == 2
        await a.idle()
        assert len(fleet.phone.dialled) == 3
    else:
        assert progress["outcomes"] == {"campaign-cancelled": 2}


async def test_a_number_is_not_dialled_twice_at_once_across_campaigns(fleet: Fleet) -> None:
    a = await fleet.instance("A", max_inflight=10)
    shared = numbers(1)[0]
    first = await fleet.api.create(spec(concurrency=5), [CallSpec(shared)])
    second = await fleet.api.create(spec(concurrency=5),
                                    [CallSpec(shared), CallSpec(numbers(1, 1)[0])])
    assert await a.tick() == 2  # the shared number once, and the other campaign's other one
    await a.idle()
    await fleet.phone.end([a], 2)
    assert await a.tick() == 1  # now the second campaign may call it
    await a.idle()
    await fleet.phone.end([a], 1)
    assert fleet.phone.violations == []
    for cid in (first["id"], second["id"]):
        assert (await fleet.api.progress(cid))["status"] == "done"


# --- outcomes ---


async def test_machine_outcome_from_amd(fleet: Fleet) -> None:
    a = await fleet.instance("A")
    listed = numbers(2)
    fleet.phone.answered_by = {listed[0]: "machine_end_beep", listed[1]: "human"}
    created = await fleet.api.create(spec(retries={"machine": 0}),
                                     [CallSpec(n) for n in listed])
    progress = await fleet.run(created["id"])
    assert progress["outcomes"] == {"machine": 1, "completed": 1}
    calls = (await fleet.api.progress(created["id"], calls=True))["calls"]
    assert [(c["number"], c["answered_by"], c["outcome"]) for c in calls] == [
        (listed[0], "machine_end_beep", "machine"), (listed[1], "human", "completed")]
    assert a.inflight == 0


async def test_an_outcome_before_the_placement_is_recorded_still_counts(fleet: Fleet) -> None:
    schedulers: list[CampaignScheduler] = []

    async def racing_place(campaign: Campaign, entry: Entry) -> PlaceResult:
        sid = "CA" + uuid4().hex
        # Twilio's callbacks beat the create request's answer, to another instance
        assert not await schedulers[1].answered_by(sid, "machine_end_silence")
        assert not await schedulers[1].outcome(sid, "completed")
        return sid

    a = await fleet.instance("A")
    b = await fleet.instance("B")
    schedulers += [a, b]
    a._place = racing_place
    created = await fleet.api.create(spec(), [CallSpec(numbers(1)[0])])
    assert await a.tick() == 1
    await a.idle()
    progress = await fleet.api.progress(created["id"])
    assert progress["status"] == "done" and progress["outcomes"] == {"machine": 1}


async def test_failed_and_deferred_placements(fleet: Fleet) -> None:
    first, second = numbers(1)[0], numbers(1, 1)[0]
    results: dict[str, list[PlaceResult]] = {  # per number, one result per placement
        first: [PlaceFailed("Twilio HTTP 400 (code 21215)"), PlaceFailed("Twilio no answer")],
        second: [PlaceDeferred("at MAX_CALLS", retry_after_s=30), "CAok"]}
    seen: list[tuple[str, int]] = []

    async def place(campaign: Campaign, entry: Entry) -> PlaceResult:
        seen.append((entry.to, entry.attempt))
        return results[entry.to].pop(0)

    a = await fleet.instance("A")
    a._place = place
    created = await fleet.api.create(spec(retries={"failed": 1}, retry_after_s=10),
                                     [CallSpec(first), CallSpec(second)])
    assert await a.tick() == 2
    await a.idle()
    calls = (await fleet.api.progress(created["id"], calls=True))["calls"]
    assert [(c["state"], c["outcome"], c["attempts"]) for c in calls] == [
        ("waiting", "failed", 1), ("waiting", None, 0)]  # a deferral is not an attempt
    assert calls[0]["detail"] == "Twilio HTTP 400 (code 21215)"
    fleet.clock.now += 30
    assert await a.tick() == 2
    await a.idle()
    calls = (await fleet.api.progress(created["id"], calls=True))["calls"]
    assert [(c["state"], c["outcome"], c["attempts"]) for c in calls] == [
        ("done", "failed", 2), ("in_progress", None, 1)]
    assert sorted(seen) == [(first, 1), (first, 2), (second, 1), (second, 1)]
    assert await a.outcome("CAok", "completed")
    assert (await fleet.api.progress(created["id"]))["status"] == "done"


async def test_the_loop_dials_on_its_own_and_closes(fleet: Fleet) -> None:
    a = await fleet.instance("A", poll_s=30.0)  # only a wake-up can make it claim quickly
    fleet.campaigns = Campaigns(fleet.stores[0], fleet.dnc, clock=fleet.clock,
                                on_change=a.wake)
    await a.start()
    created = await fleet.api.create(spec(concurrency=2), [CallSpec(n) for n in numbers(3)])
    await wait_until(lambda: len(fleet.phone.live) == 2, what="two calls placed")
    await fleet.phone.end([a], 1)  # a call ends: the freed slot is used at once
    await wait_until(lambda: len(fleet.phone.dialled) == 3, what="the third call placed")
    await fleet.phone.end([a], 2)
    assert (await fleet.api.progress(created["id"]))["status"] == "done"
    await a.close()
    assert a.inflight == 0
