"""One SQLite connection on one dedicated thread: the event loop never waits on the disk.

Shared by the records store and the campaign store. WAL mode, so readers (the CLI, another
process) never wait on the writer; `setup` (pragmas, migrations) runs on the thread once the
file is open.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SQLiteThread:
    def __init__(self, path: Path, name: str, error: type[Exception]) -> None:
        """`name`: the thread's and the messages' ("records", "campaigns"); `error`: what a
        store raises when it cannot be used (its own StoreError)."""
        self.path = path
        self._name = name
        self._error = error
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None

    async def open(self, setup: Callable[[sqlite3.Connection], None],
                   busy_timeout_ms: int = 5000) -> None:
        """Open (creating the folder), set WAL and the busy timeout, then `setup(db)`."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self._name}-sqlite")

        def connect() -> None:
            try:
                if self.path.parent != Path():
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except (OSError, sqlite3.Error) as e:
                raise self._error(f"cannot open {self.path}: {e}") from None
            try:
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                setup(db)
            except BaseException:
                db.close()
                raise
            self._db = db

        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, connect)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(db)` on the connection's thread."""
        thread = self._thread
        if thread is None:
            raise self._error(f"the {self._name} store is not open")

        def call() -> T:
            if self._db is None:
                raise self._error(f"the {self._name} store is closed")
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(thread, call)

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return

        def disconnect() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        try:
            await asyncio.get_running_loop().run_in_executor(thread, disconnect)
        finally:
            thread.shutdown(wait=False)


def migrate(db: sqlite3.Connection, *, table: str, migrations: Mapping[int, Sequence[str]],
            target: int, what: str, log: logging.Logger) -> None:
    """Bring `db` to schema `target`: each version's statements above the one kept in `table`,
    in one transaction (BEGIN IMMEDIATE: one migrating process at a time). A database newer
    than `target` is left as it is, with a warning naming `what` ("records database")."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER NOT NULL)")
        row = db.execute(f"SELECT max(version) FROM {table}").fetchone()
        current = int(row[0] or 0)
        for version in range(current + 1, target + 1):
            for statement in migrations[version]:
                db.execute(statement)
            db.execute(f"DELETE FROM {table}")
            db.execute(f"INSERT INTO {table} (version) VALUES (?)", (version,))
            log.info("%s migrated to schema version %d", what, version)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    if current > target:
        log.warning("%s is at schema version %d, newer than this server's %d", what, current,
                    target)
