"""Campaigns in the records database (DATABASE_URL): SQLite or PostgreSQL.

A store of its own beside `server.records.store`, on the same database: its own tables
(`campaigns`, `campaign_calls`, `campaign_early_outcomes`) and its own schema version table
(`outbound_schema_version`), migrated forward by version in the records store's style. Kept apart
so that the records schema and this one evolve without ordering each other's migrations, and
because campaigns need multi-statement transactions that the records contract does not offer.

Fleet safety comes from the database, not from this process:
- Claiming is one transaction per campaign. PostgreSQL locks the campaign's row
  (`SELECT … FOR UPDATE`), so two instances claim for one campaign one after the other, and
  each counts the calls placed and not ended (`placing` + `in_progress`) after the other's
  commit: the concurrency holds fleet-wide. SQLite takes the database's write lock
  (`BEGIN IMMEDIATE`), which serialises every writer on the file.
- A number busy in any campaign (placing or in progress) is not claimed again until it ends
  (PostgreSQL: a transaction-scoped advisory lock on the number closes the race between two
  campaigns' claims).
- A claim carries a lease. A claim whose instance died before it dialled goes back to pending
  when the lease lapses; one that died while dialling becomes the outcome `unknown` (Twilio may
  have placed that call: dialling again could ring the person twice), retried only if the
  campaign's `retries` allow `unknown`. A call whose end is never reported becomes `unknown`
  after `stale_at`.
- Outcomes are keyed by CallSid. One reported before the placement was recorded (Twilio's
  callback raced the create request's answer, perhaps to another instance) is kept in
  `campaign_early_outcomes` and applied when the placement is recorded.

Times are epoch seconds from the caller's clock (injectable: tests move it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from server.outbound.spec import (
    RETRYABLE,
    SKIPPED,
    TWILIO_FINAL,
    CallSpec,
    CampaignSpec,
    after_outcome,
    classify,
)
from server.records.sqlite import SQLiteThread, migrate
from server.records.store import StoreError, redact, sqlite_path

log = logging.getLogger("server.outbound")
T = TypeVar("T")

# Entry states. Open: still to be dialled, or being dialled, or on the line.
PENDING, WAITING, PLACING, IN_PROGRESS, DONE, SKIPPED_STATE = (
    "pending", "waiting", "placing", "in_progress", "done", "skipped")
STATES = (PENDING, WAITING, PLACING, IN_PROGRESS, DONE, SKIPPED_STATE)
ACTIVE = (PLACING, IN_PROGRESS)  # placed (or about to be) and not ended: what concurrency counts
# Campaign statuses.
RUNNING, PAUSED, CANCELLED, FINISHED = "running", "paused", "cancelled", "done"
EARLY_KEEP_S = 6 * 3600.0  # an early outcome nobody claimed (not a campaign call) is dropped


class NotFound(StoreError):
    """No campaign with that id."""


class Conflict(StoreError):
    """The campaign's status does not allow that (resume a cancelled campaign…)."""


# --- what the store hands out ---


@dataclass(frozen=True)
class Campaign:
    id: str
    status: str
    spec: CampaignSpec
    created_at: float
    created_by: str = ""


@dataclass(frozen=True)
class Entry:
    """One number of a campaign, as claimed for dialling. `attempt` counts from 1."""

    campaign_id: str
    seq: int
    to: str
    variables: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    timezone: str | None = None
    attempt: int = 1

    @property
    def key(self) -> str:
        """A stable id for this entry (`<campaign id>:<seq>`): for the call's plan."""
        return f"{self.campaign_id}:{self.seq}"


@dataclass(frozen=True)
class NewEntry:
    """An entry to insert: its checked number, or the reason it is skipped."""

    spec: CallSpec
    number: str  # normalised when valid, else as given
    skipped: str | None = None  # one of SKIPPED, or None to dial
    detail: str | None = None


Verdict = tuple[str, Any]  # ("claim", None) | ("skip", outcome) | ("wait", next_at)
Decide = Callable[[Campaign, Entry], Verdict]


