"""The testing tools' waits: for the n-th matching thing that arrives, or for a condition.

Tests wait for events, never for fixed times. Whatever arrives over time (a stream's messages,
a child process's log lines) goes into an `Inbox`; a test waits for what it needs, with a
deadline that fails it loudly, saying what it waited for and what it got. State that changes
with no event to hook (a call's record, a registry) is polled by `wait_until`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """Items in arrival order. `add` and `close` are plain calls, so a reader task or a
    callback can feed it; adding costs nothing extra while nobody waits."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self.closed = False
        self._changed: asyncio.Event | None = None

    def add(self, item: T) -> None:
        self.items.append(item)
        self._notify()

    def close(self) -> None:
        """No more items will come: waiters that are still short give up at once."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_for(self, match: Callable[[T], bool], count: int = 1,
                       timeout: float = 5.0, what: str = "matching item") -> T:
        """The count-th item that matches, already here or still to come.

        TimeoutError after `timeout` seconds, EOFError once the inbox is closed short of it;
        both say what was awaited and how many matched."""
        seen = found = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    items = self.items
                    while seen < len(items):
                        item = items[seen]
                        seen += 1
                        if match(item):
                            found += 1
                            if found == count:
                                return item
                    if self.closed:
                        raise EOFError(f"closed before {what} #{count} ({found} matched, "
                                       f"{seen} received)")
                    if self._changed is None:
                        self._changed = asyncio.Event()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"no {what} #{count} within {timeout:g} s ({found} matched, "
                               f"{seen} received)") from None


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0,
                     what: str = "the condition", interval: float = 0.01) -> float:
    """Poll `condition` (plain or async) until it is true; the seconds it took.

    For state that changes with no event to wait on; TimeoutError, saying what, after
    `timeout` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(timeout):
            while True:
                done = condition()
                if inspect.isawaitable(done):
                    done = await done
                if done:
                    return loop.time() - start
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"{what} was not true within {timeout:g} s") from None
