"""The console in a real browser: Debian's chromium driven by Playwright, against the real
console routes, operators and records API plus the fake live routes (tests/console_fake.py).

One browser for the module (a fresh profile in tmp), one backend and one page per test. Each
test reads what reached the page from `window.consoleProbe` (timestamped marks) and what the
page sent from the fake backend; the delays they measure are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import statistics
import struct
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession

from server.testing.audio import _DECODE, _encode_sample, tone
from server.testing.inbox import wait_until
from tests.console_fake import (
    ANN,
    FEATURED,
    FEATURED_TIMELINE,
    Backend,
    FakeCall,
    seed_history,
    start_backend,
)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
MIC_HZ = 1000.0  # the fake microphone's tone

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed "
                                                     "(Debian: apt-get install chromium)"),
    pytest.mark.asyncio(loop_scope="module"),
]

if CHROMIUM.exists():
    from playwright.async_api import BrowserContext, Page


def microphone_wav(path: Path, seconds: float = 4.0, rate: int = 48000) -> Path:
    """What the fake microphone says: a 1 kHz tone in 250 ms bursts (a steady tone would be
    taken for noise by the browser's noise suppression)."""
    samples = []
    for n in range(int(seconds * rate)):
        on = (n // (rate // 4)) % 2 == 0
        samples.append(int(12000 * math.sin(2 * math.pi * MIC_HZ * n / rate)) if on else 0)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return path


@contextlib.asynccontextmanager
async def chromium(home: Path, mic_seconds: float = 4.0) -> AsyncIterator[BrowserContext]:
    """Debian's chromium with a profile in `home` and a fake microphone playing MIC_HZ."""
    from playwright.async_api import async_playwright

    wav = microphone_wav(home / "microphone.wav", seconds=mic_seconds)
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(home / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=[*ARGS, f"--use-file-for-fake-audio-capture={wav}"],
            viewport={"width": 1440, "height": 900})
        try:
            yield context
        finally:
            await context.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BrowserContext]:
    async with chromium(tmp_path_factory.mktemp("chromium")) as context:
        yield context


@pytest_asyncio.fixture(loop_scope="module")
async def backend(tmp_path: Path) -> AsyncIterator[Backend]:
    async with start_backend(tmp_path) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: BrowserContext, backend: Backend) -> AsyncIterator[Page]:
    """A fresh tab with no session; a script error on the page fails the test."""
    await browser.clear_cookies()
    tab = await browser.new_page()
    tab.set_default_timeout(10_000)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    await tab.close()
    assert errors == []


async def log_in(page: Page, backend: Backend, operator: str = "ann") -> None:
    """A session cookie as the login form sets it (the login test goes through the form)."""
    await page.context.add_cookies([{"name": "bridge_console", "url": backend.url,
                                     "value": backend.operators.session_value(operator)}])