# --- the SQL, written once (`?` placeholders; PostgreSQL gets `$n`) ---

_MIGRATIONS_COMMON: dict[int, list[str]] = {
    1: [
        """CREATE TABLE campaigns (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            status TEXT NOT NULL,
            concurrency INTEGER NOT NULL,
            spec TEXT NOT NULL,
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL,
            created_by TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX campaigns_status ON campaigns (status, created_at)",
        """CREATE TABLE campaign_calls (
            campaign_id TEXT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            number TEXT NOT NULL,
            variables TEXT NOT NULL DEFAULT '{{}}',
            metadata TEXT NOT NULL DEFAULT '{{}}',
            timezone TEXT,
            state TEXT NOT NULL,
            outcome TEXT,
            tries TEXT NOT NULL DEFAULT '{{}}',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at {real} NOT NULL DEFAULT 0,
            call_sid TEXT,
            answered_by TEXT,
            claimed_by TEXT,
            lease_until {real},
            dialing INTEGER NOT NULL DEFAULT 0,
            detail TEXT,
            updated_at {real} NOT NULL,
            PRIMARY KEY (campaign_id, seq)
        )""",
        "CREATE INDEX campaign_calls_due ON campaign_calls (campaign_id, state, next_at, seq)",
        "CREATE UNIQUE INDEX campaign_calls_sid ON campaign_calls (call_sid) "
        "WHERE call_sid IS NOT NULL",
        "CREATE INDEX campaign_calls_number ON campaign_calls (number, state)",
        """CREATE TABLE campaign_early_outcomes (
            call_sid TEXT PRIMARY KEY,
            status TEXT,
            answered_by TEXT,
            at {real} NOT NULL
        )""",
    ],
}
SCHEMA_VERSION = max(_MIGRATIONS_COMMON)
VERSION_TABLE = "outbound_schema_version"


def _migrations(real: str) -> dict[int, list[str]]:
    return {v: [s.format(real=real) for s in stmts] for v, stmts in _MIGRATIONS_COMMON.items()}


_ENTRY_COLUMNS = ("campaign_id, seq, number, variables, metadata, timezone, state, outcome, "
                  "tries, attempts, next_at, call_sid, answered_by, claimed_by, lease_until, "
                  "dialing, detail")


class _Tx(Protocol):
    """One transaction, whatever the database."""

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Rows changed."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def lock_campaign(self, campaign_id: str) -> dict[str, Any] | None:
        """The campaign's row, locked until the transaction ends (SQLite: already locked)."""

    async def try_lock_number(self, number: str) -> bool:
        """Hold this number until the transaction ends; False when another holds it."""


class _Backend(Protocol):
    description: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self, write: bool = True) -> contextlib.AbstractAsyncContextManager[_Tx]:
        """One transaction; `write=False` for reads only (SQLite: no write lock taken)."""


# --- SQLite ---


class _SQLiteTx:
    def __init__(self, run: Callable[[Callable[[sqlite3.Connection], Any]], Any]) -> None:
        self._run = run

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        rows: list[sqlite3.Row] = await self._run(lambda db: db.execute(sql, args).fetchall())
        return [dict(r) for r in rows]

    async def execute(self, sql: str, *args: Any) -> int:
        count: int = await self._run(lambda db: db.execute(sql, args).rowcount)
        return count

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._run(lambda db: db.executemany(sql, rows))

    async def lock_campaign(self, campaign_id: str) -> dict[str, Any] | None:
        rows = await self.fetch("SELECT * FROM campaigns WHERE id = ?", campaign_id)
        return rows[0] if rows else None

    async def try_lock_number(self, number: str) -> bool:
        return True  # BEGIN IMMEDIATE: this transaction is the only writer


class _SQLite:
    """One connection on one dedicated thread, like the records store; a transaction spans
    several hops to that thread, so an asyncio lock keeps this process's transactions apart and
    `BEGIN IMMEDIATE` keeps other processes' out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"SQLite {path}"
        self._sqlite = SQLiteThread(path, "campaigns", StoreError)
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._sqlite.run(fn)

    async def open(self) -> None:
        def setup(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA foreign_keys=ON")
            _sqlite_migrate(db)

        await self._sqlite.open(setup, busy_timeout_ms=10000)

    async def close(self) -> None:
        await self._sqlite.close()

    @contextlib.asynccontextmanager
    async def transaction(self, write: bool = True) -> AsyncIterator[_Tx]:
        begin = "BEGIN IMMEDIATE" if write else "BEGIN"  # WAL: a read never waits for writers
        async with self._lock:
            try:
                await self._run(lambda db: db.execute(begin))
            except sqlite3.Error as e:
                raise StoreError(f"campaign store: {e}") from None
            try:
                yield _SQLiteTx(self._run)
                await self._run(lambda db: db.execute("COMMIT"))
            except BaseException as e:
                with contextlib.suppress(Exception):
                    await self._run(lambda db: db.in_transaction and db.execute("ROLLBACK"))
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"campaign store: {e}") from None
                raise


def _sqlite_migrate(db: sqlite3.Connection) -> None:
    migrate(db, table=VERSION_TABLE, migrations=_migrations("REAL"), target=SCHEMA_VERSION,
            what="campaign tables", log=log)


# --- PostgreSQL ---


def _dollars(sql: str) -> str:
    """`?` placeholders -> `$1, $2, …` (the SQL here has no literal question marks)."""
    parts = sql.split("?")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._conn.fetch(_dollars(sql), *args)]

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(_dollars(sql), *args)
        tail = str(status).rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(_dollars(sql), rows)

    async def lock_campaign(self, campaign_id: str) -> dict[str, Any] | None:
        rows = await self.fetch("SELECT * FROM campaigns WHERE id = ? FOR UPDATE", campaign_id)
        return rows[0] if rows else None

    async def try_lock_number(self, number: str) -> bool:
        return bool(await self._conn.fetchval(
            "SELECT pg_try_advisory_xact_lock($1::int, hashtext($2))", _NUMBER_LOCKS, number))


_NUMBER_LOCKS = 0x6F62  # the advisory lock space ("ob") of numbers being claimed
_PG_MIGRATION_LOCK = 0x6F75_7462_6F75_6E64  # one migrating instance


class _Postgres:
    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 10.0) -> None:
        self.url = url.replace("postgres://", "postgresql://", 1)
        self.description = f"PostgreSQL {redact(self.url)}"
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self._pool_size, timeout=self._timeout,
                command_timeout=self._timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise StoreError(f"cannot connect to {self.description}: {type(e).__name__}"
                             ) from None
        try:
            await self._migrate()
        except BaseException:
            pool, self._pool = self._pool, None
            pool.terminate()
            raise

    async def _migrate(self) -> None:
        async with self._pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", _PG_MIGRATION_LOCK)
            await db.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} "
                             "(version INTEGER NOT NULL)")
            current = int(await db.fetchval(
                f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}"))
            for version, statements in sorted(_migrations("DOUBLE PRECISION").items()):
                if version <= current:
                    continue
                for statement in statements:
                    await db.execute(statement)
                await db.execute(f"DELETE FROM {VERSION_TABLE}")
                await db.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES ($1)", version)
                log.info("campaign tables migrated to schema version %d", version)
        if current > SCHEMA_VERSION:
            log.warning("campaign tables are at schema version %d, newer than this server's %d",
                        current, SCHEMA_VERSION)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    @contextlib.asynccontextmanager
    async def transaction(self, write: bool = True) -> AsyncIterator[_Tx]:
        import asyncpg

        if self._pool is None:
            raise StoreError("the campaign store is not open")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield _PgTx(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            raise StoreError(f"campaign store: {type(e).__name__}: {e}") from None


# --- the store ---


def iso(epoch: float) -> str:
    """Epoch seconds as the records' ISO 8601 UTC form (`2025-03-03T11:06:40.000Z`)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _loads(text: Any) -> Any:
    return orjson.loads(text) if text else {}


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _campaign(row: Mapping[str, Any]) -> Campaign:
    return Campaign(id=str(row["id"]), status=str(row["status"]),
                    spec=CampaignSpec.from_dict(_loads(row["spec"])),
                    created_at=float(row["created_at"]), created_by=str(row["created_by"]))


def _entry(row: Mapping[str, Any]) -> Entry:
    return Entry(campaign_id=str(row["campaign_id"]), seq=int(row["seq"]),
                 to=str(row["number"]), variables=_loads(row["variables"]),
                 metadata=_loads(row["metadata"]), timezone=row["timezone"],
                 attempt=int(row["attempts"]) + (0 if row["dialing"] else 1))


class CampaignStore:
    """Campaigns and their numbers; every change that must be atomic is one transaction.

    Create with `open_campaign_store(DATABASE_URL)`, then `await open()`; `await close()`."""

    def __init__(self, backend: _Backend) -> None:
        self._db = backend

    @property
    def description(self) -> str:
        return self._db.description

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    # --- operators ---

    async def create(self, campaign_id: str, spec: CampaignSpec, entries: Sequence[NewEntry],
                     *, now: float, created_by: str = "") -> None:
        rows = [(campaign_id, seq, e.number, _dumps(dict(e.spec.variables)),
                 _dumps(dict(e.spec.metadata)), e.spec.timezone,
                 SKIPPED_STATE if e.skipped else PENDING, e.skipped, e.detail, now)
                for seq, e in enumerate(entries, 1)]
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO campaigns (id, name, status, concurrency, spec, created_at, "
                "updated_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                campaign_id, spec.name, RUNNING, spec.concurrency, _dumps(spec.to_dict()), now,
                now, created_by)
            await tx.executemany(
                "INSERT INTO campaign_calls (campaign_id, seq, number, variables, metadata, "
                "timezone, state, outcome, detail, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            await self._finish_if_done(tx, campaign_id, now)

    async def get(self, campaign_id: str) -> Campaign | None:
        async with self._db.transaction(write=False) as tx:
            rows = await tx.fetch("SELECT * FROM campaigns WHERE id = ?", campaign_id)
        return _campaign(rows[0]) if rows else None

    async def progress(self, campaign_id: str) -> dict[str, Any]:
        """The campaign and its numbers counted by state and by outcome; NotFound."""
        async with self._db.transaction(write=False) as tx:
            rows = await tx.fetch("SELECT * FROM campaigns WHERE id = ?", campaign_id)
            if not rows:
                raise NotFound(f"no campaign {campaign_id}")
            counts = await tx.fetch(
                "SELECT state, outcome, count(*) AS n, sum(attempts) AS attempts "
                "FROM campaign_calls WHERE campaign_id = ? GROUP BY state, outcome",
                campaign_id)
        campaign = _campaign(rows[0])
        states = dict.fromkeys(STATES, 0)
        outcomes: dict[str, int] = {}
        total = attempts = 0
        for c in counts:
            n = int(c["n"])
            total += n
            attempts += int(c["attempts"] or 0)
            states[str(c["state"])] = states.get(str(c["state"]), 0) + n
            if c["state"] in (DONE, SKIPPED_STATE) and c["outcome"]:
                outcomes[str(c["outcome"])] = outcomes.get(str(c["outcome"]), 0) + n
        return {"id": campaign.id, "name": campaign.spec.name, "status": campaign.status,
                "created_at": iso(campaign.created_at), "created_by": campaign.created_by,
                "total": total, "attempts": attempts, "states": states, "outcomes": outcomes,
                "settings": campaign.spec.to_dict()}

    async def list_campaigns(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """The newest campaigns first: id, name, status, created_at."""
        async with self._db.transaction(write=False) as tx:
            rows = await tx.fetch("SELECT id, name, status, created_at, created_by "
                                  "FROM campaigns ORDER BY created_at DESC, id LIMIT ?", limit)
        return [{**r, "created_at": iso(float(r["created_at"]))} for r in rows]

    async def entries(self, campaign_id: str, *, limit: int = 1000,
                      after: int = 0) -> list[dict[str, Any]]:
        """Each number's state, in upload order (after `seq` `after`), for an operator."""
        async with self._db.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT seq, number, state, outcome, attempts, next_at, call_sid, answered_by, "
                "detail FROM campaign_calls WHERE campaign_id = ? AND seq > ? ORDER BY seq "
                "LIMIT ?", campaign_id, after, limit)
        return rows

    async def set_status(self, campaign_id: str, action: str, *, now: float) -> str:
        """pause | resume | cancel; the new status. NotFound; Conflict when the campaign's
        status does not allow it. Cancelling skips every number not yet dialled; calls on the
        line go on to their end."""
        allowed = {"pause": ((RUNNING, PAUSED), PAUSED),
                   "resume": ((PAUSED, RUNNING), RUNNING),
                   "cancel": ((RUNNING, PAUSED, CANCELLED), CANCELLED)}
        if action not in allowed:
            raise ValueError(action)
        sources, target = allowed[action]
        async with self._db.transaction() as tx:
            row = await tx.lock_campaign(campaign_id)
            if row is None:
                raise NotFound(f"no campaign {campaign_id}")
            if row["status"] not in sources:
                raise Conflict(f"campaign {campaign_id} is {row['status']}: it cannot "
                               f"{action}")
            await tx.execute("UPDATE campaigns SET status = ?, updated_at = ? WHERE id = ?",
                             target, now, campaign_id)
            if target == CANCELLED:
                await tx.execute(
                    "UPDATE campaign_calls SET state = ?, outcome = ?, claimed_by = NULL, "
                    "lease_until = NULL, updated_at = ? WHERE campaign_id = ? "
                    "AND (state IN (?, ?) OR (state = ? AND dialing = 0))",
                    SKIPPED_STATE, "campaign-cancelled", now, campaign_id, PENDING, WAITING,
                    PLACING)
                await self._finish_if_done(tx, campaign_id, now)
        return target

    # --- the scheduler ---

    async def running(self) -> list[str]:
        """Ids of the campaigns the scheduler looks at, oldest first: running ones, and paused
        or cancelled ones that still have calls placed and not ended (their leases and stale
        calls must still be settled)."""
        async with self._db.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT id FROM campaigns WHERE status = ? OR (status IN (?, ?) AND EXISTS "
                "(SELECT 1 FROM campaign_calls WHERE campaign_id = campaigns.id "
                "AND state IN (?, ?))) ORDER BY created_at, id",
                RUNNING, PAUSED, CANCELLED, *ACTIVE)
        return [str(r["id"]) for r in rows]

    async def claim(self, campaign_id: str, *, instance: str, now: float, lease_until: float,
                    limit: int, decide: Decide, scan: int = 200,
                    ) -> tuple[Campaign | None, list[Entry]]:
        """Claim up to `limit` due numbers of one running campaign for `instance`, within the
        campaign's concurrency counted fleet-wide; expired leases and stale calls are settled
        first. `decide(campaign, entry)` says, per due number: claim it, skip it (do-not-call),
        or let it wait (outside its window) until a time."""
        async with self._db.transaction() as tx:
            row = await tx.lock_campaign(campaign_id)
            if row is None:
                return None, []
            campaign = _campaign(row)
            await self._settle_expired(tx, campaign, now)
            if campaign.status != RUNNING:
                return campaign, []
            active = await tx.fetch(
                "SELECT count(*) AS n FROM campaign_calls WHERE campaign_id = ? "
                "AND state IN (?, ?)", campaign_id, *ACTIVE)
            slots = min(limit, campaign.spec.concurrency - int(active[0]["n"]))
            claimed: list[Entry] = []
            if slots > 0:
                due = await tx.fetch(
                    f"SELECT {_ENTRY_COLUMNS} FROM campaign_calls WHERE campaign_id = ? "
                    "AND state IN (?, ?) AND next_at <= ? ORDER BY next_at, seq LIMIT ?",
                    campaign_id, PENDING, WAITING, now, scan)
                for entry_row in due:
                    if len(claimed) >= slots:
                        break
                    entry = _entry(entry_row)
                    verdict, value = decide(campaign, entry)
                    if verdict == "skip":
                        await tx.execute(
                            "UPDATE campaign_calls SET state = ?, outcome = ?, updated_at = ? "
                            "WHERE campaign_id = ? AND seq = ?",
                            SKIPPED_STATE, value, now, campaign_id, entry.seq)
                        continue
                    if verdict == "wait":
                        await tx.execute(
                            "UPDATE campaign_calls SET state = ?, next_at = ?, updated_at = ? "
                            "WHERE campaign_id = ? AND seq = ?",
                            WAITING, float(value), now, campaign_id, entry.seq)
                        continue
                    if not await tx.try_lock_number(entry.to) or await tx.fetch(
                            "SELECT 1 FROM campaign_calls WHERE number = ? AND state IN (?, ?)",
                            entry.to, *ACTIVE):
                        continue  # on the line in another campaign: not twice at once
                    await tx.execute(
                        "UPDATE campaign_calls SET state = ?, claimed_by = ?, lease_until = ?, "
                        "dialing = 0, updated_at = ? WHERE campaign_id = ? AND seq = ?",
                        PLACING, instance, lease_until, now, campaign_id, entry.seq)
                    claimed.append(entry)
            await self._finish_if_done(tx, campaign_id, now)
        return campaign, claimed

    async def start_dialing(self, entry: Entry, *, instance: str, now: float,
                            lease_until: float) -> bool:
        """Just before the REST request: True when this instance still holds the claim and the
        campaign still runs (the attempt is counted). Otherwise the claim is let go: back to
        pending (paused), skipped (cancelled), or it was already lost (lease lapsed)."""
        async with self._db.transaction() as tx:
            row = await tx.lock_campaign(entry.campaign_id)
            status = row["status"] if row else None
            if status == RUNNING:
                return await tx.execute(
                    "UPDATE campaign_calls SET dialing = 1, attempts = attempts + 1, "
                    "lease_until = ?, updated_at = ? WHERE campaign_id = ? AND seq = ? "
                    "AND state = ? AND claimed_by = ?",
                    lease_until, now, entry.campaign_id, entry.seq, PLACING, instance) == 1
            await tx.execute(
                "UPDATE campaign_calls SET state = ?, outcome = ?, claimed_by = NULL, "
                "lease_until = NULL, updated_at = ? WHERE campaign_id = ? AND seq = ? "
                "AND state = ? AND claimed_by = ?",
                SKIPPED_STATE if status != PAUSED else PENDING,
                None if status == PAUSED else "campaign-cancelled", now,
                entry.campaign_id, entry.seq, PLACING, instance)
            await self._finish_if_done(tx, entry.campaign_id, now)
            return False

    async def placed(self, entry: Entry, call_sid: str, *, instance: str, now: float,
                     stale_at: float) -> bool:
        """Twilio took the call: the entry is on the line until its outcome arrives (or
        `stale_at`). An outcome that arrived first is applied now. False when the claim had
        been lost meanwhile (logged: the call goes on, unknown to the campaign)."""
        async with self._db.transaction() as tx:
            row = await tx.lock_campaign(entry.campaign_id)
            changed = await tx.execute(
                "UPDATE campaign_calls SET state = ?, call_sid = ?, answered_by = NULL, "
                "claimed_by = NULL, lease_until = ?, dialing = 0, detail = NULL, "
                "updated_at = ? WHERE campaign_id = ? AND seq = ? AND state = ? "
                "AND claimed_by = ?",
                IN_PROGRESS, call_sid, stale_at, now, entry.campaign_id, entry.seq, PLACING,
                instance)
            if changed != 1 or row is None:
                return False
            early = await tx.fetch("SELECT status, answered_by FROM campaign_early_outcomes "
                                   "WHERE call_sid = ?", call_sid)
            if early:
                await tx.execute("DELETE FROM campaign_early_outcomes WHERE call_sid = ?",
                                 call_sid)
                if early[0]["answered_by"]:
                    await tx.execute("UPDATE campaign_calls SET answered_by = ? "
                                     "WHERE call_sid = ?", early[0]["answered_by"], call_sid)
                if early[0]["status"]:
                    await self._apply_outcome(tx, _campaign(row), call_sid,
                                              str(early[0]["status"]), now)
        return True

    async def place_failed(self, entry: Entry, outcome: str, detail: str, *, instance: str,
                           now: float) -> None:
        """The REST request failed (no call was placed): count `outcome` (usually `failed`)
        and retry per the campaign."""
        async with self._db.transaction() as tx:
            row = await tx.lock_campaign(entry.campaign_id)
            if row is None:
                return
            rows = await tx.fetch(
                "SELECT tries FROM campaign_calls WHERE campaign_id = ? AND seq = ? "
                "AND state = ? AND claimed_by = ?",
                entry.campaign_id, entry.seq, PLACING, instance)
            if rows:
                await self._settle(tx, _campaign(row), entry.seq, outcome,
                                   _loads(rows[0]["tries"]), now, detail=detail)

    async def place_deferred(self, entry: Entry, *, instance: str, now: float,
                             next_at: float, detail: str) -> None:
        """The call was not placed for a reason of ours (the fleet is at MAX_CALLS): the attempt
        is not counted and the number waits until `next_at`."""
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE campaign_calls SET state = ?, next_at = ?, attempts = attempts - 1, "
                "claimed_by = NULL, lease_until = NULL, dialing = 0, detail = ?, updated_at = ? "
                "WHERE campaign_id = ? AND seq = ? AND state = ? AND claimed_by = ? "
                "AND dialing = 1",
                WAITING, next_at, detail, now, entry.campaign_id, entry.seq, PLACING, instance)

    async def record_outcome(self, call_sid: str, status: str, *, now: float) -> bool:
        """Twilio's final CallStatus for a call (completed, busy, no-answer, failed, canceled);
        True when it settled a campaign entry. Earlier statuses are ignored. An unknown SID is
        kept a while in case its placement is still being recorded."""
        if status not in TWILIO_FINAL:
            return False
        async with self._db.transaction() as tx:
            rows = await tx.fetch("SELECT campaign_id FROM campaign_calls WHERE call_sid = ?",
                                  call_sid)
            if not rows:
                await self._keep_early(tx, call_sid, now, status=status)
                return False
            row = await tx.lock_campaign(str(rows[0]["campaign_id"]))
            if row is None:
                return False
            return await self._apply_outcome(tx, _campaign(row), call_sid, status, now)

    async def record_answered_by(self, call_sid: str, answered_by: str, *, now: float) -> bool:
        """The AMD result (`human`, `machine_end_beep`, `fax`, …), kept for the outcome."""
        async with self._db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE campaign_calls SET answered_by = ?, updated_at = ? WHERE call_sid = ?",
                answered_by, now, call_sid)
            if not changed:
                await self._keep_early(tx, call_sid, now, answered_by=answered_by)
        return bool(changed)

    async def prune(self, now: float) -> None:
        """Drop early outcomes no placement claimed (calls that were not a campaign's)."""
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM campaign_early_outcomes WHERE at < ?",
                             now - EARLY_KEEP_S)

    # --- inside transactions ---

    async def _keep_early(self, tx: _Tx, call_sid: str, now: float, *,
                          status: str | None = None, answered_by: str | None = None) -> None:
        if await tx.execute(
                "UPDATE campaign_early_outcomes SET status = coalesce(?, status), "
                "answered_by = coalesce(?, answered_by) WHERE call_sid = ?",
                status, answered_by, call_sid) == 0:
            await tx.execute("INSERT INTO campaign_early_outcomes (call_sid, status, "
                             "answered_by, at) VALUES (?, ?, ?, ?)",
                             call_sid, status, answered_by, now)

    async def _apply_outcome(self, tx: _Tx, campaign: Campaign, call_sid: str, status: str,
                             now: float) -> bool:
        rows = await tx.fetch(
            "SELECT seq, tries, answered_by FROM campaign_calls WHERE call_sid = ? "
            "AND state = ?", call_sid, IN_PROGRESS)
        if not rows:
            return False  # settled already (a repeated callback)
        outcome = classify(status, rows[0]["answered_by"])
        await self._settle(tx, campaign, int(rows[0]["seq"]), outcome,
                           _loads(rows[0]["tries"]), now)
        return True

    async def _settle(self, tx: _Tx, campaign: Campaign, seq: int, outcome: str,
                      tries: Mapping[str, int], now: float, detail: str | None = None) -> None:
        spec = campaign.spec
        nxt = after_outcome(outcome, tries, spec.retries if outcome in RETRYABLE else {},
                            spec.retry_after_s, now)
        state = nxt.state
        if state == WAITING and campaign.status == CANCELLED:
            state, outcome = DONE, nxt.outcome
        await tx.execute(
            "UPDATE campaign_calls SET state = ?, outcome = ?, tries = ?, next_at = ?, "
            "claimed_by = NULL, lease_until = NULL, dialing = 0, detail = ?, updated_at = ? "
            "WHERE campaign_id = ? AND seq = ?",
            state, outcome, _dumps(nxt.tries), nxt.next_at, detail, now, campaign.id, seq)
        await self._finish_if_done(tx, campaign.id, now)

    async def _settle_expired(self, tx: _Tx, campaign: Campaign, now: float) -> None:
        """Claims whose instance went silent, and calls whose end never came."""
        lapsed = await tx.execute(
            "UPDATE campaign_calls SET state = ?, claimed_by = NULL, lease_until = NULL, "
            "updated_at = ? WHERE campaign_id = ? AND state = ? AND dialing = 0 "
            "AND lease_until < ?", PENDING, now, campaign.id, PLACING, now)
        if lapsed:
            log.info("campaign %s: %d claims lapsed before dialling; pending again",
                     campaign.id, lapsed)
        stale = await tx.fetch(
            "SELECT seq, tries, state FROM campaign_calls WHERE campaign_id = ? "
            "AND ((state = ? AND dialing = 1) OR state = ?) AND lease_until < ?",
            campaign.id, PLACING, IN_PROGRESS, now)
        for row in stale:
            log.warning("campaign %s: entry %s %s; outcome unknown", campaign.id, row["seq"],
                        "lost its instance while dialling" if row["state"] == PLACING
                        else "never reported its end")
            await self._settle(tx, campaign, int(row["seq"]), "unknown", _loads(row["tries"]),
                               now)

    async def _finish_if_done(self, tx: _Tx, campaign_id: str, now: float) -> None:
        left = await tx.fetch(
            "SELECT 1 FROM campaign_calls WHERE campaign_id = ? AND state IN (?, ?, ?, ?) "
            "LIMIT 1", campaign_id, PENDING, WAITING, PLACING, IN_PROGRESS)
        if not left:
            await tx.execute("UPDATE campaigns SET status = ?, updated_at = ? WHERE id = ? "
                             "AND status IN (?, ?)", FINISHED, now, campaign_id, RUNNING,
                             PAUSED)


def open_campaign_store(url: str) -> CampaignStore | None:
    """The store for a DATABASE_URL (not opened yet); None for `off` (campaigns need a
    database); StoreError when the URL is not one."""
    if url == "off":
        return None
    scheme, sep, _ = url.partition("://")
    if scheme == "sqlite" and sep:
        return CampaignStore(_SQLite(sqlite_path(url)))
    if scheme in ("postgresql", "postgres") and sep:
        return CampaignStore(_Postgres(url))
    raise StoreError("DATABASE_URL is not a sqlite:/// or postgresql:// URL")


__all__ = ["ACTIVE", "CANCELLED", "FINISHED", "PAUSED", "RUNNING", "SKIPPED", "STATES",
           "Campaign", "CampaignStore", "Conflict", "Entry", "NewEntry", "NotFound",
           "StoreError", "open_campaign_store"]
