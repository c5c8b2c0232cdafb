"""Screenshots of the console for the README: `python -m tests.console_screens docs/`.

The console on the fake live backend (tests/console_fake.py) with a scripted call and a day of
history, in Debian's chromium; writes console-live.png and console-history.png into the
directory given (with `--all`, also the live list, a past call and the login page).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from playwright.async_api import ViewportSize

from tests.console_fake import FEATURED, FakeCall, seed_history, start_backend

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
VIEWPORT: ViewportSize = {"width": 1440, "height": 900}


def script(call: FakeCall) -> None:
    """A conversation in progress, in the core's event vocabulary."""
    say = call.publish
    done = {"final": True, "interrupted": False, "heard_ms": None}
    say("transcript", 1.2, role="caller", item_id="c1", **done,
        text="Hi, I booked a table for Friday and I need to change it.")
    say("latency", 5.1, item_id="a1", ms=612)
    say("transcript", 5.1, role="assistant", item_id="a1", **done,
        text="Of course. What name is the booking under?")
    say("transcript", 8.4, role="caller", item_id="c2", **done, text="Alvarez. A-L-V-A-R-E-Z.")
    say("tool.started", 11.0, call_id="t1", name="find_booking", arguments={"name": "Alvarez"})
    say("tool.finished", 11.4, call_id="t1", name="find_booking", outcome="ok", seconds=0.38,
        result={"booking": "B-2291", "day": "Friday", "time": "19:30", "guests": 4})
    say("latency", 12.1, item_id="a2", ms=1040)
    say("transcript", 12.1, role="assistant", item_id="a2", final=True, interrupted=True,
        heard_ms=2100, text="I found it: Friday at 7:30 pm for four guests, by the window. "
                            "Would you like to move it to another day or change the time?")
    say("barge_in", 14.2, item_id="a2", heard_ms=2100)
    say("transcript", 14.3, role="caller", item_id="c3", **done,
        text="Saturday, same time, and we're six now.")
    say("whisper", 17.9, operator="ann", respond=False,
        text="Saturday is full at 7:30. Offer 8:15 and the 10 % voucher.")
    say("latency", 19.6, item_id="a3", ms=702)
    say("transcript", 19.6, role="assistant", item_id="a3", final=False,
        text="Saturday at 7:30 is fully booked, I'm afraid. I can offer 8:15 for six")


async def shoot(out: Path, everything: bool = False) -> None:
    from playwright.async_api import async_playwright

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        async with start_backend(tmp_path) as backend:
            await seed_history(backend.store, tmp_path)
            backend.fleet.start_call("CA7be2d6f0c4a94e3b8d2f61a9c0e5b713", "+15550104477")
            other = backend.fleet.start_call("CA1c9e4b7a2d3f45e6a8b0c2d4e6f8a0b1",
                                             "+15550183920", direction="outbound")
            other.publish("transcript", role="assistant", item_id="x", final=False, text="Hi")
            call = backend.fleet.start_call("CA52f0e9d8c7b6a5948372615049382716", "+15550139054")
            call.started -= 21  # the script's last words were just now
            call.events[0]["started_at"] = call.started_iso
            script(call)
            async with async_playwright() as pw:
                context = await pw.chromium.launch_persistent_context(
                    str(tmp_path / "profile"), executable_path=CHROMIUM, args=ARGS,
                    headless=True, viewport=VIEWPORT)
                await context.add_cookies([{
                    "name": "bridge_console", "url": backend.url,
                    "value": backend.operators.session_value("ann"),
                }])
                page = context.pages[0] if context.pages else await context.new_page()
                await page.goto(f"{backend.url}/console/calls/{call.sid}")
                await page.wait_for_selector(".turn-assistant.turn-pending")
                page.set_default_timeout(10000)
                await page.get_by_role("button", name="Listen", exact=True).click()
                await asyncio.wait_for(call.listener_joined.wait(), 10)
                audio = asyncio.create_task(_audio(call, 3.0))
                await page.wait_for_timeout(1200)
                await page.screenshot(path=str(out / "console-live.png"))
                await audio
                await page.goto(f"{backend.url}/console/history")
                await page.wait_for_selector(".chart-latency")
                await page.wait_for_selector("tr[data-sid]")
                await page.screenshot(path=str(out / "console-history.png"))
                if not everything:
                    await context.close()
                    return
                await page.goto(f"{backend.url}/console")
                await page.wait_for_selector("tr[data-sid]")
                await page.screenshot(path=str(out / "console-list.png"))
                await page.goto(f"{backend.url}/console/history/{FEATURED}")
                await page.wait_for_selector(".strip")
                await page.screenshot(path=str(out / "console-call.png"))
                await page.goto(f"{backend.url}/console/login")
                await context.clear_cookies()
                await page.goto(f"{backend.url}/console/login")
                await page.screenshot(path=str(out / "console-login.png"))
                await context.close()


async def _audio(call: FakeCall, seconds: float) -> None:
    """Both sides at real time (the caller quieter), so the level meters show."""
    from server.testing.audio import tone

    loud, soft = tone(int(seconds * 1000), 300, 9000), tone(int(seconds * 1000), 200, 2500)
    for n in range(0, len(loud), 160):
        await call.send_audio("inbound", soft[n:n + 160])
        await call.send_audio("outbound", loud[n:n + 160])
        await asyncio.sleep(0.02)


if __name__ == "__main__":
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(shoot(Path(paths[0] if paths else "out"), everything="--all" in sys.argv))

