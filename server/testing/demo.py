"""`make demo`: the whole product on loopback, no key, no Twilio, no phone.

Runs short scenarios in one process, each with the Realtime stand-in and the bridge on free
loopback ports, webhook signatures on, records in out/demo-calls.db: a greeting, a tool and the
assistant ending the call; a transfer; a barge-in; a dropped model connection; a handover between
two instances; and the first of these again on GPT-Live (MODEL_API=live, its own stand-in).
Prints each call's timeline and what Twilio does next, then the first call's stored record and
transcript (read back by a freshly started bridge) and the metrics.

With `--console` (`make demo CONSOLE=1`) it runs the operator console instead: one bridge with
the console on (token `demo-admin-token`) at a printed URL, on the same records database, and
simulated calls one after another (a tool, keypad digits, a dozen turns each) until Ctrl-C, so
an operator can watch, listen in, whisper, take over, transfer or hang up; the history holds
every call the demo made.

    python -m server.testing.demo [--scenario NAME] [--fast] [--verbose]
    python -m server.testing.demo --console [--port 5051]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.logs import setup_logging
from server.testing.scenarios import (
    ADMIN_TOKEN,
    AUTH_TOKEN,
    EXAMPLE_TOOLS,
    SALES,
    SCENARIOS,
    Env,
    Outcome,
    Pace,
    serving,
)
from server.testing.simulator import place_call
from server.testing.standin import StandinOptions, create_standin_app, tool_call

RECORD_FIELDS = ("call_sid", "duration_seconds", "end_kind", "end_reason", "latencies_ms",
                 "barge_ins", "usage", "cost_usd", "timeline")


@dataclass
class Demo:
    outcomes: list[Outcome] = field(default_factory=list)
    record: dict[str, Any] | None = None  # the first call's record, read back
    transcript: str = ""  # and its text/plain transcript
    metrics: list[str] = field(default_factory=list)  # bridge_ lines summed over the bridges

    @property
    def failed(self) -> list[str]:
        return [o.name for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and not self.failed


async def run_demo(out_dir: Path = Path("out"), scenarios: Sequence[str] | None = None, *,
                   fast: bool = False, echo: Callable[[str], None] = print) -> Demo:
    """Run the scenarios (all by default) in order and print what happened; never raises for a
    scenario that goes wrong: its outcome says what."""
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo()
    async with aiohttp.ClientSession() as http:
        env = Env(out_dir, Pace.fast() if fast else Pace.normal(), echo, http)
        db = out_dir / "demo-calls.db"
        echo(f"records go to {db} (afterwards: DATABASE_URL=sqlite:///{db} python -m server "
             "calls)")
        for letter, name in zip("abcdefghij", scenarios or list(SCENARIOS), strict=False):
            title, scenario = SCENARIOS[name]
            echo("")
            echo(f"== {letter}. {title} ({name}) ==")
            try:
                outcome = await scenario(env)
            except Exception as e:  # a broken scenario fails the demo; the others still run
                logging.getLogger("server.testing.demo").exception("scenario %s", name)
                outcome = Outcome(name, problems=[f"{type(e).__name__}: {e}"])
            echo("  => OK" if outcome.ok else f"  => FAILED: {'; '.join(outcome.problems)}")
            demo.outcomes.append(outcome)
        first = next((o.result.call_sid for o in demo.outcomes
                      if o.result is not None and o.result.call_sid), None)
        if first is not None:
            await _read_back(env, first, demo)
        demo.metrics = sum_metrics(env.metrics)
        if demo.metrics:
            echo("")
            echo(f"== metrics after the demo (GET /metrics of the {len(env.metrics)} bridges, "
                 "summed) ==")
            for line in demo.metrics:
                echo(line)
    return demo


async def _read_back(env: Env, call_sid: str, demo: Demo) -> None:
    """The first call's record and transcript, from a bridge started afresh on the database."""
    settings = env.settings("http://127.0.0.1:9")  # serves records only: never calls out
    async with serving(create_app(settings)) as base:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with env.http.get(f"{base}/calls/{call_sid}", headers=auth) as resp:
            record = await resp.json() if resp.status == 200 else None
        async with env.http.get(f"{base}/calls/{call_sid}",
                                headers={**auth, "Accept": "text/plain"}) as resp:
            demo.transcript = await resp.text() if resp.status == 200 else ""
    if record is None:
        demo.outcomes[0].problems.append("its record could not be read back")
        return
    demo.record = {k: record.get(k) for k in RECORD_FIELDS}
    env.echo("")
    env.echo(f"== the first call's record: GET /calls/{call_sid} (trimmed), read back by a "
             "bridge started afresh ==")
    env.echo(orjson.dumps(demo.record, option=orjson.OPT_INDENT_2).decode())
    env.echo("")
    env.echo("== its transcript: GET /calls/{sid} with Accept: text/plain ==")
    env.echo(demo.transcript.rstrip("\n"))


