"""Server-Sent Events for the console: one helper so every event route speaks alike.

Each event goes out as `id: <seq>` (when it has one) and one `data:` line of JSON; a browser
that reconnects sends the last id back as `Last-Event-ID`, and the route replays from there.
A comment line every `HEARTBEAT` seconds keeps proxies and load balancers from closing an idle
stream, and tells the route early that the operator has gone.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

HEARTBEAT = 15.0
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-store",
    "X-Accel-Buffering": "no",  # nginx (the Ingress) would otherwise hold events back
}


def last_event_id(request: web.Request) -> int:
    """The `seq` a reconnecting browser saw last (0: from the start)."""
    value = request.headers.get("Last-Event-ID", "").strip()
    return int(value) if value.isdigit() and len(value) < 12 else 0


class EventStream:
    """An open SSE response: `await EventStream.open(request)`, then `send` each event."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request) -> EventStream:
        response = web.StreamResponse(status=200, headers=HEADERS)
        await response.prepare(request)
        return cls(response)

    async def send(self, event: dict[str, Any], event_id: int | None = None) -> None:
        """One event; `event_id` defaults to the event's `seq`. Raises ConnectionResetError
        (or OSError) when the browser has gone."""
        if event_id is None and isinstance(event.get("seq"), int):
            event_id = event["seq"]
        head = f"id: {event_id}\n".encode() if event_id is not None else b""
        await self.response.write(head + b"data: " + orjson.dumps(event) + b"\n\n")

    async def comment(self, text: str = "") -> None:
        """A line the browser ignores: a heartbeat."""
        await self.response.write(f": {text}\n\n".encode())
