"""Where call records live: one `RecordStore` contract, two backends.

SQLite (the default, no set-up) runs every statement on one dedicated thread, so the event loop
never waits on the disk. PostgreSQL (for several instances) goes through asyncpg. Both keep the
whole record as JSON plus the columns that listing and filtering need, and both migrate their
schema forward by version when opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import orjson

from server.call.record import parse_stamp, stamp
from server.records.sqlite import SQLiteThread, migrate

log = logging.getLogger("server.records")

DEFAULT_DATABASE_URL = "sqlite:///calls.db"
MAX_PAGE = 500
T = TypeVar("T")


class StoreError(Exception):
    """The store cannot be used (bad URL, unreachable server, newer schema); safe to log."""


# --- the contract ---


@dataclass(frozen=True, slots=True)
class CallQuery:
    """A page of `GET /calls`: newest first; `cursor` is the `next` of the previous page."""

    limit: int = 50
    cursor: str | None = None
    number: str | None = None  # matches `from` or `to` exactly
    since: datetime | None = None  # started_at >= since
    until: datetime | None = None  # started_at < until
    end_kind: str | None = None  # how the call ended (EndKind value), exactly


# The response-latency histogram's bucket edges (ms); the last bucket is open-ended.
LATENCY_EDGES_MS = (250, 500, 750, 1000, 1250, 1500, 2000, 3000, 5000)


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """`GET /stats`: calls that started in [since, until)."""

    since: datetime
    until: datetime | None = None


class RecordStore(Protocol):
    """What the writer, the API, the CLI and retention need from a database."""

    @property
    def description(self) -> str:
        """Where the records are, without any password (for log lines)."""

    @property
    def reconnects(self) -> bool:
        """True when an `open` that failed is retried by later calls (a database server that
        may come back); False when a failed open is final (a file that cannot be opened)."""

    async def open(self, *, migrate_to: int | None = None) -> None:
        """Connect and migrate the schema forward (to `migrate_to`, default the latest)."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the database answers a trivial query."""

    async def schema_version(self) -> int: ...

    async def save(self, record: Mapping[str, Any]) -> bool:
        """Insert or replace one record (`CallRecord.to_dict()`), keyed by call_sid; False when
        the stored state is newer (its `updated_at` is later) and was kept instead.

        Serializes before it awaits: the caller may go on changing its objects."""

    async def find_prefix(self, prefix: str, limit: int) -> list[str]:
        """Call SIDs that start with `prefix` (case-sensitive), sorted, at most `limit`."""

    async def get(self, call_sid: str) -> dict[str, Any] | None: ...

    async def page(self, query: CallQuery) -> tuple[list[dict[str, Any]], str | None]:
        """Summaries, newest first, and the cursor of the next page (None on the last)."""

    async def stats(self, query: StatsQuery) -> dict[str, Any]:
        """What the console's charts need (`stats_answer`): calls per hour, a latency
        histogram, and the count of each ending."""

    async def delete_older_than(self, cutoff: datetime) -> list[str]:
        """Delete records that started before `cutoff`; return their recordings' paths."""


# --- URLs ---


def open_store(url: str = DEFAULT_DATABASE_URL) -> RecordStore:
    """The store for a DATABASE_URL (not connected yet); StoreError when the URL is not one."""
    if url == "off":
        return NullStore()
    scheme, sep, _ = url.partition("://")
    if scheme == "sqlite" and sep:
        return SQLiteStore(sqlite_path(url))
    if scheme in ("postgresql", "postgres") and sep:
        return PostgresStore(url)
    raise StoreError("DATABASE_URL is not a sqlite:/// or postgresql:// URL")


class NullStore:
    """DATABASE_URL=off: nothing about calls is kept (no transcripts, no records)."""

    description = "nowhere (DATABASE_URL=off)"
    reconnects = False

    async def open(self, *, migrate_to: int | None = None) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def schema_version(self) -> int:
        return 0

    async def save(self, record: Mapping[str, Any]) -> bool:
        return True

    async def find_prefix(self, prefix: str, limit: int) -> list[str]:
        return []

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        return None

    async def page(self, query: CallQuery) -> tuple[list[dict[str, Any]], str | None]:
        return [], None

    async def stats(self, query: StatsQuery) -> dict[str, Any]:
        return stats_answer(query, [], [], [], (0, None))

    async def delete_older_than(self, cutoff: datetime) -> list[str]:
        return []