def sum_metrics(texts: Sequence[str]) -> list[str]:
    """The `bridge_` samples of several /metrics pages, added up (what a sum() over the
    instances shows), in the order they first appear; `_created` timestamps left out."""
    totals: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.name.startswith("bridge_") or sample.name.endswith("_created"):
                    continue
                series = totals.setdefault(sample.name, {})
                labels = tuple(sorted(sample.labels.items()))
                series[labels] = series.get(labels, 0.0) + sample.value
    lines = []
    for name, series in totals.items():
        for labels, value in series.items():
            shown = ",".join(f'{k}="{v}"' for k, v in labels)
            number = f"{value:.0f}" if value == int(value) else f"{value:.4g}"
            lines.append(f"{name}{{{shown}}} {number}" if shown else f"{name} {number}")
    return lines


CONSOLE_PORT = 5051


async def run_console(out_dir: Path = Path("out"), *, port: int = CONSOLE_PORT,
                      calls: int | None = None, turns: int = 12, pause: float = 2.0,
                      fast: bool = False, echo: Callable[[str], None] = print,
                      ready: Callable[[str], None] | None = None) -> int:
    """The console demo: a bridge with the console on and simulated calls one after another
    (`calls` of them, or until cancelled; `fast`: the tests' pace). `ready(url)` is told the
    console's URL once it answers. Returns the number of calls placed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    placed = 0
    pace = Pace.fast() if fast else Pace.normal()
    standin = create_standin_app(StandinOptions(
        greeting_ms=pace.greeting_ms, tool_reply_ms=pace.answer_ms,
        tool_calls={2: tool_call("lookup_order", {"order_id": "1234"}, say_ms=pace.say_ms)}))
    async with aiohttp.ClientSession() as http, serving(standin) as standin_base:
        env = Env(out_dir, pace, echo, http)
        settings = env.settings(standin_base, greeting="Thanks for calling, how can I help?",
                                tools_module=str(EXAMPLE_TOOLS), record_calls=True,
                                transfer_targets=(("sales", SALES),))
        async with serving(create_app(settings), port=port) as bridge:
            url = f"{bridge}/console"
            echo("")
            echo("== the operator console ==")
            echo(f"  open {url} and log in with the token {ADMIN_TOKEN}")
            echo("  simulated calls follow one another (Ctrl-C stops the demo); open one to "
                 "listen in (your browser's sound on), whisper, take over (your microphone: "
                 "you talk to the simulated caller), transfer or hang up; the History tab "
                 f"has every call the demo made (records in {out_dir / 'demo-calls.db'})")
            if ready is not None:
                ready(url)
            while calls is None or placed < calls:
                placed += 1

                async def breathe(turn: int) -> None:
                    await asyncio.sleep(pause)  # the caller thinks, silent on the line

                echo(f"  call {placed}: {turns} turns")
                result = await place_call(
                    bridge, speech=env.pace.speech, auth_token=AUTH_TOKEN, turns=turns,
                    caller=f"+1555010{placed % 10000:04d}", settle=env.pace.settle,
                    listen_first=0.0 if fast else 3.0, keys=None if fast else "1234#",
                    keys_at_turn=min(turns, 4), echo=lambda _: None,
                    after_turn=breathe)
                echo(f"  call {placed}: {result.summary()}")
    return placed


def verdict(demo: Demo) -> tuple[str, int]:
    """The demo's last line and exit status."""
    if demo.ok:
        return "demo OK", 0
    return f"demo FAILED: {', '.join(demo.failed) or 'no scenario ran'}", 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.demo",
                                     description="Run the demo's scenarios on loopback.")
    parser.add_argument("--scenario", choices=list(SCENARIOS), action="append",
                        help="run only this one (may repeat)")
    parser.add_argument("--out-dir", type=Path, default=Path("out"),
                        help="where the database and the caller's audio go")
    parser.add_argument("--fast", action="store_true", help="short audio (what the tests use)")
    parser.add_argument("--verbose", action="store_true", help="show the bridge's log too")
    parser.add_argument("--console", action="store_true",
                        help="run the operator console with simulated calls until Ctrl-C")
    parser.add_argument("--port", type=int, default=CONSOLE_PORT,
                        help="the console's port (with --console)")
    args = parser.parse_args(argv)
    setup_logging("INFO" if args.verbose else "ERROR", "text", ())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if args.console:
        try:
            asyncio.run(run_console(args.out_dir, port=args.port))
        except KeyboardInterrupt:
            print("\nconsole demo stopped")
        return
    demo = asyncio.run(run_demo(args.out_dir, args.scenario, fast=args.fast))
    line, status = verdict(demo)
    print()
    print("The operator console, live, with simulated calls: make demo CONSOLE=1")
    print(line)
    sys.exit(status)


if __name__ == "__main__":
    main()
