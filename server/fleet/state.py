"""State that calls share beyond one socket: stream tokens, capacity, decisions, handover context
and call control.

One process keeps it in memory (`MemoryState`). A fleet of bridges keeps it in Redis
(`server.fleet.RedisState`), because the webhook, the stream, Twilio's `<Connect action>` request
and an admin's hang-up can each land on a different instance. Both implement `SharedState`; the
app talks only to that, and `server.fleet.open.open_state(settings)` picks one.

Every value that crosses this boundary (decisions, context, control actions) must be JSON:
`MemoryState` round-trips it through JSON too, so a value that would break the fleet breaks a
single process the same way, in tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import orjson

if TYPE_CHECKING:
    pass

log = logging.getLogger("server.fleet")

FETCHED_TTL = 120.0  # a fetched decision is remembered this long (for a stopping instance)
MAX_DECISIONS = 10_000
"""Decisions kept for `<Connect action>` requests: Twilio asks within seconds of a stream's end,
so this many covers far more than the calls that end in those seconds at any realistic rate."""

ControlHandler = Callable[[str, dict[str, Any]], Awaitable[None]]
"""Receives `(call_sid, action)` for a call this instance holds."""


class SharedStateError(Exception):
    """The shared store cannot be used at startup; `str()` is one line for the operator."""


@runtime_checkable
class SharedState(Protocol):
    """What calls share across the processes that serve them.

    Capacity counts a call from the webhook (`reserve`) to its end (`release`): a reservation is
    a slot held for a stream that has not arrived yet and lapses after its ttl; `claim` turns it
    into a slot held by this instance, which lasts until `release` or until the instance dies.
    Methods other than `start` do not raise on a store outage: they log, fall back to what this
    instance knows, and `ping()` turns False so /readyz can say so."""

    async def start(self) -> None:
        """Connect and begin background work; raises SharedStateError if the store is unusable."""

    async def close(self) -> None:
        """Stop background work and give up every slot this instance holds."""

    async def ping(self) -> bool:
        """True while the store answers (for /readyz)."""

    async def claim_token(self, token: str, expires_at: float) -> bool:
        """True the first time `token` is claimed anywhere; False afterwards, and for a token
        whose `expires_at` (epoch seconds) has passed. Forgotten after expiry."""

    async def reserve(self, call_sid: str, max_calls: int, ttl: float) -> bool:
        """Reserve a slot for a call (0 = unlimited); False when `max_calls` are active.
        Reserving a call that already holds a slot succeeds without counting it twice."""

    async def claim(self, call_sid: str) -> bool:
        """The call's stream arrived here: its slot now belongs to this instance (no limit check:
        `reserve` admitted it). False, and nothing changed, when a live stream (here or on another
        live instance) already holds the call: one stream per call, fleet-wide."""

    async def release(self, call_sid: str) -> None:
        """The call ended here: free this instance's slot, or its reservation if none was held."""

    async def active(self) -> int:
        """Calls counted against MAX_CALLS: live reservations plus held slots."""

    async def put_decision(self, call_sid: str, decision: dict[str, Any], ttl: float) -> None:
        """Record what Twilio should do after the stream (read by the `<Connect action>`)."""

    async def mark_fetched(self, call_sid: str) -> None:
        """Twilio has fetched the call's decision (a `<Connect action>` was answered)."""

    async def fetched(self, call_sid: str) -> bool:
        """True once the call's decision was fetched, on any instance (a stopping instance waits
        for this before it exits)."""

    async def get_decision(self, call_sid: str, wait: float = 0.0) -> dict[str, Any] | None:
        """The call's decision; waits up to `wait` seconds for one to appear."""

    async def put_plan(self, call_sid: str, plan: dict[str, Any], ttl: float) -> None:
        """Keep a call's plan (decided before its stream) for the instance that takes it."""

    async def get_plan(self, call_sid: str) -> dict[str, Any] | None:
        """The call's plan, or None."""

    async def put_context(self, call_sid: str, context: dict[str, Any], ttl: float) -> None:
        """Save a call's conversation for the instance that resumes it."""

    async def take_context(self, call_sid: str) -> dict[str, Any] | None:
        """The saved context, once: a second take gets None."""

    async def publish(self, call_sid: str, action: dict[str, Any]) -> bool:
        """Send a control action to the instance holding the call; True if one received it."""

    def on_control(self, handler: ControlHandler) -> None:
        """Set the handler for actions published for calls this instance holds."""