def sqlite_path(url: str) -> Path:
    """sqlite:///relative/calls.db -> relative/calls.db (working directory);
    sqlite:////abs/calls.db -> /abs/calls.db."""
    scheme, sep, rest = url.partition("://")
    if scheme != "sqlite" or not sep or not rest.startswith("/") or not rest.strip("/"):
        raise StoreError("a SQLite DATABASE_URL looks like sqlite:///calls.db")
    path = unquote(rest[1:].split("?", 1)[0])
    return Path(path)


def redact(url: str) -> str:
    """The URL with its password replaced, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# --- shared helpers ---


SUMMARY_COLUMNS = ("call_sid", "caller", "called", "direction", "started_at", "ended_at",
                   "duration_seconds", "end_kind", "end_reason", "cost_usd", "recording")


def _row_values(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The columns kept beside the JSON body, in SUMMARY_COLUMNS order (minus call_sid)."""

    def number(key: str) -> float | None:
        value = record.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def text(key: str) -> str | None:
        value = record.get(key)
        return value if isinstance(value, str) else None

    return (text("from") or "", text("to") or "", text("direction") or "",
            text("started_at"), text("ended_at"), number("duration_seconds"),
            text("end_kind"), text("end_reason"), number("cost_usd"), text("recording"))


def _state_at(record: Mapping[str, Any]) -> datetime | None:
    """When the record's snapshot was taken (None for a record without one: it always replaces
    and is always replaced, as before schema version 3)."""
    return parse_stamp(record.get("updated_at"))


def _summary(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {
        "call_sid": row["call_sid"],
        "from": row["caller"],
        "to": row["called"],
        "direction": row["direction"],
        "started_at": _iso(row["started_at"]),
        "ended_at": _iso(row["ended_at"]),
        "duration_seconds": row["duration_seconds"],
        "end_kind": row["end_kind"],
        "end_reason": row["end_reason"],
        "cost_usd": row["cost_usd"],
        "recording": bool(row["recording"]),
    }
    return out


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value if isinstance(value, str) else None


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _sql_time(moment: datetime) -> str:
    """A datetime as the records' own ISO form, which orders correctly as text in SQLite."""
    iso = _iso(moment)
    assert iso is not None
    return iso


def encode_cursor(started_at: str, call_sid: str) -> str:
    return f"{started_at}|{call_sid}"


def decode_cursor(cursor: str) -> tuple[str, str]:
    """(started_at in the records' own UTC form, call_sid); StoreError (a 400 to an API caller)
    when it is not a cursor this server made."""
    started_at, sep, call_sid = cursor.partition("|")
    moment = _parse_time(started_at)
    try:
        iso = _iso(moment) if moment is not None else None
    except OverflowError:  # a time UTC cannot hold: 9999-12-31T23:00-05:00
        iso = None
    if not sep or not call_sid or iso is None:
        raise StoreError("cursor is not one this server returned")
    return iso, call_sid


def _limit(query: CallQuery) -> int:
    return max(1, min(query.limit, MAX_PAGE))


def _bucket_case(value: str) -> str:
    """SQL that maps a latency to its bucket's index (the same in SQLite and PostgreSQL)."""
    whens = " ".join(f"WHEN {value} < {edge} THEN {i}" for i, edge in enumerate(LATENCY_EDGES_MS))
    return f"CASE {whens} ELSE {len(LATENCY_EDGES_MS)} END"


def stats_answer(query: StatsQuery, hours: list[tuple[str, int]],
                 endings: list[tuple[str | None, int]], buckets: list[tuple[int, int]],
                 latency: tuple[float, float | None]) -> dict[str, Any]:
    """The `GET /stats` JSON from the stores' aggregates: `hours` (hour as `YYYY-MM-DDTHH`,
    calls), `endings` (end_kind or None while a call is unfinished, calls), `buckets` (index,
    count) and `latency` (sum of every latency, the largest)."""
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    for index, count in buckets:
        if 0 <= index < len(counts):
            counts[index] += int(count)
    total, largest = latency
    n = sum(counts)
    edges = (0, *LATENCY_EDGES_MS)
    histogram = [{"from": edges[i], "to": LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS)
                  else None, "count": counts[i]} for i in range(len(counts))]
    return {
        "since": _iso(query.since),
        "until": _iso(query.until) if query.until else None,
        "calls": sum(c for _, c in endings),
        "per_hour": [{"hour": f"{hour}:00:00Z", "calls": int(calls)} for hour, calls in hours],
        "endings": [{"kind": kind, "calls": int(calls)}
                    for kind, calls in sorted(endings, key=lambda e: (-e[1], e[0] or ""))],
        "latency_ms": {
            "count": n,
            "mean": round(total / n, 1) if n else None,
            "max": round(largest, 1) if n and largest is not None else None,
            "p50": _estimate(histogram, n, 0.5),
            "p90": _estimate(histogram, n, 0.9),
            "buckets": histogram,
        },
    }


