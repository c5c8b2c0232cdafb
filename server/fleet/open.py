"""Opening what the fleet shares, as the settings ask: Redis with REDIS_URL, else memory."""

from __future__ import annotations

from server.fleet.events import EventBus, MemoryBus, RedisBus
from server.fleet.redis import RedisState
from server.fleet.state import MemoryState, SharedState
from server.settings import Settings


async def open_state(settings: Settings) -> SharedState:
    """The store the settings ask for, started: Redis when REDIS_URL is set, else memory.

    Raises SharedStateError (one line, password masked) if Redis cannot be reached."""
    state: SharedState
    if settings.redis_url:
        state = RedisState(settings.redis_url, lease=settings.fleet_lease_seconds)
    else:
        state = MemoryState()
    await state.start()
    return state


async def open_bus(settings: Settings) -> EventBus:
    """Where calls' events go beyond their own process: Redis Streams, or this process."""
    bus: EventBus = RedisBus(settings.redis_url) if settings.redis_url else MemoryBus()
    await bus.start()
    return bus
