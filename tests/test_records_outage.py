"""Call records through a records store outage (issue 12): none lost while the store is down
(pending work keyed by call SID, up to RECORDS_PENDING_MAX), spooled at shutdown and loaded at the
next start (RECORDS_SPOOL, one file per worker), the newest state of a call kept (a handed-over
call); and the records API and CLI inputs that used to fail."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import uuid4

import aiohttp
import orjson
import pytest

import server.call.record
from server.call.record import CallRecord, parse_stamp, utc_now
from server.records import cli, spool
from server.records import writer as writer_module
from server.records.service import Records
from server.records.store import CallQuery, RecordStore, StatsQuery, open_store
from server.records.writer import RecordWriter
from server.testing.inbox import wait_until
from tests import test_records
from tests.redis_server import free_port
from tests.test_records import T0, _pg_admin, make_record, note
from tests.test_records_api import AUTH, MakeClient, records_app, settings_for

ROOT = Path(__file__).resolve().parent.parent
NO_HTTP = cast(aiohttp.ClientSession, None)  # Records.open needs a session only for webhooks

# test_records' fixtures, by name: each test runs on SQLite and on PostgreSQL.
pg_url = test_records.pg_url
store_url = test_records.store_url
store = test_records.store


class Outage:
    """A real store whose saves fail while `down`, as when its database does not answer."""

    def __init__(self, real: RecordStore) -> None:
        self.store = real
        self.down = False
        self.refused = 0

    @property
    def description(self) -> str:
        return self.store.description

    @property
    def reconnects(self) -> bool:
        return self.store.reconnects

    async def open(self, *, migrate_to: int | None = None) -> None:
        await self.store.open(migrate_to=migrate_to)

    async def close(self) -> None:
        await self.store.close()

    async def ping(self) -> bool:
        return not self.down and await self.store.ping()

    async def schema_version(self) -> int:
        return await self.store.schema_version()

    async def save(self, record: Mapping[str, Any]) -> bool:
        if self.down:
            self.refused += 1
            raise OSError("connection refused (the test's outage)")
        return await self.store.save(record)

    async def find_prefix(self, prefix: str, limit: int) -> list[str]:
        return await self.store.find_prefix(prefix, limit)

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        return await self.store.get(call_sid)

    async def page(self, query: CallQuery) -> tuple[list[dict[str, Any]], str | None]:
        return await self.store.page(query)

    async def stats(self, query: StatsQuery) -> dict[str, Any]:
        return await self.store.stats(query)

    async def delete_older_than(self, cutoff: datetime) -> list[str]:
        return await self.store.delete_older_than(cutoff)


def sid(i: int) -> str:
    return f"CA{i:032x}"


def one_call(writer: RecordWriter, i: int, *, ends: bool = True) -> None:
    """A call as the bridge runs one: its record lives only as long as the call does, so the
    next call's record may get the freed one's address."""
    record = make_record(sid(i), T0 + timedelta(seconds=i))
    writer.track(record)
    note(record, "caller", text=f"caller turn of call {i}")
    if ends:
        record.ended_at = record.started_at + timedelta(seconds=30)
        record.end_kind, record.end_reason = "caller_hung_up", "caller hung up"
        writer.finish(record)


async def stored(db: RecordStore) -> dict[str, dict[str, Any]]:
    """Every stored record, by call SID."""
    calls, cursor = await db.page(CallQuery(limit=500))
    assert cursor is None
    out = {}
    for summary in calls:
        record = await db.get(summary["call_sid"])
        assert record is not None
        out[summary["call_sid"]] = record
    return out


def spool_lines(directory: Path) -> dict[str, int]:
    return {p.name: len(p.read_bytes().splitlines())
            for p in spool.spool_files(directory / "records-spool.jsonl")}


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's backoff tops out at 50 ms instead of 60 s."""
    monkeypatch.setattr(writer_module, "MAX_BACKOFF", 0.05)


# --- nothing lost while the store is down ---


@pytest.mark.usefixtures("fast_retries")
async def test_150_calls_survive_a_store_outage(store: RecordStore) -> None:
    outage = Outage(store)
    writer = RecordWriter(outage, interval=3600, first_backoff=0.01)
    writer.start()
    outage.down = True
    for i in range(150):
        one_call(writer, i)
    assert writer.pending == 150
    await wait_until(lambda: outage.refused >= 3, what="the writer retrying")
    outage.down = False
    await wait_until(lambda: writer.pending == 0, timeout=30, what="every record saved")
    records = await stored(store)
    assert sorted(records) == sorted(sid(i) for i in range(150))
    for i in (0, 77, 149):
        assert records[sid(i)]["timeline"][0]["text"] == f"caller turn of call {i}"
        assert records[sid(i)]["end_kind"] == "caller_hung_up"
    await writer.close()


