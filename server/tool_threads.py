"""Sync tools' own bounded pool of threads (TOOL_THREADS).

A plain `def` tool blocks, so it runs in a thread. Not asyncio's default executor: recordings
and the records writer use that one, and a few hung tools would starve them. Not a
`ThreadPoolExecutor` either: the interpreter joins its threads at exit, so a tool stuck forever
would hold a shutdown forever. These are daemon threads; at shutdown the ones still busy are
logged by name and left behind.

A thread cannot be stopped: when the caller hangs up or the tool times out the call stops
waiting, but the function runs to its end and holds its thread until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("server.toolbox")

_Job = tuple[Callable[[], Any], str, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class ToolThreads:
    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy: dict[int, tuple[str, float]] = {}  # thread ident -> (tool, started)
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, fn: Callable[[], Any], name: str) -> Any:
        """Run `fn` on one of the pool's threads; waits for a free one if all are busy."""
        if self._closed:
            raise RuntimeError("the tool threads are closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._grow()
        self._jobs.put((fn, name, loop, future))
        return await future

    @property
    def busy(self) -> list[tuple[str, float]]:
        """(tool, seconds running) for every thread running a tool now."""
        now = time.monotonic()
        with self._lock:
            return [(name, now - since) for name, since in self._busy.values()]

    def close(self) -> None:
        """Stop idle threads; log (and leave behind) the ones still running a tool."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        stuck = self.busy
        if stuck:
            log.warning("%d tool thread(s) still running at shutdown, left behind: %s",
                        len(stuck), ", ".join(f"{name} ({seconds:.0f} s)"
                                              for name, seconds in stuck))

    def _grow(self) -> None:
        """One more thread while all are busy and the pool is not full."""
        with self._lock:
            idle = len(self._threads) - len(self._busy) - self._jobs.qsize()
            if idle > 0 or len(self._threads) >= self.size:
                return
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"tool-{len(self._threads) + 1}")
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.get_ident()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, name, loop, future = job
            if future.done():  # the call stopped waiting before the tool started
                continue
            with self._lock:
                self._busy[me] = (name, time.monotonic())
            try:
                result: Any = fn()
                error: BaseException | None = None
            except BaseException as e:  # handed to the awaiting task, which logs it
                result, error = None, e
            finally:
                with self._lock:
                    self._busy.pop(me, None)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled: a timeout or a hang-up
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
