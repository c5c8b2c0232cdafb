"""The records over HTTP, for operators: every route needs `Authorization: Bearer <ADMIN_TOKEN>`.

GET /calls                         newest first; ?limit= ?cursor= ?number= ?since= ?until=
                                   (`cursor`: the `next` of the previous page)
GET /calls/{call_sid}              the full record as JSON (Accept: text/plain: a transcript)
GET /calls/{call_sid}/recording.wav

Every error is JSON, `{"error": "..."}`: 400 for a query this API cannot answer (never a 500),
401, 404, 405, 503 while the store is unavailable.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from server.metrics import bearer_ok
from server.records.render import transcript_text
from server.records.store import MAX_PAGE, CallQuery, StoreError, decode_cursor

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from server.records.store import RecordStore

log = logging.getLogger("server.records")

MAX_TEXT = 200  # a call SID, number or cursor longer than this is not one


class BadQuery(Exception):
    """A request this API cannot answer: a 400 with this message (safe to show)."""


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
            except BadQuery as e:
                return web.json_response({"error": str(e)}, status=400)
            except StoreError as e:
                return web.json_response({"error": str(e)}, status=503)
            except (OSError, TimeoutError) as e:
                log.warning("records API: store unavailable: %s", type(e).__name__)
                return web.json_response({"error": "records store unavailable"}, status=503)
            except Exception:  # a bug, or a database error we did not foresee: still JSON
                log.exception("records API: %s %s failed", request.method, request.path)
                return web.json_response({"error": "internal error"}, status=500)

        return check

    for path, handler in (("/calls", list_calls), ("/calls/{call_sid}", get_call),
                          ("/calls/{call_sid}/recording.wav", get_recording)):
        app.router.add_get(path, guarded(handler))
        app.router.add_route("*", path, _method_not_allowed)


async def _method_not_allowed(request: web.Request) -> web.Response:
    return web.json_response({"error": f"{request.method} is not allowed here: use GET"},
                             status=405, headers={"Allow": "GET, HEAD"})


def _text(value: str, name: str) -> str:
    """A query or path value headed for the database: short, no control characters (which
    PostgreSQL refuses with an error that is not the caller's to see)."""
    if len(value) > MAX_TEXT or any(ord(c) < 32 or c == "\x7f" for c in value):
        raise BadQuery(f"{name} is not valid")
    return value


EARLIEST = datetime(1, 1, 2, tzinfo=UTC)  # a day inside datetime's range at either end, so
LATEST = datetime(9999, 12, 31, tzinfo=UTC)  # offsets and `until`'s next midnight never overflow


def parse_moment(value: str, *, end_of_day: bool = False) -> datetime:
    """2025-01-31 (midnight UTC; with end_of_day the next midnight, so `until` includes the day)
    or a full ISO 8601 time (UTC if it has no offset), in UTC. ValueError otherwise, and for a
    moment outside 0001-01-02 .. 9999-12-30."""
    moment = datetime.fromisoformat(value.replace(" ", "+") if "T" in value else value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:
        moment = LATEST if moment.year > 1 else datetime.min.replace(tzinfo=UTC)
    if not EARLIEST <= moment < LATEST:
        raise ValueError(f"{value} is outside 0001-01-02 .. 9999-12-30")
    if end_of_day and len(value) == 10:
        moment += timedelta(days=1)
    return moment


def query_from(request: web.Request) -> CallQuery:
    """BadQuery for anything the store could not answer."""
    q = request.query
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise BadQuery("limit is not an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise BadQuery(f"limit is outside 1..{MAX_PAGE}")
    try:
        since = parse_moment(q["since"]) if q.get("since") else None
        until = parse_moment(q["until"], end_of_day=True) if q.get("until") else None
    except ValueError:
        raise BadQuery("since/until are not dates (2025-01-31) or ISO 8601 times "
                       "from 0001-01-02 to 9999-12-30") from None
    number = _text((q.get("number") or "").replace(" ", "+").strip(), "number") or None
    cursor = _text(q.get("cursor") or "", "cursor") or None
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except StoreError as e:
            raise BadQuery(str(e)) from None
    return CallQuery(limit=limit, cursor=cursor, number=number, since=since, until=until)


async def list_calls(request: web.Request, store: RecordStore) -> web.Response:
    calls, cursor = await store.page(query_from(request))
    return web.json_response({"calls": calls, "next": cursor})


async def get_call(request: web.Request, store: RecordStore) -> web.Response:
    record = await store.get(_text(request.match_info["call_sid"], "call SID"))
    if record is None:
        return web.json_response({"error": "no such call"}, status=404)
    accept = request.headers.get("Accept", "")
    if "text/plain" in accept and "json" not in accept:
        return web.Response(text=transcript_text(record))
    return web.json_response(record)


async def get_recording(request: web.Request, store: RecordStore) -> web.StreamResponse:
    record = await store.get(_text(request.match_info["call_sid"], "call SID"))
    if record is None:
        return web.json_response({"error": "no such call"}, status=404)
    name = record.get("recording")
    path = Path(name) if isinstance(name, str) and name.endswith(".wav") else None
    if path is None or not path.is_file():
        return web.json_response({"error": "no recording for this call on this server"},
                                 status=404)
    return web.FileResponse(path, headers={"Content-Type": "audio/wav"})
