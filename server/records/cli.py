"""`python -m server calls`: recent calls; `python -m server calls CA…`: one transcript (a unique
prefix of the call SID is enough).

Reads the database named by DATABASE_URL (from .env or the environment) directly: the server
need not be running, and no OpenAI key is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from dotenv import load_dotenv

from server.records.api import parse_moment
from server.records.render import calls_table, transcript_text
from server.records.store import (
    DEFAULT_DATABASE_URL,
    CallQuery,
    RecordStore,
    StoreError,
    open_store,
    sqlite_path,
)

SHOW_MATCHES = 10  # an ambiguous prefix lists at most this many calls


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server calls",
        description="List recent calls, or print one call's transcript (reads DATABASE_URL).")
    p.add_argument("call_sid", nargs="?",
                   help="a call SID (CA…), or a unique prefix of one: print that call")
    p.add_argument("--limit", type=int, default=20, help="calls to list (default 20)")
    p.add_argument("--number", help="only calls from or to this number")
    p.add_argument("--since", help="only calls started at or after (2025-01-31 or ISO time)")
    p.add_argument("--until", help="only calls started before the end of this day/time")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str]) -> int:
    """0 done, 1 not found (or an ambiguous prefix) or database unusable, 2 bad arguments."""
    args = _parser().parse_args(argv)
    load_dotenv(Path.cwd() / ".env")  # as the server does: from the working directory
    url = os.environ.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL
    try:
        if url.startswith("sqlite:") and not sqlite_path(url).exists():
            print(f"no records database at {sqlite_path(url)} (DATABASE_URL)", file=sys.stderr)
            return 1
        query = CallQuery(
            limit=max(1, min(args.limit, 500)), number=args.number,
            since=parse_moment(args.since) if args.since else None,
            until=parse_moment(args.until, end_of_day=True) if args.until else None)
    except ValueError as e:
        print(f"bad argument: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(open_store(url), args.call_sid, query, args.json))
    except StoreError as e:
        print(f"records database: {e}", file=sys.stderr)
        return 1


async def _run(store: RecordStore, call_sid: str | None, query: CallQuery, as_json: bool) -> int:
    await store.open()
    try:
        if call_sid:
            record = await _find(store, call_sid)
            if record is None:
                return 1
            _out(record if as_json else transcript_text(record), as_json)
            return 0
        calls, _ = await store.page(query)
        _out(calls if as_json else calls_table(calls), as_json)
        return 0
    finally:
        await store.close()


async def _find(store: RecordStore, sid: str) -> dict[str, Any] | None:
    """The call with this SID, or else the one call whose SID starts with it; None (and why on
    stderr) when there is no such call or the prefix fits several."""
    record = await store.get(sid)
    if record is not None:
        return record
    matches = await store.find_prefix(sid, SHOW_MATCHES + 1)
    if not matches:
        print(f"no call {sid} in {store.description}", file=sys.stderr)
        return None
    if len(matches) > 1:
        more = " (and more)" if len(matches) > SHOW_MATCHES else ""
        print(f"{sid} is ambiguous: it starts these calls{more}; give more of the SID:",
              file=sys.stderr)
        for match in matches[:SHOW_MATCHES]:
            print(f"  {match}", file=sys.stderr)
        return None
    return await store.get(matches[0])


def _out(value: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(value)
