"""The records over HTTP, for operators: every route needs `Authorization: Bearer <ADMIN_TOKEN>`.

GET /calls                         newest first; ?limit= ?cursor= ?number= ?since= ?until=
GET /calls/{call_sid}              the full record as JSON (Accept: text/plain: a transcript)
GET /calls/{call_sid}/recording.wav
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from server.metrics import bearer_ok
from server.records.render import transcript_text
from server.records.store import MAX_PAGE, CallQuery, StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from server.records.store import RecordStore

log = logging.getLogger("server.records")

def add_routes(app: web.Application, store: Callable[[], RecordStore],
               admin_token: str | None) -> None:
    """Add the routes, or log that they are off when ADMIN_TOKEN is unset. `store` returns the
    opened store at request time (it is opened after the routes are added)."""
    if not admin_token:
        log.info("ADMIN_TOKEN is not set: the /calls records API is off")
        return
    token = admin_token

    def guarded(handler: Callable[[web.Request, RecordStore], Awaitable[web.StreamResponse]]
                ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def check(request: web.Request) -> web.StreamResponse:
            if not bearer_ok(request, token):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="calls"'})
            try:
                return await handler(request, store())
            except StoreError as e:
                return web.json_response({"error": str(e)}, status=503)
            except (OSError, TimeoutError) as e:
                log.warning("records API: store unavailable: %s", type(e).__name__)
                return web.json_response({"error": "records store unavailable"}, status=503)

        return check

    app.router.add_get("/calls", guarded(list_calls))
    app.router.add_get("/calls/{call_sid}", guarded(get_call))
    app.router.add_get("/calls/{call_sid}/recording.wav", guarded(get_recording))


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f'{{"error": "{message}"}}', content_type="application/json")


def parse_moment(value: str, *, end_of_day: bool = False) -> datetime:
    """2025-01-31 (midnight UTC; with end_of_day the next midnight, so `until` includes the day)
    or a full ISO 8601 time (UTC if it has no offset). ValueError otherwise."""
    moment = datetime.fromisoformat(value.replace(" ", "+") if "T" in value else value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if end_of_day and len(value) == 10:
        moment += timedelta(days=1)
    return moment


def query_from(request: web.Request) -> CallQuery:
    q = request.query
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise _bad("limit is not an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise _bad(f"limit is outside 1..{MAX_PAGE}")
    try:
        since = parse_moment(q["since"]) if q.get("since") else None
        until = parse_moment(q["until"], end_of_day=True) if q.get("until") else None
    except ValueError:
        raise _bad("since/until are not dates (2025-01-31) or ISO 8601 times") from None
    number = (q.get("number") or "").replace(" ", "+").strip() or None
    return CallQuery(limit=limit, cursor=q.get("cursor") or None, number=number,
                     since=since, until=until)


async def list_calls(request: web.Request, store: RecordStore) -> web.Response:
    query = query_from(request)
    try:
        calls, cursor = await store.page(query)
    except StoreError as e:
        if query.cursor:
            raise _bad(str(e)) from None
        raise
    return web.json_response({"calls": calls, "next": cursor})


async def get_call(request: web.Request, store: RecordStore) -> web.Response:
    record = await store.get(request.match_info["call_sid"])
    if record is None:
        return web.json_response({"error": "no such call"}, status=404)
    accept = request.headers.get("Accept", "")
    if "text/plain" in accept and "json" not in accept:
        return web.Response(text=transcript_text(record))
    return web.json_response(record)


async def get_recording(request: web.Request, store: RecordStore) -> web.StreamResponse:
    record = await store.get(request.match_info["call_sid"])
    if record is None:
        return web.json_response({"error": "no such call"}, status=404)
    name = record.get("recording")
    path = Path(name) if isinstance(name, str) and name.endswith(".wav") else None
    if path is None or not path.is_file():
        return web.json_response({"error": "no recording for this call on this server"},
                                 status=404)
    return web.FileResponse(path, headers={"Content-Type": "audio/wav"})
