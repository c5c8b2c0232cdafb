"""Saves call records in the background: live calls at least every few seconds, final ones at once.

One task owns every write, so a call never waits on the database and a slow or failed store
never reaches the media path: the call only hands its record over (`track`, `finish`). A failed
write is logged once, kept, and retried with backoff; a crash loses at most one interval.

Pending work is keyed by call SID. While the store is down every final record is kept, up to
RECORDS_PENDING_MAX (then the oldest are dropped, counted and logged). Whatever is still unsaved
at shutdown goes to the spool file (RECORDS_SPOOL, see spool.py), which the next start loads.
The stores keep the newest state of a call (`updated_at`), so a retried or spooled record never
replaces a newer save, such as the one by the instance a call was handed over to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.call.record import CallRecord, parse_stamp, utc_now
from server.records import spool
from server.records.store import RecordStore

log = logging.getLogger("server.records")

SAVE_INTERVAL = 5.0
MAX_BACKOFF = 60.0
PENDING_MAX = 10_000


class RecordWriter:
    def __init__(self, store: RecordStore, *, interval: float = SAVE_INTERVAL,
                 on_final: Callable[[Mapping[str, Any]], None] | None = None,
                 first_backoff: float = 1.0, pending_max: int = PENDING_MAX,
                 spool_path: Path | None = None, worker: int | None = None) -> None:
        """`spool_path`: RECORDS_SPOOL (None: nothing is spooled or loaded); `worker`: this
        process's index with WORKERS=N, which names its own spool."""
        self.store = store
        self.interval = interval
        self.pending_max = pending_max
        self.spool_path = spool_path
        self._worker = worker
        self._first_backoff = first_backoff
        self._on_final = on_final
        self._live: dict[str, CallRecord] = {}  # call SID -> the live call's record
        self._saved: dict[str, int] = {}  # call SID -> live record's version last written
        # call SID -> final snapshot, oldest first (the first dropped at RECORDS_PENDING_MAX)
        self._finals: dict[str, Mapping[str, Any]] = {}
        self._claims: list[tuple[spool.Claim, set[str]]] = []  # loaded spools, SIDs unsaved
        self.dropped = 0  # final records dropped at RECORDS_PENDING_MAX, since start
        self._dropped_in_outage = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self._failing = False
        self.writes = 0
        self.failures = 0

    # --- what a call does ---

    def track(self, record: CallRecord) -> None:
        """A call started: save this record whenever it changed, at least every interval."""
        if record.call_sid and record.ended_at is None:
            self._live[record.call_sid] = record
            self._saved.pop(record.call_sid, None)

    def finish(self, record: CallRecord) -> None:
        """The record is final (ended_at set): write it soon, then send the call webhook.
        Returns at once."""
        sid = record.call_sid
        if self._live.get(sid) is record:
            del self._live[sid]
            self._saved.pop(sid, None)
        if not sid:
            return  # a stream that never started: nothing worth keeping
        snapshot = record.to_dict()
        self._keep(snapshot)
        if self._on_final is not None:
            try:
                self._on_final(snapshot)
            except Exception:
                log.exception("call-ended hook failed for %s", sid)
        self._wake.set()

    def _keep(self, snapshot: Mapping[str, Any]) -> None:
        """Queue a final snapshot: the newest one per call, at most `pending_max` in all."""
        sid = str(snapshot["call_sid"])
        current = self._finals.pop(sid, None)
        if current is not None and _older(snapshot, current):
            snapshot = current
        self._finals[sid] = snapshot
        while len(self._finals) > self.pending_max:
            oldest = next(iter(self._finals))
            del self._finals[oldest]
            self.dropped += 1
            self._dropped_in_outage += 1
            if self._dropped_in_outage == 1:
                log.error("%d final call records are waiting for the records store "
                          "(RECORDS_PENDING_MAX): dropping the oldest from now on, first %s; "
                          "the count is logged when the store is back or at shutdown",
                          self.pending_max, oldest)
            self._settle(oldest)

    def _settle(self, sid: str) -> None:
        """`sid`'s final record is saved (or dropped): a loaded spool file whose records are all
        settled is deleted."""
        for entry in list(self._claims):
            claim, unsaved = entry
            unsaved.discard(sid)
            if not unsaved:
                self._claims.remove(entry)
                claim.release(delete=True)
                log.info("spooled call records from %s saved; file deleted", claim.path.name)

    @property
    def live(self) -> list[CallRecord]:
        return list(self._live.values())

    @property
    def pending(self) -> int:
        """Final records not yet written."""
        return len(self._finals)

    # --- lifecycle ---

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="records writer")

    async def load_spool(self) -> int:
        """At start, before `start`: take every spool file of RECORDS_SPOOL's name that no live
        process holds and queue its records (saved by the loop; each file deleted once all of
        its records are). Returns how many records were loaded."""
        if self.spool_path is None:
            return 0
        claims = await asyncio.to_thread(spool.claim_all, self.spool_path)
        loaded = 0
        for claim in claims:
            if claim.bad_lines:
                log.warning("%s: %d line(s) are not call records: skipped", claim.path.name,
                            claim.bad_lines)
            unsaved = {str(r["call_sid"]) for r in claim.records}
            if not unsaved:
                claim.release(delete=True)
                continue
            self._claims.append((claim, unsaved))
            for record in claim.records:
                self._keep(record)
            loaded += len(claim.records)
        if loaded:
            log.info("loaded %d call record(s) spooled at an earlier shutdown (%s); saving them",
                     loaded, ", ".join(c.path.name for c, _ in self._claims))
            self._wake.set()
        return loaded

    async def close(self, timeout: float = 10.0) -> None:
        """Shutdown: stop the loop, then write everything once more (live records too, marked
        as ended by the shutdown if their call never finished); spool what the store refused."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                async with asyncio.timeout(timeout):
                    await task
            except TimeoutError:
                log.warning("records writer did not stop within %g s", timeout)
        for record in list(self._live.values()):
            if record.ended_at is None:
                record.ended_at = utc_now()
                record.end_kind = record.end_kind or "shutdown"
                record.end_reason = record.end_reason or "server stopped before the call ended"
            self.finish(record)
        self._retry_at = 0.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flush()
        await self._spool_unsaved()

    async def _spool_unsaved(self) -> None:
        claims, self._claims = self._claims, []
        if self._dropped_in_outage:
            log.error("%d final call record(s) were dropped while the records store was down "
                      "(RECORDS_PENDING_MAX=%d)", self._dropped_in_outage, self.pending_max)
        if not self._finals:
            for claim, _ in claims:
                claim.release(delete=True)
            return
        records = list(self._finals.values())
        if self.spool_path is not None:
            try:
                where = await asyncio.to_thread(spool.write, self.spool_path, self._worker,
                                                records)
            except OSError as e:
                log.error("cannot spool unsaved call records to %s: %s", self.spool_path, e)
            else:
                log.warning("records store unavailable: %d call record(s) spooled to %s, to be "
                            "saved at the next start", len(records), where)
                self._finals.clear()
                for claim, _ in claims:  # their unsaved records are in the new spool
                    claim.release(delete=True)
                return
        for claim, _ in claims:  # left for the next start
            claim.release(delete=False)
        log.error("%d call record(s) could not be saved before exit: %s", len(self._finals),
                  ", ".join(self._finals))

    async def flush(self) -> bool:
        """Write every final record and every changed live record now; True if all worked."""
        ok = await self._write_finals()
        return await self._write_live() and ok

    # --- the loop ---

    async def _run(self) -> None:
        next_live = time.monotonic() + self.interval
        while True:
            timeout = max(0.0, min(next_live, self._retry_at or next_live) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            now = time.monotonic()
            if now < self._retry_at:
                continue
            try:
                await self._write_finals()
                if now >= next_live:
                    next_live = now + self.interval
                    await self._write_live()
            except Exception:  # a bug, not a store failure: keep the loop alive
                log.exception("records writer: unexpected error")

    async def _write_finals(self) -> bool:
        for sid, snapshot in list(self._finals.items()):
            if self._finals.get(sid) is not snapshot:
                continue  # replaced by a newer one, or dropped, while we were writing
            if not await self._save(snapshot):
                return False
            if self._finals.get(sid) is snapshot:
                del self._finals[sid]
                self._settle(sid)
        return True

    async def _write_live(self) -> bool:
        for sid, record in list(self._live.items()):
            version = record.version
            if self._saved.get(sid) == version:
                continue
            if not await self._save(record.to_dict()):
                return False
            if self._live.get(sid) is record:
                self._saved[sid] = version
        return True

    async def _save(self, snapshot: Mapping[str, Any]) -> bool:
        """True when the store took the snapshot, or kept a newer state of that call."""
        try:
            written = await self.store.save(snapshot)
        except Exception as e:
            self.failures += 1
            self._backoff = min(max(self._backoff * 2, self._first_backoff), MAX_BACKOFF)
            self._retry_at = time.monotonic() + self._backoff
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "cannot save call record %s (%s: %s); retrying in %g s",
                    snapshot.get("call_sid"), type(e).__name__, e, self._backoff)
            self._failing = True
            return False
        self.writes += 1
        if written is False:
            log.debug("call record %s: the store has a newer state of the call; kept it",
                      snapshot.get("call_sid"))
        if self._failing:
            log.info("records store is writable again")
            if self._dropped_in_outage:
                log.error("%d final call record(s) were dropped while the records store was "
                          "down (RECORDS_PENDING_MAX=%d)", self._dropped_in_outage,
                          self.pending_max)
                self._dropped_in_outage = 0
        self._failing = False
        self._backoff = 0.0
        self._retry_at = 0.0
        return True


def _older(snapshot: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Whether `snapshot` is an older state of the call than `than` (by `updated_at`)."""
    mine, theirs = parse_stamp(snapshot.get("updated_at")), parse_stamp(than.get("updated_at"))
    return mine is not None and theirs is not None and mine < theirs

