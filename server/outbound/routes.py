"""The operators' HTTP API for campaigns and the do-not-call list.

    POST /campaigns                 JSON {"name", "calls": [...], ...} or text/csv (settings in
                                    the query string) -> 201 {"id", ...}
    GET  /campaigns                 the newest campaigns
    GET  /campaigns/{id}            progress per state and outcome (?calls=1: every number)
    POST /campaigns/{id}/pause|resume|cancel
    POST /do-not-call               {"numbers": [...]} -> 200 {"added": [...], "listed": n}

`add_routes(app, ...)` takes what it needs as arguments; `authorize(request)` returns the
operator's name or raises an HTTP error (401/403), which is answered as JSON like every other
error here: 400 with the reason, 404, 409 (a status that does not allow the action), 413, 415,
503 (no database).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from server.outbound.campaigns import Campaigns
from server.outbound.numbers import DoNotCall, InvalidNumber
from server.outbound.spec import (
    BadRequest,
    PromptCheck,
    campaign_from_query,
    parse_campaign,
    parse_csv,
)
from server.outbound.store import Conflict, NotFound, StoreError

log = logging.getLogger("server.outbound")

Authorize = Callable[[web.Request], Awaitable[str]]
MAX_BODY = 16 * 1024 * 1024  # a 100,000-row CSV with a few variables fits
MAX_DNC_NUMBERS = 100_000
ACTIONS = ("pause", "resume", "cancel")
_CSV_TYPES = ("text/csv", "application/csv")


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def add_routes(app: web.Application, *, campaigns: Callable[[], Campaigns | None],
               do_not_call: Callable[[], DoNotCall | None], authorize: Authorize,
               check_prompt: PromptCheck | None = None, max_body: int = MAX_BODY,
               unavailable: Callable[[], str] | None = None) -> None:
    """Add the routes. `campaigns()` and `do_not_call()` are read at request time (they are
    opened after the routes are added); None answers 503, saying `unavailable()`."""

    Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]

    def guarded(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def check(request: web.Request) -> web.StreamResponse:
            try:
                operator = await authorize(request)
            except web.HTTPException as e:
                headers = {k: v for k, v in e.headers.items() if k.lower() == "www-authenticate"}
                return _error(e.status, e.reason.lower() if e.status in (401, 403)
                              else e.text or e.reason, headers)
            try:
                return await handler(request, operator)
            except BadRequest as e:
                return _error(400, str(e))
            except InvalidNumber as e:
                return _error(400, str(e))
            except NotFound as e:
                return _error(404, str(e))
            except Conflict as e:
                return _error(409, str(e))
            except _Refusal as e:
                return _error(e.status, str(e))
            except StoreError as e:
                log.warning("campaigns API: store unavailable: %s", e)
                return _error(503, "the campaign store is unavailable")
            except Exception:
                log.exception("campaigns API: %s %s failed", request.method, request.path)
                return _error(500, "internal error")

        return check

    def service() -> Campaigns:
        found = campaigns()
        if found is None:
            raise _Refusal(503, unavailable() if unavailable is not None
                           else "campaigns need a database (DATABASE_URL is off)")
        return found

    async def create(request: web.Request, operator: str) -> web.Response:
        body = await _body(request, max_body)
        kind = request.content_type
        if kind in _CSV_TYPES:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("the CSV is not UTF-8 text") from None
            spec, calls = campaign_from_query(request.query, parse_csv(text), check_prompt)
        elif kind == "application/json":
            spec, calls = parse_campaign(_json(body), check_prompt=check_prompt)
        else:
            raise _Refusal(415, "send JSON (application/json) or CSV (text/csv)")
        answer = await service().create(spec, calls, created_by=operator)
        return web.json_response(answer, status=201,
                                 headers={"Location": f"/campaigns/{answer['id']}"})

    async def listing(request: web.Request, operator: str) -> web.Response:
        return web.json_response({"campaigns": await service().store.list_campaigns()})

    async def show(request: web.Request, operator: str) -> web.Response:
        calls = request.query.get("calls", "").lower() in ("1", "true", "yes")
        return web.json_response(await service().progress(request.match_info["id"],
                                                          calls=calls))

    async def act(request: web.Request, operator: str) -> web.Response:
        action = request.match_info["action"]
        if action not in ACTIONS:
            raise _Refusal(404, f"no action {action[:40]!r} (pause, resume or cancel)")
        return web.json_response(await service().act(request.match_info["id"], action,
                                                     operator=operator))

    async def add_numbers(request: web.Request, operator: str) -> web.Response:
        if request.content_type != "application/json":
            raise _Refusal(415, "send JSON (application/json): {\"numbers\": [...]}")
        data = _json(await _body(request, max_body))
        numbers = data.get("numbers") if isinstance(data, dict) else None
        if not isinstance(numbers, list) or not numbers:
            raise BadRequest("numbers must be a non-empty list of +E.164 numbers")
        if len(numbers) > MAX_DNC_NUMBERS:
            raise BadRequest(f"at most {MAX_DNC_NUMBERS} numbers at a time")
        dnc = do_not_call()
        if dnc is None:
            raise _Refusal(503, "the do-not-call list is not available")
        added = await dnc.add(numbers)
        log.info("do-not-call: %d numbers added by %s", len(added), operator or "?")
        return web.json_response({"added": added, "listed": len(dnc)})

    for path, method, handler in (("/campaigns", "POST", create),
                                  ("/campaigns", "GET", listing),
                                  ("/campaigns/{id}", "GET", show),
                                  ("/campaigns/{id}/{action}", "POST", act),
                                  ("/do-not-call", "POST", add_numbers)):
        app.router.add_route(method, path, guarded(handler))
    for path, allow in (("/campaigns", "GET, POST"), ("/campaigns/{id}", "GET"),
                        ("/campaigns/{id}/{action}", "POST"), ("/do-not-call", "POST")):
        app.router.add_route("*", path, _not_allowed(allow))


def _not_allowed(allow: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def answer(request: web.Request) -> web.Response:
        return _error(405, f"{request.method} is not allowed here: use {allow}",
                      {"Allow": allow})

    return answer


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def _body(request: web.Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes (413 beyond), read whatever client_max_size says."""
    if request.content_length is not None and request.content_length > limit:
        raise _Refusal(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _Refusal(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the body is not JSON ({e.msg} at position {e.pos})") from None