async def test_pending_records_are_bounded_dropping_the_oldest(
        store: RecordStore, caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(store)
    writer = RecordWriter(outage, interval=3600, first_backoff=30,
                          pending_max=10)
    outage.down = True
    with caplog.at_level(logging.INFO, "server.records"):
        for i in range(15):
            one_call(writer, i)
        assert writer.pending == 10 and writer.dropped == 5
        hit = [r.getMessage() for r in caplog.records if "RECORDS_PENDING_MAX" in r.getMessage()]
        assert len(hit) == 1 and "dropping the oldest" in hit[0] and sid(0) in hit[0]
        outage.down = False
        assert await writer.flush()
        await writer.close()
    assert sorted(await stored(store)) == [sid(i) for i in range(5, 15)]
    assert "5 final call record(s) were dropped" in caplog.text


# --- down across a restart: spooled, then loaded ---


async def test_store_down_across_a_restart(store_url: str, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, database_url=store_url)
    first = Records(settings, save_interval=0.05)
    await first.open(NO_HTTP)  # no webhook: no session needed
    outage = Outage(first.store)
    first.writer.store = outage
    outage.down = True
    for i in range(150):
        one_call(first.writer, i, ends=i < 100)  # 50 calls are still live at SIGTERM
    await first.close()
    assert spool_lines(tmp_path) == {"records-spool.jsonl": 150}

    second = Records(settings, save_interval=0.05)
    await second.open(NO_HTTP)
    try:
        await wait_until(lambda: not spool_lines(tmp_path), timeout=20,
                         what="the spool saved and deleted")
        records = await stored(second.store)
        assert sorted(records) == sorted(sid(i) for i in range(150))
        assert {records[sid(i)]["end_kind"] for i in range(100)} == {"caller_hung_up"}
        assert {records[sid(i)]["end_kind"] for i in range(100, 150)} == {"shutdown"}
        assert records[sid(120)]["timeline"][0]["text"] == "caller turn of call 120"
        assert second.writer.pending == 0
    finally:
        await second.close()
    assert not list(tmp_path.glob("*spool*"))


class Proxy:
    """A TCP proxy on loopback in front of PostgreSQL: `cut` makes the database unreachable
    (connections dropped, new ones refused), `mend` brings it back on the same port."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()


@pytest.fixture
async def pg_behind_proxy(pg_url: str) -> AsyncIterator[tuple[str, str, Proxy]]:
    """(URL through the proxy, direct URL, the proxy) of a fresh database."""
    name = "t_" + uuid4().hex[:16]
    await _pg_admin(pg_url, f"CREATE DATABASE {name}")
    host, port = pg_url.rsplit("/", 1)[0].rsplit(":", 1)
    proxy = Proxy(int(port))
    await proxy.mend()
    direct = f"{host}:{port}/{name}"
    yield f"{host}:{proxy.port}/{name}", direct, proxy
    await proxy.cut()
    await _pg_admin(pg_url, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.usefixtures("fast_retries")
async def test_postgresql_unreachable_then_across_a_restart(
        pg_behind_proxy: tuple[str, str, Proxy], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A real PostgreSQL goes away mid-traffic and comes back; then goes away again, is still
    away at the next start, and comes back: every one of 150 calls is stored."""
    url, direct, proxy = pg_behind_proxy
    settings = settings_for(tmp_path, database_url=url)
    first = Records(settings, save_interval=0.05)
    first.writer._first_backoff = 0.01
    await first.open(NO_HTTP)
    for i in range(10):  # the store works: these are saved as usual
        one_call(first.writer, i)
    await wait_until(lambda: first.writer.pending == 0, what="the first calls saved")
    await proxy.cut()
    for i in range(10, 60):
        one_call(first.writer, i)
    await wait_until(lambda: first.writer.failures > 0, what="a failed save")
    assert first.writer.pending == 50
    await proxy.mend()
    await wait_until(lambda: first.writer.pending == 0, timeout=30, what="the 50 saved")
    await proxy.cut()
    for i in range(60, 150):
        one_call(first.writer, i, ends=i < 120)  # 30 calls are still live at SIGTERM
    await first.close()
    assert spool_lines(tmp_path) == {"records-spool.jsonl": 90}

    second = Records(settings, save_interval=0.05)
    second.writer._first_backoff = 0.01
    await second.open(NO_HTTP)
    try:
        assert "records database unavailable" in caplog.text
        assert second.writer.pending == 90
        await proxy.mend()
        await wait_until(lambda: not spool_lines(tmp_path), timeout=30,
                         what="the spool saved and deleted")
    finally:
        await second.close()
    db = open_store(direct)
    await db.open()
    try:
        records = await stored(db)
    finally:
        await db.close()
    assert sorted(records) == sorted(sid(i) for i in range(150))
    assert {records[sid(i)]["end_kind"] for i in range(120, 150)} == {"shutdown"}
    assert {records[sid(i)]["end_kind"] for i in range(120)} == {"caller_hung_up"}


# --- spool files: one per worker, each loaded by one process ---


def test_each_worker_has_its_own_spool(tmp_path: Path) -> None:
    base = tmp_path / "records-spool.jsonl"
    assert spool.own_spool(base, None) == base
    assert spool.own_spool(base, 3) == tmp_path / "records-spool.w3.jsonl"
    assert spool.own_spool(tmp_path / "spool", 1) == tmp_path / "spool.w1"
    first = spool.write(base, 1, [{"call_sid": "CA1"}])
    second = spool.write(base, 1, [{"call_sid": "CA2"}])  # the first was not loaded yet
    assert first.name == "records-spool.w1.jsonl" and second != first
    (tmp_path / "records-spool-notes.jsonl").write_text("not a spool\n")
    (tmp_path / "other.jsonl").write_text("{}\n")
    assert set(spool.spool_files(base)) == {first, second}


def test_two_processes_never_load_the_same_spool(tmp_path: Path) -> None:
    """Two workers starting at once: every file is claimed by exactly one of them; a claimed
    file stays with its (live) owner; one whose owner died is taken over."""
    base = tmp_path / "records-spool.jsonl"
    for i in range(40):
        spool.write(base, i % 4, [{"call_sid": f"CA{i}"}])
    barrier = threading.Barrier(2)
    results: list[list[spool.Claim]] = [[], []]

    def worker(index: int) -> None:
        barrier.wait()
        results[index] = spool.claim_all(base)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    sids = [r["call_sid"] for claims in results for c in claims for r in c.records]
    assert sorted(sids) == sorted(f"CA{i}" for i in range(40))  # each once
    held = results[0] + results[1]
    assert all(".claimed-" in c.path.name for c in held)
    assert spool.claim_all(base) == []  # all held by their live owners
    for claim in held[1:]:
        claim.release(delete=True)
    held[0].release(delete=False)  # its owner died before saving
    (again,) = spool.claim_all(base)
    assert again.records == held[0].records
    again.release(delete=True)
    assert spool.spool_files(base) == []


SPOOLING_WORKERS = """
import asyncio, signal, sys
from pathlib import Path
from server.call.record import CallRecord
from server.records.service import Records
from server.settings import Settings
from server.workers import run_workers

directory, dead_db = Path(sys.argv[1]), sys.argv[2]

def serve_one(index: int) -> None:
    async def main() -> None:
        settings = Settings(openai_api_key="sk-test", database_url=dead_db,
                            records_spool=directory / "records-spool.jsonl")
        records = Records(settings)
        await records.open(None)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        records.writer.track(CallRecord(call_sid=f"CAworker{index}"))
        (directory / f"ready-{index}").touch()
        await stop.wait()
        await records.close()

    asyncio.run(main())

sys.exit(run_workers(2, serve_one))
"""


async def test_workers_spool_to_their_own_files_and_a_single_process_loads_them(
        tmp_path: Path) -> None:
    """WORKERS=2, the database unreachable until SIGTERM: each worker spools its live call to
    its own file; the next start (here one process, as after WORKERS changed) saves both."""
    dead_db = f"postgresql://u@127.0.0.1:{free_port()}/nothing"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SPOOLING_WORKERS, str(tmp_path), dead_db, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 2, timeout=30,
                         what="both workers serving")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert spool_lines(tmp_path) == {"records-spool.w0.jsonl": 1, "records-spool.w1.jsonl": 1}

    settings = settings_for(tmp_path)
    records = Records(settings, save_interval=0.05)
    await records.open(NO_HTTP)
    try:
        await wait_until(lambda: not spool_lines(tmp_path), what="both spools saved")
        got = await stored(records.store)
    finally:
        await records.close()
    assert sorted(got) == ["CAworker0", "CAworker1"]
    assert {r["end_kind"] for r in got.values()} == {"shutdown"}


