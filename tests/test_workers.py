"""WORKERS=N: processes sharing one port through SO_REUSEPORT, supervised by run_workers.

Each test runs a small supervisor in a subprocess (never fork the test runner) whose workers
answer `GET /` with their pid."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.redis_server import free_port

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
