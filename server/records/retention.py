"""RETENTION_DAYS: delete records (and their recordings) older than that, once an hour."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from server.records.store import RecordStore

log = logging.getLogger("server.records")

SWEEP_INTERVAL = 3600.0


async def sweep(store: RecordStore, days: int, recordings_dir: Path | None) -> int:
    """One pass: delete old records, their recording files, and stray old recordings in
    `recordings_dir` (a record deleted by another instance). Returns records deleted."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    paths = await store.delete_older_than(cutoff)
    removed = await asyncio.to_thread(_remove_files, paths, recordings_dir, cutoff.timestamp())
    if len(paths) + removed:
        log.info("retention: deleted %d call record(s) and %d recording(s) older than %d day(s)",
                 len(paths), removed, days)
    return len(paths)


def _remove_files(paths: list[str], directory: Path | None, cutoff: float) -> int:
    removed = 0
    for name in paths:
        try:
            Path(name).unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("retention: cannot delete %s: %s", name, e.strerror or e)
    if directory is not None and directory.is_dir():
        # Old recordings, and parts an instance that crashed mid-call left unfinished.
        for path in (*directory.glob("*.wav"), *directory.glob("*.wav.part")):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
    return removed


async def run(store: RecordStore, days: int, recordings_dir: Path | None,
              interval: float = SWEEP_INTERVAL) -> None:
    """Sweep now and then every `interval` until cancelled; a failed sweep is logged."""
    while True:
        started = time.monotonic()
        try:
            await sweep(store, days, recordings_dir)
        except Exception as e:
            log.warning("retention sweep failed (%s: %s); next try in %g s",
                        type(e).__name__, e, interval)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
