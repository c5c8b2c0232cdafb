"""`python -m server call +15551234567 [--greeting …] [--var name=Ann] [--wait]`: place a call
through a running bridge; `python -m server campaign calls.csv --name …`: start a campaign from
a CSV file (or show one: `python -m server campaign cmp_…`).

They talk to the server's API (`--server`, default http://127.0.0.1:$PORT) with ADMIN_TOKEN,
both read from the environment or `.env` in the working directory, as the server reads them.
With `--wait`, `call` prints the call's outcome and transcript when it ends, and `campaign`
its progress until it is done.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from dotenv import load_dotenv

POLL_S = 1.0
TIMEOUT = aiohttp.ClientTimeout(total=30)


class Failed(Exception):
    """What went wrong, in one line for the operator (exit status 1)."""


def _server() -> str:
    return os.environ.get("BRIDGE_URL") or f"http://127.0.0.1:{os.environ.get('PORT', '5050')}"


def _variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected name=value, not {text!r}")
    return name.strip(), value


def call_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server call",
                                description="Place an outbound call through a running bridge.")
    p.add_argument("to", help="the number to call, +E.164")
    p.add_argument("--from", dest="from_", help="the caller ID (default TWILIO_FROM_NUMBER)")
    p.add_argument("--greeting", help="what the assistant says once a person answers")
    p.add_argument("--var", type=_variable, action="append", default=[], metavar="NAME=VALUE",
                   help="a prompt variable ({{NAME}}); repeatable")
    p.add_argument("--prompt", help="the prompt's id (config/prompts/<id>/)")
    p.add_argument("--prompt-version", help="the prompt's version (default: the newest)")
    p.add_argument("--voicemail", help='the message to leave on an answering machine, or '
                                       '"hangup" (the default)')
    p.add_argument("--timeout", type=int, help="seconds to let it ring (default 30)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the call to end, then print its outcome and transcript")
    p.add_argument("--server", default=None, help="the bridge's base URL "
                                                  "(default http://127.0.0.1:$PORT)")
    return p


def campaign_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server campaign",
        description="Start a campaign from a CSV file (a `to` column; other columns are "
                    "variables), or show a campaign's progress by its id.")
    p.add_argument("source", help="a CSV file to start a campaign from, or a campaign id")
    p.add_argument("--name", help="the campaign's name (default: the file's name)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--retries", help="e.g. busy:2,no-answer:1")
    p.add_argument("--retry-after", type=float, help="seconds before a retry")
    p.add_argument("--window", help="local hours to call in, e.g. 09:00-18:00")
    p.add_argument("--timezone", help="the window's time zone, e.g. America/New_York")
    p.add_argument("--greeting")
    p.add_argument("--voicemail")
    p.add_argument("--prompt")
    p.add_argument("--wait", action="store_true", help="print progress until it is done")
    p.add_argument("--server", default=None)
    return p


def _auth() -> dict[str, str]:
    token = os.environ.get("ADMIN_TOKEN", "").strip()
    if not token:
        raise Failed("ADMIN_TOKEN is not set (in the environment or .env): the API needs it")
    return {"Authorization": f"Bearer {token}"}


async def _json(resp: aiohttp.ClientResponse) -> Any:
    body = await resp.read()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Failed(f"HTTP {resp.status} from {resp.url}: not JSON ({body[:80]!r})") from None


def _refused(status: int, answer: Any) -> Failed:
    error = answer.get("error") if isinstance(answer, dict) else answer
    code = answer.get("twilio_code") if isinstance(answer, dict) else None
    return Failed(f"refused (HTTP {status}): {error}" + (f" [Twilio {code}]" if code else ""))


async def place(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    base = (args.server or _server()).rstrip("/")
    body: dict[str, Any] = {"to": args.to}
    for key, value in (("from", args.from_), ("greeting", args.greeting),
                       ("voicemail", args.voicemail), ("timeout_s", args.timeout)):
        if value is not None:
            body[key] = value
    if args.var:
        body["variables"] = dict(args.var)
    if args.prompt:
        body["prompt"] = {"id": args.prompt, **(
            {"version": args.prompt_version} if args.prompt_version else {})}
    headers = _auth()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        try:
            async with http.post(f"{base}/calls", json=body, headers=headers) as resp:
                answer = await _json(resp)
                if resp.status != 201:
                    raise _refused(resp.status, answer)
        except aiohttp.ClientError as e:
            raise Failed(f"cannot reach the bridge at {base}: {e}") from None
        sid = str(answer["call_sid"])
        echo(f"placed {sid} to {args.to} ({answer.get('status')})")
        if not args.wait:
            return 0
        record = await _wait_record(http, base, sid, headers)
        echo(outcome_line(record))
        async with http.get(f"{base}/calls/{sid}",
                            headers={**headers, "Accept": "text/plain"}) as resp:
            echo((await resp.text()).rstrip("\n"))
    return 0


async def _wait_record(http: aiohttp.ClientSession, base: str, sid: str,
                       headers: dict[str, str]) -> dict[str, Any]:
    """GET /calls/{sid} until the record says the call ended."""
    while True:
        try:
            async with http.get(f"{base}/calls/{sid}", headers=headers) as resp:
                if resp.status == 200:
                    record = await _json(resp)
                    if isinstance(record, dict) and record.get("ended_at"):
                        return record
                elif resp.status != 404:  # 404: not stored yet
                    raise _refused(resp.status, await _json(resp))
        except aiohttp.ClientError as e:
            raise Failed(f"lost the bridge at {base}: {e}") from None
        await asyncio.sleep(POLL_S)


def outcome_line(record: dict[str, Any]) -> str:
    """`outcome: completed, answered by human; ended: the caller hung up [caller_hung_up]`"""
    parts = [f"outcome: {record.get('status') or '?'}"]
    if record.get("answered_by"):
        parts[0] += f", answered by {record['answered_by']}"
    parts.append(f"ended: {record.get('end_reason')} [{record.get('end_kind')}]")
    return "; ".join(parts)


async def campaign(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    base = (args.server or _server()).rstrip("/")
    headers = _auth()
    source = Path(args.source)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        try:
            if source.suffix.lower() == ".csv" or source.is_file():
                try:
                    data = source.read_bytes()
                except OSError as e:
                    raise Failed(f"cannot read {source}: {e.strerror}") from None
                query = {k: str(v) for k, v in (
                    ("name", args.name or source.stem), ("concurrency", args.concurrency),
                    ("retries", args.retries), ("retry_after_s", args.retry_after),
                    ("window", args.window), ("timezone", args.timezone),
                    ("greeting", args.greeting), ("voicemail", args.voicemail),
                    ("prompt_id", args.prompt)) if v is not None}
                async with http.post(f"{base}/campaigns", data=data, params=query,
                                     headers={**headers, "Content-Type": "text/csv"}) as resp:
                    answer = await _json(resp)
                    if resp.status != 201:
                        raise _refused(resp.status, answer)
                echo(f"campaign {answer['id']} started: {answer['to_dial']} numbers to call"
                     + (f", skipped {answer['skipped']}" if answer.get("skipped") else ""))
                for bad in answer.get("invalid") or ():
                    echo(f"  row {bad['index'] + 2}: {bad['reason']}")
                campaign_id = str(answer["id"])
            else:
                campaign_id = args.source
            while True:
                async with http.get(f"{base}/campaigns/{campaign_id}", headers=headers) as resp:
                    progress = await _json(resp)
                    if resp.status != 200:
                        raise _refused(resp.status, progress)
                echo(progress_line(progress))
                if not args.wait or progress.get("status") in ("done", "cancelled"):
                    return 0
                await asyncio.sleep(POLL_S * 5)
        except aiohttp.ClientError as e:
            raise Failed(f"cannot reach the bridge at {base}: {e}") from None


def progress_line(p: dict[str, Any]) -> str:
    states = ", ".join(f"{k} {v}" for k, v in (p.get("states") or {}).items() if v)
    outcomes = ", ".join(f"{k} {v}" for k, v in (p.get("outcomes") or {}).items())
    return (f"{p.get('id')} {p.get('name')!r}: {p.get('status')}; {states or 'empty'}"
            + (f"; outcomes: {outcomes}" if outcomes else ""))


def main(argv: list[str], command: str = "call") -> int:
    """0 done, 1 refused or unreachable, 2 bad arguments (argparse exits with 2 itself)."""
    parser = call_parser() if command == "call" else campaign_parser()
    args = parser.parse_args(argv)
    load_dotenv(Path.cwd() / ".env")  # as the server does: from the working directory
    try:
        return asyncio.run(place(args) if command == "call" else campaign(args))
    except Failed as e:
        print(str(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
