"""Long-lived tasks stop when their owner closes them, even when a cancellation goes missing.

Two ways it does: Python 3.11's `asyncio.wait_for` returns the result, and drops the
cancellation, when what it waits for happens in the same turn of the loop (the product waits
with `asyncio.timeout` instead); and redis-py swallows a cancellation that lands inside a
command (redis/redis-py#2028). Either way the task ran on and the `close()` awaiting it waited
forever: a test run hung on this at the end of a handover. Tasks that talk to Redis are now
stopped by `stop_tasks`, which cancels again until they have ended."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

from server.fleet.events import RedisBus
from server.fleet.live import RedisBoard
from server.testing.process import free_port
from tests.redis_server import RedisServer

SERVER = Path(__file__).resolve().parent.parent / "server"


async def test_the_live_index_writer_stops_when_a_change_comes_with_the_close() -> None:
    board = RedisBoard(f"redis://127.0.0.1:{free_port()}/0", prefix="test:")  # nobody there
    await board.start()
    for _ in range(3):
        await asyncio.sleep(0)  # the writer waits for a change
    board.put("CA1", {"call_sid": "CA1"})  # the change and the close in one turn of the loop
    async with asyncio.timeout(5):
        await board.close()


async def test_redis_writers_stop_when_closed_in_the_middle_of_a_write(
        redis_server: RedisServer, redis_prefix: str) -> None:
    """Closed while a write is in flight, 100 times each: a close that waited on a swallowed
    cancellation would hang (before the fix, one in 5 to 50 did)."""
    for n in range(100):
        board = RedisBoard(redis_server.url, prefix=redis_prefix)
        bus = RedisBus(redis_server.url, prefix=redis_prefix)
        await board.start()
        await bus.start()
        for k in range(3):
            board.put(f"CA{k}", {"call_sid": f"CA{k}"})
            bus.publish({"type": "transcript", "seq": k, "call_sid": f"CA{k}"})
        await asyncio.sleep(0.001 * (n % 7))  # at different points of the writes
        async with asyncio.timeout(5):
            await board.close()
            await bus.close()


def test_the_product_never_waits_with_asyncio_wait_for() -> None:
    found = []
    for path in sorted(SERVER.rglob("*.py")):
        if "testing" in path.relative_to(SERVER).parts:
            continue  # the tools for trying it, which the product never imports
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for" \
                    and isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                found.append(f"{path.relative_to(SERVER.parent)}:{node.lineno}")
    assert found == [], "use `async with asyncio.timeout(...)` (see this file's docstring)"
