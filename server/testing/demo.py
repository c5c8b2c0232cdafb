"""`make demo`: the whole product on loopback, no key, no Twilio, no phone.

Starts the Realtime stand-in (an echo assistant) and the bridge on free loopback ports, with
webhook signatures on, places a simulated call with the sample WAV, talks over the first reply
once, prints the call's timeline, writes what the caller heard, and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from aiohttp import web

from server.app import create_app
from server.logs import setup_logging
from server.settings import Settings
from server.testing.simulator import CallResult, place_call
from server.testing.standin import StandinOptions, create_standin_app

AUTH_TOKEN = "demo-auth-token"  # not a secret: both ends are on this machine


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


async def run_demo(out: Path, barge_in_ms: int = 800, turns: int = 2) -> CallResult:
    standin, standin_port = await _serve(create_standin_app(StandinOptions()))
    settings = Settings(
        openai_api_key="demo-key",
        openai_realtime_url=f"ws://127.0.0.1:{standin_port}/v1/realtime",
        twilio_auth_token=AUTH_TOKEN,
        host="127.0.0.1",
    )
    bridge, bridge_port = await _serve(create_app(settings))
    base = f"http://127.0.0.1:{bridge_port}"
    print(f"stand-in (echo assistant) on ws://127.0.0.1:{standin_port}/v1/realtime")
    print(f"bridge on {base}, webhook signatures on")
    print("placing a simulated call:")
    try:
        return await place_call(base, turns=turns, barge_in_ms=barge_in_ms, out=out,
                                auth_token=AUTH_TOKEN)
    finally:
        await bridge.cleanup()
        await standin.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/caller-heard.wav"))
    parser.add_argument("--barge-in-ms", type=int, default=800)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="show the bridge's log too")
    args = parser.parse_args(argv)
    setup_logging("INFO" if args.verbose else "WARNING", "text", ())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    result = asyncio.run(run_demo(args.out, args.barge_in_ms, args.turns))
    latencies = ", ".join(f"{ms:.0f} ms" for ms in result.latencies_ms)
    print(f"replies: {len(result.latencies_ms)} (latency after end of speech: {latencies}); "
          f"barge-ins handled: {result.clears}; marks echoed: {result.marks_echoed}; "
          f"caller heard {result.heard_ms / 1000:.1f} s of audio")
    ok = result.ok and result.clears >= (1 if args.barge_in_ms else 0)
    print("demo OK" if ok else f"demo FAILED: {result.error or 'no barge-in was handled'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