def _estimate(histogram: list[dict[str, Any]], n: int, q: float) -> float | None:
    """A percentile from the histogram, interpolated inside its bucket (an estimate: the
    stores keep no sorted latencies); in the open last bucket, its lower edge."""
    if not n:
        return None
    rank = q * n
    seen = 0
    for bucket in histogram:
        count = bucket["count"]
        if count and seen + count >= rank:
            if bucket["to"] is None:
                return float(bucket["from"])
            share = (rank - seen) / float(count)
            low, high = float(bucket["from"]), float(bucket["to"])
            return float(round(low + share * (high - low), 1))
        seen += count
    return None


# --- SQLite ---

# Each version is a list of statements; a database at version N runs N+1.. in order.
SQLITE_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE calls (
            call_sid TEXT PRIMARY KEY,
            caller TEXT NOT NULL DEFAULT '',
            called TEXT NOT NULL DEFAULT '',
            direction TEXT NOT NULL DEFAULT '',
            started_at TEXT,
            ended_at TEXT,
            duration_seconds REAL,
            end_kind TEXT,
            end_reason TEXT,
            cost_usd REAL,
            recording TEXT,
            body TEXT NOT NULL
        )""",
    ],
    2: [
        "ALTER TABLE calls ADD COLUMN updated_at TEXT",
        "CREATE INDEX calls_started ON calls (started_at DESC, call_sid DESC)",
        "CREATE INDEX calls_caller ON calls (caller, started_at DESC)",
        "CREATE INDEX calls_called ON calls (called, started_at DESC)",
    ],
    # When the stored state was taken (the record's `updated_at`): a save of an older state of
    # the same call (a retried or spooled record, a handed-over call's first instance) is refused.
    3: ["ALTER TABLE calls ADD COLUMN state_at TEXT"],
}
SCHEMA_VERSION = max(SQLITE_MIGRATIONS)


class SQLiteStore:
    """One connection, used only from one dedicated thread (WAL: readers never wait on it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sqlite = SQLiteThread(path, "records", StoreError)

    @property
    def description(self) -> str:
        return f"SQLite {self.path}"

    @property
    def reconnects(self) -> bool:
        return False

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._sqlite.run(fn)

    async def open(self, *, migrate_to: int | None = None) -> None:
        version = migrate_to if migrate_to is not None else SCHEMA_VERSION
        await self._sqlite.open(lambda db: _sqlite_migrate(db, version))

    async def close(self) -> None:
        await self._sqlite.close()

    async def ping(self) -> bool:
        try:
            return await self._run(lambda db: db.execute("SELECT 1").fetchone()[0] == 1)
        except (sqlite3.Error, StoreError):
            return False

    async def schema_version(self) -> int:
        return await self._run(_sqlite_version)

    async def save(self, record: Mapping[str, Any]) -> bool:
        body = orjson.dumps(record).decode()
        state_at = _state_at(record)
        values = (str(record.get("call_sid") or ""), *_row_values(record), body,
                  _sql_time(datetime.now(UTC)), stamp(state_at) if state_at else None)
        if not values[0]:
            raise StoreError("a record without a call_sid cannot be stored")

        def write(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                """INSERT INTO calls (call_sid, caller, called, direction, started_at, ended_at,
                       duration_seconds, end_kind, end_reason, cost_usd, recording, body,
                       updated_at, state_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (call_sid) DO UPDATE SET
                       caller = excluded.caller, called = excluded.called,
                       direction = excluded.direction, started_at = excluded.started_at,
                       ended_at = excluded.ended_at, duration_seconds = excluded.duration_seconds,
                       end_kind = excluded.end_kind, end_reason = excluded.end_reason,
                       cost_usd = excluded.cost_usd, recording = excluded.recording,
                       body = excluded.body, updated_at = excluded.updated_at,
                       state_at = excluded.state_at
                   WHERE calls.state_at IS NULL OR excluded.state_at IS NULL
                       OR excluded.state_at >= calls.state_at""",
                values,
            )
            return cursor.rowcount > 0

        return await self._run(write)

    async def find_prefix(self, prefix: str, limit: int) -> list[str]:
        def read(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("SELECT call_sid FROM calls WHERE substr(call_sid, 1, ?) = ? "
                              "ORDER BY call_sid LIMIT ?", (len(prefix), prefix, limit))
            return [str(r[0]) for r in rows]

        return await self._run(read)

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        def read(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT body FROM calls WHERE call_sid = ?", (call_sid,)).fetchone()
            return str(row[0]) if row else None

        body = await self._run(read)
        return _loads(body) if body is not None else None

    async def page(self, query: CallQuery) -> tuple[list[dict[str, Any]], str | None]:
        where: list[str] = []
        args: list[Any] = []
        if query.cursor:
            started_at, call_sid = decode_cursor(query.cursor)
            where.append("(started_at, call_sid) < (?, ?)")
            args += [started_at, call_sid]
        if query.number:
            where.append("(caller = ? OR called = ?)")
            args += [query.number, query.number]
        if query.since:
            where.append("started_at >= ?")
            args.append(_sql_time(query.since))
        if query.until:
            where.append("started_at < ?")
            args.append(_sql_time(query.until))
        if query.end_kind:
            where.append("end_kind = ?")
            args.append(query.end_kind)
        limit = _limit(query)
        sql = (f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM calls"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY started_at DESC, call_sid DESC LIMIT ?")
        args.append(limit + 1)

        def read(db: sqlite3.Connection) -> list[sqlite3.Row]:
            return db.execute(sql, args).fetchall()

        rows = await self._run(read)
        return _page([dict(r) for r in rows], limit)

    async def stats(self, query: StatsQuery) -> dict[str, Any]:
        where = "started_at >= ?" + (" AND started_at < ?" if query.until else "")
        args = [_sql_time(query.since)] + ([_sql_time(query.until)] if query.until else [])
        value = "CAST(j.value AS REAL)"

        def read(db: sqlite3.Connection) -> dict[str, Any]:
            hours = db.execute(f"SELECT substr(started_at, 1, 13) AS hour, count(*) FROM calls "
                               f"WHERE {where} GROUP BY hour ORDER BY hour", args).fetchall()
            endings = db.execute(f"SELECT end_kind, count(*) FROM calls WHERE {where} "
                                 f"GROUP BY end_kind", args).fetchall()
            latencies = (f"FROM calls, json_each(calls.body, '$.latencies_ms') AS j "
                         f"WHERE {where} AND json_valid(calls.body) "
                         f"AND json_type(calls.body, '$.latencies_ms') = 'array' "
                         f"AND j.type IN ('integer', 'real')")
            buckets = db.execute(f"SELECT {_bucket_case(value)} AS b, count(*) {latencies} "
                                 f"GROUP BY b", args).fetchall()
            total, largest = db.execute(f"SELECT coalesce(sum({value}), 0), max({value}) "
                                        f"{latencies}", args).fetchone()
            return stats_answer(query, [(str(h), int(c)) for h, c in hours],
                                [(k, int(c)) for k, c in endings],
                                [(int(b), int(c)) for b, c in buckets],
                                (float(total), float(largest) if largest is not None else None))

        return await self._run(read)

    async def delete_older_than(self, cutoff: datetime) -> list[str]:
        def delete(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("DELETE FROM calls WHERE started_at < ? RETURNING recording",
                              (_sql_time(cutoff),)).fetchall()
            return [str(r[0]) for r in rows if r[0]]

        return await self._run(delete)


def _sqlite_version(db: sqlite3.Connection) -> int:
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                        "AND name = 'schema_version'").fetchone()
    if not exists:
        return 0
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _sqlite_migrate(db: sqlite3.Connection, target: int) -> None:
    migrate(db, table="schema_version", migrations=SQLITE_MIGRATIONS, target=target,
            what="records database", log=log)


def _page(rows: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], str | None]:
    more = len(rows) > limit
    rows = rows[:limit]
    summaries = [_summary(r) for r in rows]
    next_cursor = None
    if more and summaries:
        last = summaries[-1]
        next_cursor = encode_cursor(last["started_at"] or "", last["call_sid"])
    return summaries, next_cursor


def _loads(body: str | bytes) -> dict[str, Any]:
    value = orjson.loads(body)
    return value if isinstance(value, dict) else {}


# --- PostgreSQL ---

PG_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE calls (
            call_sid TEXT PRIMARY KEY,
            caller TEXT NOT NULL DEFAULT '',
            called TEXT NOT NULL DEFAULT '',
            direction TEXT NOT NULL DEFAULT '',
            started_at TIMESTAMPTZ,
            ended_at TIMESTAMPTZ,
            duration_seconds DOUBLE PRECISION,
            end_kind TEXT,
            end_reason TEXT,
            cost_usd DOUBLE PRECISION,
            recording TEXT,
            body JSON NOT NULL
        )""",
    ],
    2: [
        "ALTER TABLE calls ADD COLUMN updated_at TIMESTAMPTZ",
        "CREATE INDEX calls_started ON calls (started_at DESC, call_sid DESC)",
        "CREATE INDEX calls_caller ON calls (caller, started_at DESC)",
        "CREATE INDEX calls_called ON calls (called, started_at DESC)",
    ],
    3: ["ALTER TABLE calls ADD COLUMN state_at TIMESTAMPTZ"],
}
assert max(PG_MIGRATIONS) == SCHEMA_VERSION
_PG_MIGRATION_LOCK = 0x6272_6467_6563_6473  # an advisory lock id: one migrating instance


class PostgresStore:
    """asyncpg pool; several bridge instances may share one database."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 10.0) -> None:
        self.url = url.replace("postgres://", "postgresql://", 1)
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: Any = None
        self._target: int | None = None  # set by open(): connect (again) up to this version
        self._closed = False
        self._connecting = asyncio.Lock()

    @property
    def description(self) -> str:
        return f"PostgreSQL {redact(self.url)}"

    @property
    def reconnects(self) -> bool:
        return True

    async def _ready(self) -> Any:
        """The pool; after a failed open (database down at start), try to connect again."""
        if self._pool is not None:
            return self._pool
        if self._target is None or self._closed:
            raise StoreError("the records store is not open")
        async with self._connecting:
            if self._pool is None:
                await self._connect(self._target)
        return self._pool

    async def open(self, *, migrate_to: int | None = None) -> None:
        self._target = migrate_to if migrate_to is not None else SCHEMA_VERSION
        self._closed = False
        async with self._connecting:
            await self._connect(self._target)

    async def _connect(self, target: int) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self._pool_size, timeout=self._timeout,
                command_timeout=self._timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise StoreError(f"cannot connect to {self.description}: "
                             f"{type(e).__name__}: {_no_password(str(e), self.url)}") from None
        try:
            await self._migrate(target)
        except BaseException:
            pool, self._pool = self._pool, None
            pool.terminate()
            raise

    async def _migrate(self, target: int) -> None:
        async with self._pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", _PG_MIGRATION_LOCK)
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version "
                             "(version INTEGER NOT NULL)")
            current = int(await db.fetchval("SELECT coalesce(max(version), 0) "
                                            "FROM schema_version"))
            for version in range(current + 1, target + 1):
                for statement in PG_MIGRATIONS[version]:
                    await db.execute(statement)
                await db.execute("DELETE FROM schema_version")
                await db.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                log.info("records database migrated to schema version %d", version)
        if current > SCHEMA_VERSION:
            log.warning("records database schema is version %d, newer than this server's %d",
                        current, SCHEMA_VERSION)

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    async def ping(self) -> bool:
        try:
            pool = await self._ready()
            return bool(await pool.fetchval("SELECT 1", timeout=2.0) == 1)
        except Exception:
            return False

    async def schema_version(self) -> int:
        return int(await (await self._ready()).fetchval(
            "SELECT coalesce(max(version), 0) FROM schema_version"))

    async def save(self, record: Mapping[str, Any]) -> bool:
        body = orjson.dumps(record).decode()
        call_sid = str(record.get("call_sid") or "")
        if not call_sid:
            raise StoreError("a record without a call_sid cannot be stored")
        (caller, called, direction, started_at, ended_at, duration, end_kind, end_reason,
         cost, recording) = _row_values(record)
        status = await (await self._ready()).execute(
            """INSERT INTO calls (call_sid, caller, called, direction, started_at, ended_at,
                   duration_seconds, end_kind, end_reason, cost_usd, recording, body, updated_at,
                   state_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::json, now(), $13)
               ON CONFLICT (call_sid) DO UPDATE SET
                   caller = excluded.caller, called = excluded.called,
                   direction = excluded.direction, started_at = excluded.started_at,
                   ended_at = excluded.ended_at, duration_seconds = excluded.duration_seconds,
                   end_kind = excluded.end_kind, end_reason = excluded.end_reason,
                   cost_usd = excluded.cost_usd, recording = excluded.recording,
                   body = excluded.body, updated_at = excluded.updated_at,
                   state_at = excluded.state_at
               WHERE calls.state_at IS NULL OR excluded.state_at IS NULL
                   OR excluded.state_at >= calls.state_at""",
            call_sid, caller, called, direction, _parse_time(started_at), _parse_time(ended_at),
            duration, end_kind, end_reason, cost, recording, body, _state_at(record))
        return str(status).rsplit(" ", 1)[-1] != "0"

    async def find_prefix(self, prefix: str, limit: int) -> list[str]:
        rows = await (await self._ready()).fetch(
            "SELECT call_sid FROM calls WHERE starts_with(call_sid, $1) "
            "ORDER BY call_sid COLLATE \"C\" LIMIT $2", prefix, limit)
        return [str(r["call_sid"]) for r in rows]

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        body = await (await self._ready()).fetchval(
            "SELECT body::text FROM calls WHERE call_sid = $1", call_sid)
        return _loads(body) if body is not None else None

    async def page(self, query: CallQuery) -> tuple[list[dict[str, Any]], str | None]:
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.cursor:
            started_at, call_sid = decode_cursor(query.cursor)
            where.append(f"(started_at, call_sid) < ({arg(_parse_time(started_at))}, "
                         f"{arg(call_sid)})")
        if query.number:
            number = arg(query.number)
            where.append(f"(caller = {number} OR called = {number})")
        if query.since:
            where.append(f"started_at >= {arg(query.since)}")
        if query.until:
            where.append(f"started_at < {arg(query.until)}")
        if query.end_kind:
            where.append(f"end_kind = {arg(query.end_kind)}")
        limit = _limit(query)
        sql = (f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM calls"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + f" ORDER BY started_at DESC, call_sid DESC LIMIT {arg(limit + 1)}")
        rows = await (await self._ready()).fetch(sql, *args)
        return _page([dict(r) for r in rows], limit)

    async def stats(self, query: StatsQuery) -> dict[str, Any]:
        args: list[Any] = [query.since] + ([query.until] if query.until else [])
        where = "started_at >= $1" + (" AND started_at < $2" if query.until else "")
        latencies = ("FROM calls, LATERAL json_array_elements(CASE WHEN "
                     "json_typeof(body->'latencies_ms') = 'array' THEN body->'latencies_ms' "
                     f"END) AS j(v) WHERE {where} AND json_typeof(j.v) = 'number'")
        value = "(j.v::text)::float8"
        pool = await self._ready()
        async with pool.acquire() as db, db.transaction(readonly=True):  # one snapshot
            hours = await db.fetch(
                "SELECT to_char(date_trunc('hour', started_at AT TIME ZONE 'UTC'), "
                f"'YYYY-MM-DD\"T\"HH24') AS hour, count(*) AS n FROM calls WHERE {where} "
                "GROUP BY hour ORDER BY hour", *args)
            endings = await db.fetch(f"SELECT end_kind, count(*) AS n FROM calls WHERE {where} "
                                     "GROUP BY end_kind", *args)
            buckets = await db.fetch(f"SELECT {_bucket_case(value)} AS b, count(*) AS n "
                                     f"{latencies} GROUP BY b", *args)
            total = await db.fetchrow(f"SELECT coalesce(sum({value}), 0) AS s, max({value}) AS m "
                                      f"{latencies}", *args)
        return stats_answer(query, [(str(r["hour"]), int(r["n"])) for r in hours],
                            [(r["end_kind"], int(r["n"])) for r in endings],
                            [(int(r["b"]), int(r["n"])) for r in buckets],
                            (float(total["s"]), float(total["m"]) if total["m"] is not None
                             else None))

    async def delete_older_than(self, cutoff: datetime) -> list[str]:
        rows = await (await self._ready()).fetch(
            "DELETE FROM calls WHERE started_at < $1 RETURNING recording", cutoff)
        return [str(r["recording"]) for r in rows if r["recording"]]


def _no_password(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[RecordStore]:
    """`async with opened(url) as store:` for the CLI and tests."""
    store = open_store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