def to_json(value: dict[str, Any]) -> bytes:
    """Encode a shared value; a TypeError here means the caller passed something not JSON."""
    return orjson.dumps(value)


def compact_json(value: dict[str, Any]) -> str:
    """`to_json` as a str, for values kept in memory: the bytes orjson returns hold a buffer of
    4 KB or more whatever the JSON's length (measured: a 56-byte decision held 4,096)."""
    return to_json(value).decode()


def from_json(raw: bytes | str, what: str = "value") -> dict[str, Any] | None:
    """Decode a shared value; None (logged, naming `what`) if it is not a JSON object."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        log.warning("shared state: ignoring a %s that is not a JSON object", what)
        return None
    return value


V = TypeVar("V")


class Expiring(Generic[V]):
    """A dict whose entries lapse after their ttl (monotonic clock), swept as it grows, and of
    at most `limit` entries (0: no limit), the oldest dropped first.

    Entries are kept in the order they were put, so the oldest are dropped (and, with one ttl
    for all, the expired found) from the front in O(1)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, limit: int = 0) -> None:
        self._clock = clock
        self.limit = limit
        self._items: OrderedDict[str, tuple[V, float]] = OrderedDict()
        self._sweep_at = 64
        self.dropped = 0  # entries dropped unexpired because of `limit`

    def put(self, key: str, value: V, ttl: float) -> None:
        items = self._items
        items.pop(key, None)  # a new value is the newest
        now = self._clock()
        items[key] = (value, now + ttl)
        while items:  # the oldest first: cheap, and enough when every ttl is the same
            oldest = next(iter(items.values()))
            if oldest[1] > now and not (self.limit and len(items) > self.limit):
                break
            if oldest[1] > now:
                self.dropped += 1
            items.popitem(last=False)
        if len(items) >= self._sweep_at:
            self.sweep()
            self._sweep_at = max(64, 2 * len(items))

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._items[key]
            return None
        return item[0]

    def pop(self, key: str) -> V | None:
        value = self.get(key)
        self._items.pop(key, None)
        return value

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def keys(self) -> Iterator[str]:
        self.sweep()
        return iter(list(self._items))

    def __len__(self) -> int:
        self.sweep()
        return len(self._items)

    def sweep(self) -> None:
        now = self._clock()
        self._items = OrderedDict((k, item) for k, item in self._items.items() if item[1] > now)


