"""WORKERS=N: processes sharing one port through SO_REUSEPORT, supervised by run_workers.

Most tests run a small supervisor in a subprocess (never fork the test runner) whose workers
answer `GET /` with their pid; the metrics test runs the real bridge with WORKERS=2."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from uuid import uuid4

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from server.testing.dial import TwilioStream, dial
from server.testing.inbox import wait_until
from server.testing.process import start_server
from server.testing.standin import StandinOptions, create_standin_app, next_session
from tests.conftest import API_KEY, AUTH_TOKEN, SILENCE
from tests.redis_server import free_port, start_or_skip

ROOT = Path(__file__).resolve().parent.parent

SUPERVISOR = """
import asyncio, os, signal, sys
from aiohttp import web
from server.workers import run_workers

port, failing = int(sys.argv[1]), sys.argv[2]

def serve_one(index: int) -> None:
    if str(index) == failing:
        raise RuntimeError("this worker cannot start")

    async def main() -> None:
        async def pid(request: web.Request) -> web.Response:
            return web.Response(text=f"{os.getpid()} {os.getppid()}")

        app = web.Application()
        app.router.add_get("/", pid)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())

sys.exit(run_workers(int(sys.argv[3]), serve_one))
"""


@pytest.fixture
async def supervisor() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def start(procs: list[asyncio.subprocess.Process], port: int, workers: int,
                failing: int = -1) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUPERVISOR, str(port), str(failing), str(workers))
    procs.append(proc)
    return proc


async def pids_seen(port: int, want: int, within: float = 15.0) -> set[tuple[int, int]]:
    """(pid, parent pid) of the workers answering, over fresh connections, until `want` differ."""
    seen: set[tuple[int, int]] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while len(seen) < want and loop.time() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/") as resp:
                    pid, ppid = (await resp.text()).split()
                    seen.add((int(pid), int(ppid)))
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)  # not listening yet
    return seen


def alive(pid: int) -> bool:
    """Running (an exited child not yet reaped by its new parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_workers_share_the_port_and_stop_on_sigterm(
    supervisor: list[asyncio.subprocess.Process],
) -> None:
    port = free_port()
    proc = await start(supervisor, port, workers=3)
    seen = await pids_seen(port, want=3)
    assert len(seen) == 3, f"the kernel spread connections over {len(seen)} worker(s)"
    assert {ppid for _, ppid in seen} == {proc.pid}
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15.0) == 0
    for pid, _ in seen:
        assert not alive(pid)


async def test_a_failing_worker_stops_the_rest_with_a_non_zero_status(
    supervisor: list[asyncio.subprocess.Process],
) -> None:
    port = free_port()
    proc = await start(supervisor, port, workers=2, failing=1)
    assert await asyncio.wait_for(proc.wait(), 15.0) != 0
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_workers_stop_when_the_supervisor_is_killed(
    supervisor: list[asyncio.subprocess.Process],
) -> None:
    port = free_port()
    proc = await start(supervisor, port, workers=2)
    seen = await pids_seen(port, want=2)
    assert len(seen) == 2
    proc.kill()
    await proc.wait()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while any(alive(pid) for pid, _ in seen):
        assert loop.time() < deadline, "orphaned workers kept running"
        await asyncio.sleep(0.05)


def test_run_workers_needs_one_worker() -> None:
    from server.workers import run_workers

    with pytest.raises(ValueError):
        run_workers(0, lambda index: None)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def worker_metrics(metrics_dir: Path, scratch: Path) -> dict[int, Samples]:
    """Each worker's own metrics, read from its files in the supervisor's directory."""
    pids = {int(f.stem.rpartition("_")[2]) for f in metrics_dir.glob("*.db")}
    found = {}
    for pid in pids:
        alone = scratch / f"{pid}-{uuid4().hex[:6]}"
        alone.mkdir()
        for f in metrics_dir.glob(f"*_{pid}.db"):
            shutil.copy(f, alone / f.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        found[pid] = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for family in registry.collect() for s in family.samples}
    return found


ACTIVE = ("bridge_calls_active", ())
ENDED = ("bridge_calls_total", (("direction", "inbound"), ("end", "caller_hung_up")))
FRAMES_IN = ("bridge_frames_total", (("direction", "in"),))


async def test_one_scrape_shows_every_worker_summed(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path
) -> None:
    """WORKERS=2: calls land on both workers (the kernel picks); whichever worker a scrape
    reaches, it shows the calls and frames of both; the metrics directory goes with them."""
    redis = start_or_skip()
    standin = await aiohttp_server(create_standin_app(StandinOptions(api_key=API_KEY)))
    port, scratch, tmp = free_port(), tmp_path / "scratch", tmp_path / "tmp"
    scratch.mkdir()
    tmp.mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp),
        "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "2", "REDIS_URL": redis.url,
        "OPENAI_API_KEY": API_KEY, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": "off",
        "OPENAI_REALTIME_URL": str(standin.make_url("/v1/realtime")).replace("http", "ws", 1),
        "LOG_LEVEL": "INFO",
        # Each call's one session opened by the worker its stream reached (a webhook on the
        # other worker would pre-warm one no stream takes: not what this test counts).
        "PREWARM": "off",
    }
    server = await start_server(env, cwd=ROOT, name="WORKERS=2")
    base = f"http://127.0.0.1:{port}"
    streams: list[TwilioStream] = []
    # A new connection for every request, so the kernel spreads them over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        try:
            (metrics_dir,) = tmp.glob("phone-bridge-metrics-*")

            async def scrape() -> Samples:
                async with http.get(base + "/metrics") as resp:
                    assert resp.status == 200
                    return parse(await resp.text())

            def live_on_both() -> bool:
                held = [m.get(ACTIVE, 0) for m in worker_metrics(metrics_dir, scratch).values()]
                return sum(1 for n in held if n >= 1) >= 2

            frames = 7
            while not live_on_both():  # keep calls up until each worker holds at least one
                assert len(streams) < 30, "every call went to one worker"
                call = await dial(http, base, auth_token=AUTH_TOKEN)
                streams.append(call.stream)
                session = await next_session(standin.app, 10.0)
                await session.wait_for("session.update", timeout=10.0)
                for _ in range(frames):
                    await call.stream.send_media(SILENCE)
            calls = len(streams)
            for _ in range(6):
                assert (await scrape())[ACTIVE] == calls

            for stream in streams:
                await stream.send_stop()
                await asyncio.wait_for(stream.closed.wait(), 10.0)

            def all_counted() -> bool:
                workers = worker_metrics(metrics_dir, scratch).values()
                return sum(m.get(ENDED, 0) for m in workers) == calls

            await wait_until(all_counted, 10.0, "every call's end counted")
            per_worker = worker_metrics(metrics_dir, scratch)
            assert len(per_worker) == 2 and all(m[ENDED] >= 1 for m in per_worker.values())
            for _ in range(6):
                text = await scrape()
                assert text[ENDED] == calls, text
                assert text[FRAMES_IN] == calls * frames
                assert text[ACTIVE] == 0
        finally:
            for stream in streams:
                await stream.close()
            server.send_signal(signal.SIGTERM)
            status = await server.wait(20.0)
            await server.close()
            redis.cleanup()
    assert status == 0, server.output()
    assert "Traceback" not in server.output(), server.output()
    assert not list(tmp.glob("phone-bridge-metrics-*"))  # the supervisor cleaned up