async def marks(page: Page, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.evaluate(
        "kind => window.consoleProbe.marks.filter(m => m.kind === kind)", kind)
    return found


def report(name: str, delays_ms: list[float]) -> str:
    line = (f"{name}: n={len(delays_ms)} median={statistics.median(delays_ms):.1f} ms "
            f"max={max(delays_ms):.1f} ms")
    print(line)
    return line


# --- login and credentials ---


async def test_login_sets_a_session_cookie_and_no_credential_gets_401(
        page: Page, backend: Backend) -> None:
    await page.goto(f"{backend.url}/console/history")
    assert page.url == f"{backend.url}/console/login?next=/console/history"
    await page.fill("#token", "not-a-token-of-anyone")
    await page.click("button[type=submit]")
    await page.wait_for_selector(".login-error")
    assert "not valid" in await page.inner_text(".login-error")
    assert await page.context.cookies() == []
    await page.fill("#token", ANN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{backend.url}/console/history")
    await page.wait_for_selector("#operator-name:text('ann')")
    (cookie,) = await page.context.cookies()
    assert cookie["name"] == "bridge_console" and cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict" and cookie["secure"] is False  # plain http here
    assert ANN not in cookie["value"] and cookie["value"].startswith("ann.")
    # Every operator route answers 401 JSON without a credential.
    async with ClientSession() as http:
        for path in ("/calls", "/calls?status=live", "/stats", "/console/config", "/events",
                     "/calls/CA1/events", f"/calls/{FEATURED}/recording.wav"):
            async with http.get(backend.url + path) as response:
                assert response.status == 401, path
                assert "error" in await response.json()
    # Logging out clears the session: the API refuses the page again.
    await page.click("text=Log out")
    await page.wait_for_url(f"{backend.url}/console/login")
    assert await page.context.cookies() == []
    status = await page.evaluate("fetch('/console/config').then(r => r.status)")
    assert status == 401


# --- live ---


async def test_live_list_shows_calls_as_they_start_and_end(page: Page, backend: Backend) -> None:
    fleet = backend.fleet
    fleet.start_call("CA0000000000000000000000000000old", "+15550009999")
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console")
    await page.wait_for_selector("tr[data-sid='CA0000000000000000000000000000old']")
    await page.wait_for_selector(".conn-live")
    sid = "CAfeed0000000000000000000000live"
    call = fleet.start_call(sid, "+15550001234")
    row = page.locator(f"tr[data-sid='{sid}']")
    await row.wait_for()
    appeared = (await marks(page, "live.row"))[-1]
    assert await row.locator(".number").inner_text() == "+1555***1234"
    assert "Inbound" in await row.inner_text()
    # The live fields come with the list (polled): speaker, latency, tools running.
    call.publish("transcript", role="caller", item_id="c1", final=False, text="Hi")
    call.publish("latency", item_id="a1", ms=830)
    call.publish("tool.started", call_id="t1", name="lookup", arguments={})
    await row.locator(".speaking-caller").wait_for()
    await row.locator("text=830 ms").wait_for()
    await row.locator("text=1 running").wait_for()
    fleet.end_call(sid)
    await row.wait_for(state="detached")
    gone = (await marks(page, "live.gone"))[-1]
    start_delay = appeared["t"] - fleet.fleet_sent[f"call.started {sid}"] * 1000
    end_delay = gone["t"] - fleet.fleet_sent[f"call.ended {sid}"] * 1000
    print(f"live list: appeared {start_delay:.0f} ms, left {end_delay:.0f} ms after the event")
    assert start_delay < 1000 and end_delay < 1000
    fleet.end_call("CA0000000000000000000000000000old")
    await page.wait_for_selector("text=No calls right now")


async def transcript_script(call: FakeCall) -> None:
    say = call.publish
    say("transcript", role="caller", item_id="c1", final=True, interrupted=False, heard_ms=None,
        text="Where is my order?")
    for delta in ("Let me ", "look that ", "up."):
        say("transcript", role="assistant", item_id="a1", final=False, text=delta)
        await asyncio.sleep(0.02)


async def test_transcript_streams_into_the_call_page(page: Page, backend: Backend) -> None:
    call = backend.fleet.start_call("CAstream000000000000000000000001")
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/calls/{call.sid}")
    await page.wait_for_selector("h1:text('+1555***1111')")
    await transcript_script(call)
    assistant = page.locator(".turn-assistant[data-item='a1']")
    await assistant.locator(".turn-text:text-is('Let me look that up.')").wait_for()
    assert "turn-pending" in (await assistant.get_attribute("class") or "")
    say = call.publish
    say("transcript", role="assistant", item_id="a1", final=True, interrupted=False,
        heard_ms=None, text="Let me look that up for you.")
    await assistant.locator(".turn-text:text-is('Let me look that up for you.')").wait_for()
    say("latency", item_id="a1", ms=640)
    await assistant.locator(".latency:text('640 ms')").wait_for()
    say("tool.started", call_id="t1", name="lookup_order", arguments={"order": "4821"})
    tool = page.locator(".event-tool")
    await tool.locator(".tool-running").wait_for()
    assert '{"order":"4821"}' in await tool.inner_text()
    say("tool.finished", call_id="t1", name="lookup_order", outcome="ok", seconds=0.42,
        result={"status": "shipped"})
    await tool.locator(".tool-ok").wait_for()
    assert '{"status":"shipped"}' in await tool.inner_text()
    say("keypad", digits="••••")
    await page.locator(".event-keypad .digits:text('••••')").wait_for()
    # A cut turn: what the caller heard stays, the rest is shown as not heard.
    say("latency", item_id="a2", ms=None)  # a reply to no new caller turn: no latency
    say("transcript", role="assistant", item_id="a2", final=False, text="Your order shipped ")
    say("barge_in", item_id="a2", heard_ms=1000)
    say("transcript", role="assistant", item_id="a2", final=True, interrupted=True,
        heard_ms=1000, text="Your order shipped on Monday and arrives on Thursday afternoon.")
    cut = page.locator(".turn-assistant.turn-cut[data-item='a2']")
    await cut.locator(".unheard").wait_for()
    assert (await cut.locator(".unheard").inner_text()).strip().endswith("Thursday afternoon.")
    assert "heard 1.0 s" in await cut.locator(".turn-note").inner_text()
    assert await cut.locator(".latency").count() == 0
    assert "median 640 ms" in await page.inner_text(".facts")
    await page.locator(".event-barge").wait_for()
    # The stream drops: the page reconnects from the last event it had, without repeats.
    seen = len(call.events)
    call.drop_streams()
    await asyncio.wait_for(call.resumed.wait(), 5)
    assert call.resumed_from == [seen]
    say("transcript", role="caller", item_id="c2", final=True, interrupted=False,
        heard_ms=None, text="Thanks!")
    await page.locator(".turn-caller[data-item='c2']").wait_for()
    assert await page.locator(".turn").count() == 4
    events = await marks(page, "event")
    rendered = {m["seq"]: m["t"] for m in events}
    assert sorted(rendered) == list(range(1, len(call.events) + 1)) and len(events) == len(rendered)
    delays = [rendered[seq] - call.sent_at[seq] * 1000 for seq in rendered]
    report("event to page", delays)
    assert statistics.median(delays) < 500


async def test_a_call_page_follows_a_handover_to_the_new_instance(page: Page,
                                                                  backend: Backend) -> None:
    fleet = backend.fleet
    call = fleet.start_call("CAmoving00000000000000000000001")
    events_path = f"/calls/{call.sid}/events"
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/calls/{call.sid}")
    await page.get_by_role("button", name="Listen", exact=True).click()
    await asyncio.wait_for(call.listener_joined.wait(), 5)
    call.publish("transcript", role="caller", item_id="c1", final=True, interrupted=False,
                 heard_ms=None, text="Before the deploy.")
    await page.locator(".turn-caller[data-item='c1']").wait_for()
    # The deploy: the call ends here, of kind handover, and is live nowhere for a moment.
    call.listener_joined.clear()
    handed = await fleet.hand_over(call.sid)
    left = handed.events[-1]
    assert (left["type"], left["kind"]) == ("call.ended", "handover")
    await page.wait_for_selector(".banner-moving")
    await page.locator(".event-system:has-text('Handed over')").wait_for()
    asked = sum(1 for _, path, _ in backend.seen if path == events_path)

    async def asked_again() -> bool:  # the page keeps asking through the 404s
        return sum(1 for _, path, _ in backend.seen if path == events_path) >= asked + 2
    await wait_until(asked_again, 10, "the page asking for the call again")
    assert await page.locator(".pill-live").count() == 1  # not shown as ended
    # The new instance has it: the page goes on from the handover's end, and listens again.
    fleet.resume(handed)
    await asyncio.wait_for(call.resumed.wait(), 10)
    call.publish("transcript", role="caller", item_id="c2", final=True, interrupted=False,
                 heard_ms=None, text="After the deploy.")
    await page.locator(".turn-caller[data-item='c2']").wait_for()
    await page.wait_for_selector(".banner-moving", state="hidden")
    assert call.resumed_from[-1] == left["seq"]  # from the handover's end on
    assert await page.locator(".turn").count() == 2  # nothing shown twice
    await asyncio.wait_for(call.listener_joined.wait(), 10)
    # A real end is the end.
    fleet.end_call(call.sid)
    await page.wait_for_selector(".banner-ended")


async def test_listen_in_plays_both_tracks_and_clear_drops_assistant_audio(
        page: Page, backend: Backend) -> None:
    call = backend.fleet.start_call("CAlisten00000000000000000000001")
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/calls/{call.sid}")
    await page.get_by_role("button", name="Listen", exact=True).click()
    await asyncio.wait_for(call.listener_joined.wait(), 5)
    caller, assistant = tone(1000, 300, 6000), tone(4000, 500, 9000)
    # The assistant's audio comes in a burst (the model is faster than real time) ...
    for n in range(0, len(assistant), 160):
        await call.send_audio("outbound", assistant[n:n + 160])
    # ... the caller's at real time.
    sent: list[float] = []
    for n in range(0, len(caller), 160):
        sent.append(await call.send_audio("inbound", caller[n:n + 160]))
        await asyncio.sleep(0.02)
    await page.wait_for_function(
        "() => { const s = window.consoleProbe.listen && window.consoleProbe.listen.stats;"
        " return s && s.inboundFrames >= 50 && s.outboundFrames >= 200 && s.inboundPlayed > 0"
        " && s.outboundPlayed > 0 && s.outboundMs > 1000; }")
    before: dict[str, Any] = await page.evaluate("window.consoleProbe.listen.stats")
    cleared_at = await call.clear()
    await page.wait_for_function(
        "() => window.consoleProbe.marks.some(m => m.kind === 'audio.cleared')")
    (cleared,) = await marks(page, "audio.cleared")
    assert cleared["outboundMs"] == 0 and cleared["droppedMs"] > 500
    clear_delay = cleared["t"] - cleared_at * 1000
    print(f"clear to assistant audio dropped: {clear_delay:.1f} ms "
          f"({before['outboundMs']:.0f} ms of assistant audio was queued)")
    assert clear_delay < 100
    # Nothing more of the assistant plays after the clear.
    played = await page.evaluate("window.consoleProbe.listen.stats.outboundPlayed")
    await page.wait_for_function(
        "n => window.consoleProbe.listen.stats.time > n + 0.2",
        arg=(await page.evaluate("window.consoleProbe.listen.stats.time")))
    assert await page.evaluate("window.consoleProbe.listen.stats.outboundPlayed") == played
    arrived = [m["t"] for m in await marks(page, "audio") if m["track"] == "inbound"]
    assert len(arrived) == len(sent)
    report("audio to page (caller frames, socket to worklet)",
           [a - s * 1000 for a, s in zip(arrived, sent, strict=True)])
    context: dict[str, float] = await page.evaluate(
        "({base: window.consoleProbe.listen.context.baseLatency * 1000,"
        " output: (window.consoleProbe.listen.context.outputLatency || 0) * 1000})")
    print(f"listen playout: jitter buffer 60 ms target, caller buffer at the end "
          f"{before['inboundMs']:.0f} ms, audio context base {context['base']:.1f} ms, "
          f"output {context['output']:.1f} ms")


async def test_whisper_posts_the_text_and_shows_it(page: Page, backend: Backend) -> None:
    call = backend.fleet.start_call("CAwhisper0000000000000000000001")
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/calls/{call.sid}")
    await page.wait_for_selector(".conn-live")
    await page.click("button:text('Whisper')")  # nothing to send: nothing sent
    await page.fill("textarea", "Offer the 10 % discount")
    await page.check("#whisper-respond")
    await page.click("button:text('Whisper')")
    post = await backend.fleet.wait_post("whisper")
    assert post.body == {"text": "Offer the 10 % discount", "respond": True}
    assert post.operator == "ann"
    assert [p.action for p in backend.fleet.posts] == ["whisper"]
    await page.wait_for_selector(".event-whisper:has-text('Offer the 10 % discount')")
    assert await page.input_value("textarea") == ""
    assert not await page.is_checked("#whisper-respond")


def dominant_hz(ulaw: bytes, candidates: tuple[float, ...]) -> float:
    """Which of the candidate frequencies is strongest in this 8 kHz mu-law audio."""
    samples = [_DECODE[b] for b in ulaw]

    def power(hz: float) -> float:  # Goertzel
        k = 2 * math.cos(2 * math.pi * hz / 8000)
        s1 = s2 = 0.0
        for x in samples:
            s1, s2 = x + k * s1 - s2, s1
        return s1 * s1 + s2 * s2 - k * s1 * s2

    return max(candidates, key=power)


async def test_take_over_sends_the_microphone_and_hand_back_stops_it(
        page: Page, backend: Backend) -> None:
    call = backend.fleet.start_call("CAtakeover000000000000000000001")
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/calls/{call.sid}")
    await page.wait_for_selector(".conn-live")
    await page.click("button:text('Take over')")
    assert (await backend.fleet.wait_post("takeover")).operator == "ann"
    await asyncio.wait_for(call.talk_open.wait(), 5)
    await asyncio.wait_for(call.listener_joined.wait(), 5)  # the operator hears the caller
    deadline = time.monotonic() + 10
    while len(call.talk_frames) < 75 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    frames = [base64.b64decode(payload) for _, payload in call.talk_frames]
    assert len(frames) >= 75 and {len(f) for f in frames} == {160}  # 20 ms of 8 kHz mu-law
    times = [t for t, _ in call.talk_frames]
    cadence = (times[-1] - times[0]) / (len(times) - 1) * 1000
    print(f"talk: {len(frames)} frames, one every {cadence:.1f} ms on average")
    assert 10 < cadence < 40
    audio = b"".join(frames[25:75])  # a second, past the microphone's start
    assert dominant_hz(audio, (250.0, 500.0, MIC_HZ, 2000.0, 3000.0)) == MIC_HZ
    settings = await page.evaluate("window.consoleProbe.talk.settings")
    assert settings.get("echoCancellation") is True
    await page.wait_for_selector(".pill-operator:has-text('Taken over · ann')")
    await page.click("button:text('Hand back')")
    await backend.fleet.wait_post("handback")
    await asyncio.wait_for(call.talk_closed.wait(), 5)
    count = len(call.talk_frames)
    await page.wait_for_selector("button:text('Take over')")
    await page.wait_for_selector(".pill-live")
    await asyncio.sleep(0.2)  # a frame in flight would have arrived by now
    assert len(call.talk_frames) == count


async def test_a_call_another_operator_took_over_cannot_be_taken(
        page: Page, backend: Backend) -> None:
    call = backend.fleet.start_call("CAbobhasit00000000000000000001")
    call.taken_over_by = "bob"
    call.publish("takeover", operator="bob")
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/calls/{call.sid}")
    button = page.locator("button:has-text('bob has the call')")
    await button.wait_for()
    assert await button.is_disabled()
    call.taken_over_by = None
    call.publish("handback", operator="bob")
    await page.locator("button:text('Take over')").wait_for()
    assert await page.locator("button:text('Take over')").is_enabled()


async def test_hang_up_and_transfer(page: Page, backend: Backend) -> None:
    call = backend.fleet.start_call("CAhangup0000000000000000000001")
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/calls/{call.sid}")
    await page.wait_for_selector(".conn-live")
    await page.select_option("select", "support")
    await page.click("button:text('Transfer')")
    await page.click("dialog button[value=yes]")
    assert (await backend.fleet.wait_post("transfer")).body == {"target": "support"}
    await page.click("button:text('Hang up')")
    await page.click("dialog button[value=no]")  # cancelled: nothing sent
    await page.click("button:text('Hang up')")
    await page.click("dialog button[value=yes]")
    post = await backend.fleet.wait_post("hangup")
    assert post.operator == "ann"
    assert [p.action for p in backend.fleet.posts] == ["transfer", "hangup"]
    await page.wait_for_selector(".banner-ended:has-text('This call has ended')")
    assert await page.locator("button:text('Hang up')").is_disabled()
    assert await page.locator("button:has-text('Whisper')").is_disabled()
    await page.click("text=See it in the history")
    await page.wait_for_url(f"{backend.url}/console/history/{call.sid}")


# --- history ---


async def test_history_filters_charts_and_recording_seek(page: Page, backend: Backend,
                                                        tmp_path: Path) -> None:
    await seed_history(backend.store, tmp_path)
    everything, _ = await backend.store.page(backend_query(limit=500))
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/history")
    await page.wait_for_selector("tr[data-sid]")
    assert await page.locator("tr[data-sid]").count() == len(everything) == 37
    # The charts: calls per hour add up to the calls; the histogram to every reply.
    await page.wait_for_selector(".chart-latency .chart-bar", state="attached")
    hours = await page.eval_on_selector_all(".chart-calls .chart-bar",
                                            "bars => bars.map(b => Number(b.dataset.value))")
    assert sum(hours) == 37 and 24 <= len(hours) <= 25
    replies = await page.eval_on_selector_all(".chart-latency .chart-bar",
                                              "bars => bars.map(b => Number(b.dataset.value))")
    records = [await backend.store.get(c["call_sid"]) for c in everything]
    assert sum(replies) == sum(len(r["latencies_ms"]) for r in records if r)
    # Filters: by ending, then by number.
    transferred = [c for c in everything if c["end_kind"] == "transferred"]
    await page.select_option("select[name=end_kind]", "transferred")
    await page.click("button:text('Apply')")
    await page.wait_for_url("**/console/history?end_kind=transferred")
    await page.wait_for_function(
        "n => document.querySelectorAll('tr[data-sid]').length === n", arg=len(transferred))
    assert set(await page.locator("tbody .pill").all_inner_texts()) == {"Transferred"}
    await page.goto(f"{backend.url}/console/history?number=%2B15550147311")
    await page.wait_for_selector(f"tr[data-sid='{FEATURED}']")
    assert await page.locator("tr[data-sid]").count() == 1
    # The call's page: the recording plays, a click on a line seeks to it.
    await page.click(f"tr[data-sid='{FEATURED}']")
    await page.wait_for_url(f"**/console/history/{FEATURED}")
    # The URL changes before the call is fetched: wait for its player, then its metadata.
    await page.wait_for_selector("audio", state="attached")
    await page.wait_for_function("() => document.querySelector('audio').readyState >= 1")
    line = next(e for e in FEATURED_TIMELINE if e.get("text", "").startswith("Can I get it"))
    await page.click(f".turn[data-item='{line['item_id']}']")
    await page.wait_for_function("at => document.querySelector('audio').currentTime > at",
                                 arg=line["at"] - 0.3)
    await page.wait_for_selector(f".turn.current[data-item='{line['item_id']}']")
    position = await page.evaluate("document.querySelector('audio').currentTime")
    assert line["at"] - 0.3 < position < line["at"] + 2
    ranges = [r for m, p, r in backend.seen if p.endswith("/recording.wav") and m == "GET"]
    assert ranges and all(r and r.startswith("bytes=") for r in ranges)
    # The server answers a Range request with that part of the file.
    part = await page.evaluate(
        "url => fetch(url, {headers: {Range: 'bytes=100-199'}})"
        ".then(async r => [r.status, (await r.arrayBuffer()).byteLength])",
        f"/calls/{FEATURED}/recording.wav")
    assert part == [206, 100]
    assert await page.locator(".event-tool:has-text('lookup_order')").count() == 1
    assert await page.inner_text(".event-keypad .digits") == "••••"  # masked without LOG_PII
    assert "ann" in await page.locator(".actions").inner_text()


async def test_history_says_when_it_is_empty_and_when_it_fails(page: Page,
                                                               backend: Backend) -> None:
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/history")
    await page.wait_for_selector(".state-empty:has-text('No calls yet')")
    await page.wait_for_selector(".chart-foot:has-text('No calls in this period')")
    await page.goto(f"{backend.url}/console/history?end_kind=transferred")
    await page.wait_for_selector(".state-empty:has-text('No calls match these filters')")
    await backend.store.close()  # the database goes away: 503 from the API
    await page.goto(f"{backend.url}/console/history")
    await page.wait_for_selector(".state-error:has-text('The calls cannot be loaded')")
    await page.wait_for_selector(".state-error:has-text('The charts cannot be loaded')")
    await page.goto(f"{backend.url}/console/history/CAnothing")
    await page.wait_for_selector(".state-error:has-text('The call cannot be loaded')")


def backend_query(**values: Any) -> Any:
    from server.records.store import CallQuery

    return CallQuery(**values)


async def test_the_page_and_the_server_agree_on_mu_law(page: Page, backend: Backend) -> None:
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console")
    decoded, encoded = await page.evaluate("""async () => {
        const m = await import('/console/static/js/audio/mulaw.js');
        const samples = [];
        for (let s = -32768; s < 32768; s += 97) samples.push(s);
        return [Array.from(m.DECODE, x => Math.round(x * 32768)),
                samples.map(s => [s, m.encodeSample(s / 32768)])];
    }""")
    assert decoded == _DECODE
    assert [code for _, code in encoded] == [_encode_sample(s) for s, _ in encoded]


# --- campaigns ---

CAMPAIGN_CSV = (b"to,first_name\n+15550103001,Ann\n+15550103002,Bob\n+15550103003,Cy\n"
                b"not-a-number,Dee\n")
COUNTS_JS = ("els => Object.fromEntries(els.map(e => [e.dataset[KEY], "
             "Number(e.textContent.split(SEP)[1])]))")


async def shown_states(page: Page) -> dict[str, int]:
    chips: dict[str, int] = await page.eval_on_selector_all(
        ".state-counts [data-state]",
        COUNTS_JS.replace("KEY", "'state'").replace("SEP", "': '"))
    return chips


async def test_campaigns_start_from_a_csv_and_can_be_paused_resumed_and_cancelled(
        page: Page, backend: Backend, tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.csv", tmp_path / "numbers.csv"
    bad.write_bytes(b"name\nAnn\n")
    good.write_bytes(CAMPAIGN_CSV)
    await log_in(page, backend)
    await page.goto(f"{backend.url}/console/campaigns")
    await page.wait_for_selector(".state-empty:has-text('No campaigns yet')")
    # A CSV the API refuses: its reason is on the form, and nothing is stored.
    await page.fill("input[name=name]", "Reminders")
    await page.set_input_files("input[name=csv]", bad)
    await page.click("button:text('Start campaign')")
    await page.wait_for_selector(".form-error:not(:empty)")
    assert "to" in await page.inner_text(".form-error")
    assert await backend.campaigns.store.list_campaigns() == []
    # A good one: stored as the form said, by the operator logged in.
    await page.fill("input[name=concurrency]", "3")
    await page.fill("input[name=window]", "09:00-18:00")
    await page.set_input_files("input[name=csv]", good)
    await page.click("button:text('Start campaign')")
    await page.wait_for_url(f"{backend.url}/console/campaigns/cmp_*")
    campaign_id = page.url.rsplit("/", 1)[1]
    stored = await backend.campaigns.progress(campaign_id, calls=True)
    assert (stored["name"], stored["created_by"], stored["total"]) == ("Reminders", "ann", 4)
    assert stored["settings"]["concurrency"] == 3
    zone = await page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone")
    assert stored["settings"]["window"] == {"start": "09:00", "end": "18:00", "timezone": zone}
    # The page shows what the store holds: each number's state, the counts; numbers masked.
    await page.wait_for_selector("tr[data-seq]")
    states = await page.eval_on_selector_all("tr[data-seq]",
                                             "rows => rows.map(r => r.dataset.state)")
    assert states == [c["state"] for c in stored["calls"]]
    assert set(states) == {"pending", "skipped"}  # the bad number is never dialled
    assert await shown_states(page) == stored["states"]
    assert "+15550103001" not in await page.inner_text("main")
    # Pause from the page; resume elsewhere (another operator): the page follows by polling.
    await page.click("button:text('Pause')")
    await page.wait_for_selector("h1 [data-status=paused]")
    assert (await backend.campaigns.progress(campaign_id))["status"] == "paused"
    assert await page.locator("button:text('Pause')").is_disabled()
    await backend.campaigns.act(campaign_id, "resume", operator="bob")
    await page.wait_for_selector("h1 [data-status=running]")
    # Cancel asks first; then every number not dialled is settled as skipped.
    await page.click("button:text-is('Cancel')")
    await page.click("dialog button[value=no]")
    assert (await backend.campaigns.progress(campaign_id))["status"] == "running"
    await page.click("button:text-is('Cancel')")
    await page.click("dialog button[value=yes]")
    await page.wait_for_selector("h1 [data-status=cancelled]")
    final = await backend.campaigns.progress(campaign_id)
    assert final["states"]["skipped"] == 4
    assert await shown_states(page) == final["states"]
    outcomes = await page.eval_on_selector_all(
        ".campaign-summary [data-outcome]",
        COUNTS_JS.replace("KEY", "'outcome'").replace("SEP", "'· '"))
    assert outcomes == final["outcomes"]
    assert await page.inner_text(".campaign-summary .progress .figure") == "4 / 4"
    assert await page.locator("button:text-is('Cancel')").is_disabled()
    # The list has it, with its status and progress.
    await page.click("text=← Campaigns")
    row = f"tr[data-id='{campaign_id}']"
    await page.wait_for_selector(f"{row} [data-status=cancelled]")
    assert await page.inner_text(f"{row} .progress .figure") == "4 / 4"
