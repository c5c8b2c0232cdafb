"""Campaigns: many numbers dialled over time, within a concurrency, a pace, a window and a
retry policy, durably and safely across a fleet.

`Campaigns` is what the HTTP routes use (create, progress, pause, resume, cancel).
`CampaignScheduler` is one instance's dialler: an owner task (`start()` / `close()`) that claims
due numbers in the database (see `server.outbound.store` for why that is fleet-safe), waits for a
turn (`Pacer`), calls the `place(campaign, entry)` callable it was given, and records what came
back. The app feeds the end of each call back through `outcome(call_sid, status)` (from Twilio's
status callback) and `answered_by(call_sid, result)` (from the AMD callback).

The request shapes, the CSV upload and the retry rule live in `server.outbound.spec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from server.outbound.numbers import DoNotCall, InvalidNumber, normalise
from server.outbound.pacing import Pacer
from server.outbound.spec import CallSpec, CampaignSpec
from server.outbound.store import (
    Campaign,
    CampaignStore,
    Entry,
    NewEntry,
    StoreError,
    Verdict,
)

log = logging.getLogger("server.outbound")

Clock = Callable[[], float]
MAX_INVALID_SHOWN = 20


@dataclass(frozen=True)
class PlaceFailed:
    """No call was placed (Twilio refused, or did not answer): counted as `outcome` and retried
    as the campaign allows. `reason` is for the operator (Twilio's code and message)."""

    reason: str
    outcome: str = "failed"


@dataclass(frozen=True)
class PlaceDeferred:
    """Not placed for a reason of ours (the fleet is at MAX_CALLS): try again after
    `retry_after_s`, without counting an attempt."""

    reason: str
    retry_after_s: float = 5.0


PlaceResult = str | PlaceFailed | PlaceDeferred  # a str is the CallSid
Place = Callable[[Campaign, Entry], Awaitable[PlaceResult]]


def new_campaign_id() -> str:
    return "cmp_" + uuid4().hex[:20]


class Campaigns:
    """Operator actions on campaigns. `on_change()` (e.g. the scheduler's `wake`) runs after a
    campaign is created or resumed, so dialling starts without waiting for the next poll."""

    def __init__(self, store: CampaignStore, do_not_call: DoNotCall | None = None, *,
                 clock: Clock = time.time, on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self._dnc = do_not_call
        self._clock = clock
        self._on_change = on_change

    async def create(self, spec: CampaignSpec, calls: Sequence[CallSpec], *,
                     created_by: str = "") -> dict[str, Any]:
        """Store a running campaign. Every number is checked now: a bad one, a duplicate or one
        on the do-not-call list is kept as skipped (and counted), never dialled. The answer:
        `{"id", "status", "total", "to_dial", "skipped": {reason: n}, "invalid": [...]}`."""
        if self._dnc is not None:
            await self._dnc.refresh()
        entries: list[NewEntry] = []
        seen: set[str] = set()
        invalid: list[dict[str, Any]] = []
        skipped: dict[str, int] = {}
        for i, call in enumerate(calls):
            try:
                number = normalise(call.to)
            except InvalidNumber as e:
                entries.append(NewEntry(call, call.to[:40], "invalid", str(e)))
                if len(invalid) < MAX_INVALID_SHOWN:
                    invalid.append({"index": i, "reason": f"to {e}"})
            else:
                reason = ("duplicate" if number in seen
                          else "do-not-call" if self._dnc is not None and number in self._dnc
                          else None)
                seen.add(number)
                entries.append(NewEntry(call, number, reason))
            why = entries[-1].skipped
            if why:
                skipped[why] = skipped.get(why, 0) + 1
        campaign_id = new_campaign_id()
        await self.store.create(campaign_id, spec, entries, now=self._clock(),
                                created_by=created_by)
        log.info("campaign %s %r created by %s: %d numbers, %d skipped", campaign_id,
                 spec.name, created_by or "?", len(entries), sum(skipped.values()))
        self._changed()
        return {"id": campaign_id, "status": "running", "total": len(entries),
                "to_dial": len(entries) - sum(skipped.values()), "skipped": skipped,
                "invalid": invalid}

    async def progress(self, campaign_id: str, *, calls: bool = False) -> dict[str, Any]:
        """Counts per state and per outcome (NotFound); with `calls`, each number's state."""
        out = await self.store.progress(campaign_id)
        if calls:
            out["calls"] = await self.store.entries(campaign_id)
        return out

    async def act(self, campaign_id: str, action: str, *, operator: str = "") -> dict[str, Any]:
        """pause | resume | cancel; the progress after it (NotFound, Conflict)."""
        status = await self.store.set_status(campaign_id, action, now=self._clock())
        log.info("campaign %s %s by %s: now %s", campaign_id, action, operator or "?", status)
        if action == "resume":
            self._changed()
        return await self.store.progress(campaign_id)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


class CampaignScheduler:
    """One instance's dialler for every running campaign in the store.

    - `place(campaign, entry)` places one call: the CallSid, or PlaceFailed / PlaceDeferred.
      It is called at most `max_inflight` at a time on this instance, each after `pacer`'s turn.
    - `lease_s` bounds how long a claim (waiting for a turn, then the REST request) may take;
      a claim of an instance that died lapses after it. Keep it well above the REST timeout.
    - `stale_after_s`: a call whose end is never reported is settled as `unknown` after this
      long (default 4 h 15 min: MAX_CALL_SECONDS' default plus ringing).
    - `clock` (epoch seconds) is the campaigns' time: windows, retry_after, leases. The loop
      itself waits on the event loop (`poll_s`, or `wake()`).
    """

    def __init__(self, store: CampaignStore, place: Place, *, instance_id: str | None = None,
                 clock: Clock = time.time, pacer: Pacer | None = None,
                 do_not_call: DoNotCall | None = None, lease_s: float = 60.0,
                 stale_after_s: float = 4 * 3600 + 900, poll_s: float = 1.0,
                 max_inflight: int = 5) -> None:
        self.store = store
        self.instance_id = instance_id or uuid4().hex[:12]
        self._place = place
        self._clock = clock
        self._pacer = pacer
        self._dnc = do_not_call
        self._lease_s = lease_s
        self._stale_after_s = stale_after_s
        self._poll_s = poll_s
        self._max_inflight = max_inflight
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._failures = 0
        self._last_prune = 0.0

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the loop (idempotent)."""
        if self._loop_task is None:
            self._closing = False
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name="campaign-scheduler")

    async def close(self, grace: float = 15.0) -> None:
        """Stop claiming; let placements under way finish for up to `grace` seconds (so their
        CallSids are recorded), then cancel the rest (their claims lapse by lease)."""
        self._closing = True
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def wake(self) -> None:
        """Claim now rather than at the next poll (a campaign created or resumed, a call
        ended and freed a slot)."""
        self._wake.set()

    async def idle(self) -> None:
        """Wait until no placement of this instance is under way (tests, shutdown)."""
        while self._inflight:
            await asyncio.gather(*set(self._inflight), return_exceptions=True)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # --- what the app reports ---

    async def outcome(self, call_sid: str, status: str) -> bool:
        """Twilio's CallStatus for `call_sid` (from /call-status); True when it ended a
        campaign call. Non-final statuses (queued, ringing, in-progress) are ignored."""
        settled = await self.store.record_outcome(call_sid, status, now=self._clock())
        if settled:
            self.wake()
        return settled

    async def answered_by(self, call_sid: str, answered_by: str) -> bool:
        """The AMD result for `call_sid` (from /amd-status), kept for its outcome."""
        return await self.store.record_answered_by(call_sid, answered_by, now=self._clock())

    # --- the loop ---

    async def _run(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                await self.tick()
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database is down: log (once per outage), keep going
                self._failures += 1
                if self._failures == 1:
                    log.warning("campaign scheduler: %s: %s; retrying", type(e).__name__,
                                e if isinstance(e, StoreError) else "see the next line")
                    if not isinstance(e, StoreError):
                        log.exception("campaign scheduler failed")
            delay = self._poll_s * min(2 ** max(self._failures - 1, 0), 30)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def tick(self) -> int:
        """One round: claim due numbers of every running campaign, within their concurrency
        and this instance's `max_inflight`, and start placing them. The number claimed."""
        if self._dnc is not None:
            await self._dnc.refresh()
        now = self._clock()
        if now - self._last_prune > 3600:
            self._last_prune = now
            await self.store.prune(now)
        claimed = 0
        for campaign_id in await self.store.running():
            room = self._max_inflight - len(self._inflight)
            if room <= 0 or self._closing:
                break
            now = self._clock()
            campaign, entries = await self.store.claim(
                campaign_id, instance=self.instance_id, now=now,
                lease_until=now + self._lease_s, limit=room, decide=self._decide)
            if campaign is None:
                continue
            for entry in entries:
                self._spawn(campaign, entry)
            claimed += len(entries)
        return claimed

    def _decide(self, campaign: Campaign, entry: Entry) -> Verdict:
        if self._dnc is not None and entry.to in self._dnc:
            return ("skip", "do-not-call")
        window = campaign.spec.window
        if window is not None:
            now = self._clock()
            opens = window.next_open(now, entry.timezone)
            if opens > now:
                return ("wait", opens)
        return ("claim", None)

    def _spawn(self, campaign: Campaign, entry: Entry) -> None:
        task = asyncio.get_running_loop().create_task(
            self._dial(campaign, entry), name=f"campaign-dial-{entry.key}")
        self._inflight.add(task)
        task.add_done_callback(self._dialled)

    def _dialled(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a slot of max_inflight is free

    async def _dial(self, campaign: Campaign, entry: Entry) -> None:
        try:
            if self._pacer is not None:
                await self._pacer.wait_turn()
            now = self._clock()
            if not await self.store.start_dialing(entry, instance=self.instance_id, now=now,
                                                  lease_until=now + self._lease_s):
                return
            try:
                result = await self._place(campaign, entry)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("campaign %s: placing entry %s failed", campaign.id, entry.seq)
                result = PlaceFailed(f"{type(e).__name__} while placing the call")
            now = self._clock()
            if isinstance(result, str):
                if not await self.store.placed(entry, result, instance=self.instance_id,
                                               now=now, stale_at=now + self._stale_after_s):
                    log.warning("campaign %s: call %s placed after entry %s's claim lapsed",
                                campaign.id, result, entry.seq)
            elif isinstance(result, PlaceDeferred):
                await self.store.place_deferred(entry, instance=self.instance_id, now=now,
                                                next_at=now + result.retry_after_s,
                                                detail=result.reason)
            else:
                await self.store.place_failed(entry, result.outcome, result.reason,
                                              instance=self.instance_id, now=now)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the database failed under us: the lease settles the entry
            log.warning("campaign %s: entry %s left to its lease: %s: %s", campaign.id,
                        entry.seq, type(e).__name__, e)


__all__ = ["CampaignScheduler", "Campaigns", "Place", "PlaceDeferred", "PlaceFailed",
           "PlaceResult", "new_campaign_id"]
