"""The records over HTTP, for operators: every route needs an operator's credential
(`Authorization: Bearer <ADMIN_TOKEN or an OPERATOR_TOKENS token>`, or the console's session
cookie: server/console/auth.py).

GET /calls                         newest first; ?limit= ?cursor= ?number= ?since= ?until=
                                   ?end_kind= (`cursor`: the `next` of the previous page);
                                   ?status=live: the live calls, from whoever provides them
                                   (LIVE_CALLS), in the same shape
GET /calls/{call_sid}              the full record as JSON (Accept: text/plain: a transcript)
GET /calls/{call_sid}/recording.wav (HTTP Range answered: the console seeks in it)
GET /stats                         ?since= ?until=: calls per hour, a latency histogram and
                                   the count of each ending, for the console's charts

Every error is JSON, `{"error": "..."}`: 400 for a query this API cannot answer (never a 500),
401, 404, 405, 503 while the store is unavailable.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from server.console.auth import OPERATOR, Operators
from server.records.render import transcript_text
from server.records.store import MAX_PAGE, CallQuery, StatsQuery, StoreError, decode_cursor

if TYPE_CHECKING:
    from server.records.store import RecordStore

log = logging.getLogger("server.records")

MAX_TEXT = 200  # a call SID, number or cursor longer than this is not one
STATS_DEFAULT = timedelta(hours=24)  # /stats without ?since=: the last day

# The live calls across the fleet as record summaries (`GET /calls?status=live`); set by the
# part of the app that knows them. Unset: that query answers 503.
LiveCalls = Callable[[], Awaitable[list[dict[str, Any]]]]
LIVE_CALLS: web.AppKey[LiveCalls] = web.AppKey("live_calls")


class BadQuery(Exception):
    """A request this API cannot answer: a 400 with this message (safe to show)."""


def add_routes(app: web.Application, store: Callable[[], RecordStore],
               operators: Operators) -> None:
    """Add the routes, or log that they are off when no operator token (ADMIN_TOKEN,
    OPERATOR_TOKENS) is set. `store` returns the opened store at request time (it is opened
    after the routes are added)."""
    if not operators.enabled:
        log.info("ADMIN_TOKEN is not set: the /calls records API is off "
                 "(OPERATOR_TOKENS is not set either)")
        return

    def guarded(handler: Callable[[web.Request, RecordStore], Awaitable[web.StreamResponse]]
                ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def check(request: web.Request) -> web.StreamResponse:
            request[OPERATOR] = operators.authenticate(request)  # raises 401 / 403
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
                          ("/calls/{call_sid}/recording.wav", get_recording),
                          ("/stats", get_stats)):
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
    end_kind = _text(q.get("end_kind") or "", "end_kind") or None
    cursor = _text(q.get("cursor") or "", "cursor") or None
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except StoreError as e:
            raise BadQuery(str(e)) from None
    return CallQuery(limit=limit, cursor=cursor, number=number, since=since, until=until,
                     end_kind=end_kind)


async def list_calls(request: web.Request, store: RecordStore) -> web.Response:
    status = request.query.get("status", "")
    if status == "live":
        live = request.app.get(LIVE_CALLS)
        if live is None:
            return web.json_response({"error": "live calls are not available on this server"},
                                     status=503)
        return web.json_response({"calls": await live(), "next": None})
    if status:
        raise BadQuery("status is not `live` (leave it out for the records)")
    calls, cursor = await store.page(query_from(request))
    return web.json_response({"calls": calls, "next": cursor})


async def get_stats(request: web.Request, store: RecordStore) -> web.Response:
    q = request.query
    try:
        since = (parse_moment(q["since"]) if q.get("since")
                 else datetime.now(UTC) - STATS_DEFAULT)
        until = parse_moment(q["until"], end_of_day=True) if q.get("until") else None
    except ValueError:
        raise BadQuery("since/until are not dates (2025-01-31) or ISO 8601 times "
                       "from 0001-01-02 to 9999-12-30") from None
    if until is not None and until <= since:
        raise BadQuery("until is not after since")
    return web.json_response(await store.stats(StatsQuery(since=since, until=until)))


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