async def test_an_unwritable_spool_directory_is_one_warning_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("")
    settings = settings_for(tmp_path, records_spool=tmp_path / "a-file" / "spool.jsonl")
    records = Records(settings)
    await records.open(NO_HTTP)
    await records.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RECORDS_SPOOL" in warnings[0]
    assert "is not a directory" in warnings[0]
    caplog.clear()
    records = Records(settings_for(tmp_path, records_spool=tmp_path / "new-dir" / "s.jsonl"))
    await records.open(NO_HTTP)  # made when needed: fine
    await records.close()
    assert "RECORDS_SPOOL" not in caplog.text


def test_the_image_and_kubernetes_spool_to_the_writable_volume() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install '.[test]')")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RECORDS_SPOOL=/data/records-spool.jsonl" in dockerfile
    assert 'VOLUME ["/data"]' in dockerfile and "chown bridge:bridge /data" in dockerfile
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    spool_path = Path(config["data"]["RECORDS_SPOOL"])
    assert any(spool_path.is_relative_to(m) for m in mounts), (spool_path, mounts)


# --- the newest state of a call wins ---


async def test_an_older_state_never_replaces_a_newer_one(store: RecordStore) -> None:
    record = make_record("CAnewest")
    note(record, "caller", text="first")
    older = record.to_dict()
    note(record, "assistant", text="second")
    record.ended_at, record.end_kind = T0 + timedelta(seconds=9), "caller_hung_up"
    newer = record.to_dict()
    assert await store.save(newer) is True
    assert await store.save(older) is False
    assert await store.get("CAnewest") == newer
    (summary,), _ = await store.page(CallQuery())
    assert summary["end_kind"] == "caller_hung_up"
    assert await store.save(newer) is True  # the same state again: harmless
    legacy = {k: v for k, v in older.items() if k != "updated_at"}  # from before schema 3
    assert await store.save(legacy) is True and await store.get("CAnewest") == legacy
    assert await store.save(older) is True and await store.get("CAnewest") == older