class Dispatcher:
    """Runs control handlers as tasks it owns, so a slow or failing handler never blocks the
    publisher or the store's reader, and `close()` leaves nothing running."""

    def __init__(self) -> None:
        self.handler: ControlHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def deliver(self, call_sid: str, action: dict[str, Any]) -> bool:
        if self.handler is None:
            log.warning("control action for call %s dropped: no handler", call_sid)
            return False
        task = asyncio.get_running_loop().create_task(self._run(self.handler, call_sid, action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    @staticmethod
    async def _run(handler: ControlHandler, call_sid: str, action: dict[str, Any]) -> None:
        try:
            await handler(call_sid, action)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control action for call %s failed", call_sid)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MemoryState:
    """`SharedState` for one process: plain dicts, nothing to connect to, never unhealthy.

    What outlives a call is small and bounded: its decision (a short JSON string, about 300
    bytes with its key, at most `max_decisions` of them, the oldest dropped first) until the
    `<Connect action>` request could still come, and its spent stream token until it expires
    (never dropped early: a dropped token could be replayed)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
        max_decisions: int = MAX_DECISIONS,
    ) -> None:
        self._wall = wall
        self._tokens: Expiring[bool] = Expiring(clock)  # spent tokens, until they expire
        self._reserved: Expiring[bool] = Expiring(clock)
        self._held: set[str] = set()
        # JSON kept as str: orjson's bytes keep a 4 KB buffer however short the JSON is.
        self._decisions: Expiring[str] = Expiring(clock, limit=max_decisions)
        self._contexts: Expiring[str] = Expiring(clock)
        self._fetched: Expiring[bool] = Expiring(clock, limit=max_decisions)
        self._plans: Expiring[str] = Expiring(clock, limit=max_decisions)
        self._dropped_logged = False
        self._decided: asyncio.Condition | None = None
        self._dispatcher = Dispatcher()

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        await self._dispatcher.close()
        self._held.clear()
        self._reserved.sweep()

    async def ping(self) -> bool:
        return True

    async def claim_token(self, token: str, expires_at: float) -> bool:
        ttl = expires_at - self._wall()
        if ttl <= 0 or token in self._tokens:
            return False
        self._tokens.put(token, True, ttl)
        return True

    async def reserve(self, call_sid: str, max_calls: int, ttl: float) -> bool:
        known = call_sid in self._held or call_sid in self._reserved
        if not known and max_calls and await self.active() >= max_calls:
            return False
        self._reserved.put(call_sid, True, ttl)
        return True

    async def claim(self, call_sid: str) -> bool:
        if call_sid in self._held:
            return False
        self._reserved.discard(call_sid)
        self._held.add(call_sid)
        return True

    async def release(self, call_sid: str) -> None:
        # A held call keeps any reservation made meanwhile: a handover's new stream is coming.
        if call_sid in self._held:
            self._held.discard(call_sid)
        else:
            self._reserved.discard(call_sid)

    async def active(self) -> int:
        return len(self._held.union(self._reserved.keys()))

    def holds(self, call_sid: str) -> bool:
        """True while this instance holds the call's slot."""
        return call_sid in self._held

    def held_calls(self) -> list[str]:
        """The calls whose slots this instance holds."""
        return sorted(self._held)

    async def put_decision(self, call_sid: str, decision: dict[str, Any], ttl: float) -> None:
        self._decisions.put(call_sid, compact_json(decision), ttl)
        if self._decisions.dropped and not self._dropped_logged:
            self._dropped_logged = True
            log.warning("more than %d call decisions kept: dropping the oldest (a <Connect "
                        "action> request that late gets the fallback)", self._decisions.limit)
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def get_decision(self, call_sid: str, wait: float = 0.0) -> dict[str, Any] | None:
        raw = self._decisions.get(call_sid)
        if raw is None and wait > 0:
            cond = self._condition()
            async with cond:
                try:
                    async with asyncio.timeout(wait):
                        await cond.wait_for(lambda: call_sid in self._decisions)
                except TimeoutError:
                    return None
            raw = self._decisions.get(call_sid)
        return None if raw is None else from_json(raw)

    async def mark_fetched(self, call_sid: str) -> None:
        self._fetched.put(call_sid, True, FETCHED_TTL)

    async def fetched(self, call_sid: str) -> bool:
        return call_sid in self._fetched

    async def put_plan(self, call_sid: str, plan: dict[str, Any], ttl: float) -> None:
        self._plans.put(call_sid, compact_json(plan), ttl)

    async def get_plan(self, call_sid: str) -> dict[str, Any] | None:
        raw = self._plans.get(call_sid)
        return None if raw is None else from_json(raw, "plan")

    async def put_context(self, call_sid: str, context: dict[str, Any], ttl: float) -> None:
        self._contexts.put(call_sid, compact_json(context), ttl)

    async def take_context(self, call_sid: str) -> dict[str, Any] | None:
        raw = self._contexts.pop(call_sid)
        return None if raw is None else from_json(raw)

    async def publish(self, call_sid: str, action: dict[str, Any]) -> bool:
        if call_sid not in self._held:
            return False
        copy = from_json(to_json(action))
        return copy is not None and self._dispatcher.deliver(call_sid, copy)

    def on_control(self, handler: ControlHandler) -> None:
        self._dispatcher.handler = handler

    def _condition(self) -> asyncio.Condition:
        # Created on first use, inside the running loop.
        if self._decided is None:
            self._decided = asyncio.Condition()
        return self._decided
