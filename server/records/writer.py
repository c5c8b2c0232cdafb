"""Saves call records in the background: live calls at least every few seconds, final ones at once.

One task owns every write, so a call never waits on the database and a slow or failed store
never reaches the media path: the call only hands its record over (`track`, `finish`). A failed
write is logged once, kept, and retried with backoff; a crash loses at most one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from server.record import CallRecord, utc_now
from server.records.store import RecordStore

log = logging.getLogger("server.records")

SAVE_INTERVAL = 5.0
MAX_BACKOFF = 60.0


class RecordWriter:
    def __init__(self, store: RecordStore, *, interval: float = SAVE_INTERVAL,
                 on_final: Callable[[Mapping[str, Any]], None] | None = None,
                 first_backoff: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._first_backoff = first_backoff
        self._on_final = on_final
        self._live: dict[int, CallRecord] = {}
        self._saved: dict[int, int] = {}  # id(record) -> version last written
        self._finals: dict[int, Mapping[str, Any]] = {}  # id(record) -> final snapshot
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
        key = id(record)
        if key not in self._finals:
            self._live[key] = record

    def finish(self, record: CallRecord) -> None:
        """The record is final (ended_at set): write it soon, then send the call webhook.
        Returns at once."""
        key = id(record)
        self._live.pop(key, None)
        self._saved.pop(key, None)
        if not record.call_sid:
            return  # a stream that never started: nothing worth keeping
        snapshot = record.to_dict()
        self._finals[key] = snapshot
        if self._on_final is not None:
            try:
                self._on_final(snapshot)
            except Exception:
                log.exception("call-ended hook failed for %s", record.call_sid)
        self._wake.set()

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

    async def close(self, timeout: float = 10.0) -> None:
        """Shutdown: stop the loop, then write everything once more (live records too, marked
        as ended by the shutdown if their call never finished)."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, timeout)
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
            await asyncio.wait_for(self.flush(), timeout)
        if self._finals:
            log.error("%d call record(s) could not be saved before exit: %s", len(self._finals),
                      ", ".join(str(r.get("call_sid")) for r in self._finals.values()))

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
                await asyncio.wait_for(self._wake.wait(), timeout)
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
        for key, snapshot in list(self._finals.items()):
            if not await self._save(snapshot):
                return False
            if self._finals.get(key) is snapshot:
                del self._finals[key]
        return True

    async def _write_live(self) -> bool:
        for key, record in list(self._live.items()):
            version = record.version
            if not record.call_sid or self._saved.get(key) == version:
                continue
            if not await self._save(record.to_dict()):
                return False
            if key in self._live:
                self._saved[key] = version
        return True

    async def _save(self, snapshot: Mapping[str, Any]) -> bool:
        try:
            await self.store.save(snapshot)
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
        if self._failing:
            log.info("records store is writable again")
        self._failing = False
        self._backoff = 0.0
        self._retry_at = 0.0
        return True