def test_a_resumed_record_is_newer_than_the_one_it_continues(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the instance that takes a call over has a clock a little behind."""
    first = make_record("CAclock")
    saved = first.to_dict()
    behind = utc_now() - timedelta(seconds=2)
    monkeypatch.setattr(server.call.record, "utc_now", lambda: behind)
    resumed = CallRecord(call_sid="CAclock")
    resumed.restore(saved)
    stamps = [parse_stamp(r["updated_at"]) for r in (saved, resumed.to_dict(),
                                                      resumed.to_dict())]
    assert None not in stamps
    assert stamps == sorted(stamps) and len(set(stamps)) == 3  # type: ignore[type-var]


async def handed_over(db: RecordStore, writer_a: RecordWriter) -> None:
    """Instance A hands a call over while its store is down (its final record waits); B
    resumes the call from A's saved context, continues it and saves it."""
    a = make_record("CAmoved")
    writer_a.track(a)
    note(a, "caller", text="said on A")
    context = a.to_dict()  # what registry.hand_over puts into the shared state
    a.ended_at, a.end_kind = utc_now(), "handover"
    writer_a.finish(a)
    writer_b = RecordWriter(db, interval=3600)
    writer_b.start()
    b = CallRecord(call_sid="CAmoved", caller=a.caller, called=a.called)
    b.restore(context)
    writer_b.track(b)
    note(b, "caller", text="said on B")
    b.ended_at, b.end_kind = utc_now(), "caller_hung_up"
    writer_b.finish(b)
    await writer_b.close()


def assert_b_kept(record: dict[str, Any] | None) -> None:
    assert record is not None
    assert record["end_kind"] == "caller_hung_up"
    assert [e["text"] for e in record["timeline"]] == ["said on A", "said on B"]


@pytest.mark.usefixtures("fast_retries")
async def test_a_retried_record_does_not_replace_the_handed_over_calls(
        store: RecordStore) -> None:
    outage = Outage(store)
    writer_a = RecordWriter(outage, interval=3600, first_backoff=0.01)
    writer_a.start()
    outage.down = True
    await handed_over(store, writer_a)
    await wait_until(lambda: outage.refused > 0, what="A's first try, while its store is down")
    assert_b_kept(await store.get("CAmoved"))
    outage.down = False
    await wait_until(lambda: writer_a.pending == 0, what="A's retry")
    assert writer_a.writes == 1  # the store took the call, and kept B's newer state
    assert_b_kept(await store.get("CAmoved"))
    await writer_a.close()


async def test_a_spooled_record_does_not_replace_the_handed_over_calls(
        store: RecordStore, tmp_path: Path) -> None:
    outage = Outage(store)
    base = tmp_path / "records-spool.jsonl"
    writer_a = RecordWriter(outage, interval=3600, spool_path=base)
    outage.down = True
    await handed_over(store, writer_a)
    await writer_a.close()  # A stops with its store still down: its record is spooled
    assert spool_lines(tmp_path) == {"records-spool.jsonl": 1}
    restarted = RecordWriter(store, interval=3600, spool_path=base)
    assert await restarted.load_spool() == 1
    restarted.start()
    await wait_until(lambda: not spool_lines(tmp_path), what="the spool loaded")
    assert_b_kept(await store.get("CAmoved"))
    await restarted.close()


# --- the records API: bad input is a 400 with a JSON error, never a 500 ---

BAD_QUERIES = [
    "since=9999-12-31", "since=9999-12-31T23:00:00-05:00", "until=9999-12-31",
    "since=0001-01-01T00:00:00%2B01:00", "until=0001-01-01",
    "cursor=9999-12-31T23:00:00-05:00|CA1", "cursor=0001-01-01T00:00:00%2B05:00|CA1",
    "cursor=2025-01-01T00:00:00Z|CA%00", "cursor=garbage", "cursor=" + "9" * 300,
    "number=%2B1555%00", "limit=0", "limit=" + "9" * 5000, "limit=1e3",
]


async def test_bad_queries_are_400_with_a_json_error(store_url: str, tmp_path: Path,
                                                     aiohttp_client: MakeClient) -> None:
    app, records = await records_app(settings_for(tmp_path, database_url=store_url))
    client = await aiohttp_client(app)
    await records.store.save(make_record("CAok").to_dict())
    for query in BAD_QUERIES:
        resp = await client.get(f"/calls?{query}", headers=AUTH)
        assert resp.status == 400, query
        assert resp.content_type == "application/json", query
        assert (await resp.json())["error"], query
    for path in ("/calls/CA%00", "/calls/CA%00/recording.wav", "/calls/" + "x" * 300):
        resp = await client.get(path, headers=AUTH)
        assert resp.status == 400 and "error" in await resp.json(), path
    for method in ("POST", "DELETE", "PUT"):
        resp = await client.request(method, "/calls/CAok", headers=AUTH)
        assert resp.status == 405 and "error" in await resp.json(), method
    ok = await client.get("/calls?since=2025-03-01&until=9999-12-30", headers=AUTH)
    assert [c["call_sid"] for c in (await ok.json())["calls"]] == ["CAok"]


# --- the CLI: a unique prefix of a call SID is enough ---


async def test_cli_finds_a_call_by_a_unique_prefix(
        store: RecordStore, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    sids = ["CAaaa1", "CAaaa2", "CAbbb1", "CAdd", "CAdd1", *[f"CAccc{i:02d}" for i in range(12)]]
    for n, call_sid in enumerate(sids):
        record = make_record(call_sid, T0 + timedelta(minutes=n))
        note(record, "caller", text=f"this is {call_sid}")
        await store.save(record.to_dict())
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("DATABASE_URL", store_url)

    async def run(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli.main, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await run("CAbb")
    assert code == 0 and "Caller: this is CAbbb1" in out
    code, out, _ = await run("CAbbb", "--json")
    assert code == 0 and orjson.loads(out)["call_sid"] == "CAbbb1"
    code, out, _ = await run("CAdd")  # a whole SID that is also a prefix: that call
    assert code == 0 and "this is CAdd\n" in out
    code, out, err = await run("CAaaa")
    assert code == 1 and not out
    assert "ambiguous" in err and "CAaaa1" in err and "CAaaa2" in err
    code, _, err = await run("CAccc")
    listed = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    assert code == 1 and listed == [f"CAccc{i:02d}" for i in range(10)] and "and more" in err
    for missing in ("CAzzz", "CA%", "CA_", "caaaa"):
        code, out, err = await run(missing)
        assert code == 1 and not out and f"no call {missing}" in err, missing


def test_the_record_stamp_is_utc_microseconds() -> None:
    record = make_record("CAstamp")
    stamp = record.to_dict()["updated_at"]
    assert stamp.endswith("Z") and len(stamp) == len("2025-03-01T12:00:00.000000Z")
    moment = parse_stamp(stamp)
    assert moment is not None and abs(moment - datetime.now(UTC)) < timedelta(minutes=1)
