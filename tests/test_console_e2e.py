"""The console end to end in a real browser: Debian's chromium (Playwright) on the real bridge,
its Realtime stand-in and simulated calls (server.testing.simulator), all on loopback; and a
console on instance A controlling a call on instance B through Redis.

One browser for the module (a fake microphone playing a 1 kHz tone in bursts); each test runs
its own bridge and calls. The simulated caller speaks its turns at real time and waits, silent
on the line, between them until the test lets it go on (`SimCall.go_on`). Delays measured on
the way (event to page, audio to page, a whisper to the model) are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, web

from server.app import REGISTRY, create_app
from server.call.call import Call
from server.call.events import CallEvent, HandBack, TakeOver
from server.call.features.operator import OperatorFeature
from server.settings import Settings
from server.testing import audio
from server.testing.dial import TwilioStream
from server.testing.inbox import wait_until
from server.testing.scenarios import serving
from server.testing.simulator import CallResult, place_call, sample_wav
from server.testing.standin import (
    STANDIN_SESSIONS,
    StandinOptions,
    StandinSession,
    create_standin_app,
)
from tests.conftest import API_KEY, AUTH_TOKEN, PROMPTS, ROOT
from tests.redis_server import start_or_skip
from tests.test_console_browser import (
    CHROMIUM,
    MIC_HZ,
    chromium,
    dominant_hz,
    marks,
    report,
)
from tests.test_operator import ADMIN, ANN, BOB, TARGETS

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed "
                                                     "(Debian: apt-get install chromium)"),
    pytest.mark.asyncio(loop_scope="module"),
]

if CHROMIUM.exists():
    from playwright.async_api import BrowserContext, Page

WAIT = 10.0
SPEECH = audio.ulaw_encode(audio.read_wav(sample_wav()))[: 400 * audio.BYTES_PER_MS]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BrowserContext]:
    async with chromium(tmp_path_factory.mktemp("chromium-e2e"), mic_seconds=8.0) as context:
        yield context


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: BrowserContext) -> AsyncIterator[Page]:
    await browser.clear_cookies()
    tab = await browser.new_page()
    tab.set_default_timeout(WAIT * 1000)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    await tab.close()
    assert errors == []


@dataclass
class Bridge:
    url: str
    app: web.Application
    standin: web.Application

    @property
    def sessions(self) -> list[StandinSession]:
        sessions: list[StandinSession] = self.standin[STANDIN_SESSIONS]
        return sessions

    def call(self, sid: str) -> Call:
        found = self.app[REGISTRY].find(sid)
        assert found is not None, f"no call {sid} here"
        return found


def bridge_settings(tmp: Path, standin: str, **overrides: Any) -> Settings:
    return Settings(
        openai_api_key=API_KEY,
        openai_realtime_url=standin.replace("http://", "ws://") + "/v1/realtime",
        twilio_auth_token=AUTH_TOKEN, admin_token=ADMIN,
        operator_tokens=(("ann", ANN), ("bob", BOB)), transfer_targets=TARGETS,
        host="127.0.0.1", vad_silence_ms=200,
        database_url=f"sqlite:///{tmp}/calls.db", records_spool=tmp / "spool.jsonl",
        record_calls=True, recordings_dir=tmp / "recordings",
        prompts_dir=PROMPTS, prices_file=ROOT / "config" / "prices.json", **overrides)


@contextlib.asynccontextmanager
async def running_bridge(tmp: Path, **overrides: Any) -> AsyncIterator[Bridge]:
    tmp.mkdir(parents=True, exist_ok=True)
    standin = create_standin_app(StandinOptions(api_key=API_KEY))
    async with serving(standin) as standin_url:
        app = create_app(bridge_settings(tmp, standin_url, **overrides))
        async with serving(app) as url:
            yield Bridge(url, app, standin)


@pytest_asyncio.fixture(loop_scope="module")
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    async with running_bridge(tmp_path / "bridge") as running:
        yield running


@dataclass
class SimCall:
    """A simulated call on a bridge, driven turn by turn by the test."""

    base: str
    turns: int
    sid: str
    reply_wait: float = 3.0
    streams: list[TwilioStream] = field(default_factory=list)
    answered: dict[int, asyncio.Event] = field(default_factory=dict)
    gates: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    task: asyncio.Task[CallResult] | None = None

    def start(self) -> SimCall:
        loop = asyncio.get_running_loop()
        for turn in range(1, self.turns + 1):
            self.answered[turn] = asyncio.Event()
            self.gates[turn] = loop.create_future()
        self.task = asyncio.ensure_future(place_call(
            self.base, speech=SPEECH, auth_token=AUTH_TOKEN, turns=self.turns, settle=0.3,
            reply_wait=self.reply_wait, caller="+15550101234", call_sid=self.sid,
            echo=self.lines.append, after_turn=self._after_turn, on_stream=self.streams.append))
        return self

    def _after_turn(self, turn: int) -> asyncio.Future[None]:
        self.answered[turn].set()
        return self.gates[turn]

    async def turn_done(self, turn: int) -> None:
        await asyncio.wait_for(self.answered[turn].wait(), WAIT + self.reply_wait)

    def go_on(self, turn: int) -> None:
        if not self.gates[turn].done():
            self.gates[turn].set_result(None)

    @property
    def stream(self) -> TwilioStream:
        return self.streams[-1]

    def media(self) -> list[bytes]:
        return [base64.b64decode(m["media"]["payload"]) for m in self.stream.received
                if m.get("event") == "media"]

    async def result(self) -> CallResult:
        for turn in self.gates:
            self.go_on(turn)
        assert self.task is not None
        return await asyncio.wait_for(self.task, WAIT * 2)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def new_sid(n: int) -> str:
    return f"CA{n:04d}" + "e2e0" * 7


async def log_in(page: Page, base: str, token: str = ANN, path: str = "/console") -> None:
    await page.goto(f"{base}{path}")
    await page.wait_for_url(f"**/console/login?next={path}")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}{path}")


class ServerTimes:
    """When the bridge published each event of a call and relayed each caller frame (epoch
    ms), to measure what reached the page against."""

    def __init__(self, call: Call) -> None:
        self.events: dict[int, float] = {}
        self.frames: list[tuple[str, float]] = []
        self._subscription = call.subscribe(replay=True)
        self.task = asyncio.ensure_future(self._follow())
        call.audio_listeners.append(self)

    async def _follow(self) -> None:
        async for event in self._subscription:
            if isinstance(event.get("seq"), int):  # its `time`: when it was published
                published = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
                self.events[event["seq"]] = published.timestamp() * 1000

    def on_caller_audio(self, payload: str) -> None:
        self.frames.append((payload[:24], time.time() * 1000))

    def on_assistant_audio(self, payload: str) -> None: ...

    def on_clear(self) -> None: ...

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# --- one operator, one instance ---


async def test_login_then_a_call_appears_streams_and_is_heard_and_whispered_to(
        page: Page, bridge: Bridge) -> None:
    await log_in(page, bridge.url)
    await page.wait_for_selector(".conn-live")
    await page.wait_for_selector("text=No calls right now")
    sim = SimCall(bridge.url, turns=2, sid=new_sid(1)).start()
    try:
        row = page.locator(f"tr[data-sid='{sim.sid}']")
        await row.wait_for()
        call = bridge.call(sim.sid)
        times = ServerTimes(call)
        appeared = (await marks(page, "live.row"))[-1]["t"]
        await wait_until(lambda: 1 in times.events, WAIT, "call.started published")
        print(f"live list: the row {appeared - times.events[1]:.0f} ms after call.started")
        opened = time.time() * 1000
        assert await row.locator(".number").inner_text() == "+1555***1234"
        await row.click()
        await page.wait_for_url(f"**/console/calls/{sim.sid}")
        # The transcript streams: the caller's turn, the assistant's answer.
        await sim.turn_done(1)
        await page.locator(".turn-caller .turn-text:has-text('caller turn 1')").wait_for()
        await page.locator(".turn-assistant .turn-text:has-text('echo of')").wait_for()
        # Listen in: the caller's side live, then the assistant's answer to turn 2.
        await page.get_by_role("button", name="Listen", exact=True).click()
        await page.wait_for_function(
            "() => { const l = window.consoleProbe.listen; return l && l.stats"
            " && l.stats.inboundFrames >= 25; }")
        sim.go_on(1)
        await sim.turn_done(2)
        await page.wait_for_function(
            "() => { const s = window.consoleProbe.listen.stats;"
            " return s.outboundFrames >= 3 && s.outboundPlayed > 0 && s.inboundPlayed > 0; }")
        # Whisper, "say it now": the model gets a system message, then a response is asked.
        session = bridge.sessions[-1]
        creates = sum(e.get("type") == "response.create" for e in session.received)
        await page.fill("textarea", "Offer the 10 % discount")
        await page.check("#whisper-respond")
        clicked = time.monotonic()
        await page.click("button:text('Whisper')")
        item = await session.wait_for("conversation.item.create")
        print(f"whisper: click to the model's system message "
              f"{1000 * (time.monotonic() - clicked):.0f} ms (the POST to it: test_operator)")
        assert item["item"]["role"] == "system"
        assert item["item"]["content"][0]["text"] == "Offer the 10 % discount"
        await session.wait_for("response.create", count=creates + 1)
        await page.wait_for_selector(".event-whisper:has-text('Offer the 10 % discount')")
        assert [(a["operator"], a["action"]) for a in call.record.operator_actions] == [
            ("ann", "listen"), ("ann", "whisper")]
        # The caller hangs up: the page says so.
        result = await sim.result()
        assert result.ok, result.error
        await page.wait_for_selector(".banner-ended:has-text('This call has ended')")
        # What reached the page, and how long after the bridge had it.
        rendered = {m["seq"]: m["t"] for m in await marks(page, "event")}
        assert sorted(rendered) == sorted(times.events)
        report("event to page (real bridge; published after the page opened)",
               [rendered[s] - times.events[s] for s in rendered if times.events[s] > opened])
        # A caller frame reached the page: after the latest time the bridge relayed the same
        # audio (each turn says the same words; the silence between them is left out).
        delays = []
        for m in await marks(page, "audio"):
            if m["track"] == "inbound" and not m["head"].startswith("////"):
                relayed = [t for head, t in times.frames if head == m["head"] and t <= m["t"] + 1]
                if relayed:
                    delays.append(m["t"] - max(relayed))
        assert len(delays) >= 15
        report("audio to page (caller frames, bridge relay to the page's socket)", delays)
        await times.close()
    finally:
        await sim.close()


async def test_take_over_hand_back_hang_up_and_the_recording(
        page: Page, bridge: Bridge) -> None:
    await log_in(page, bridge.url)
    sim = SimCall(bridge.url, turns=2, sid=new_sid(2), reply_wait=1.0).start()
    try:
        await page.locator(f"tr[data-sid='{sim.sid}']").click()
        await sim.turn_done(1)
        call = bridge.call(sim.sid)
        feature = call.feature(OperatorFeature)
        assert feature is not None
        session = bridge.sessions[-1]
        await page.locator(".turn-assistant .turn-text:has-text('echo of')").wait_for()
        # When the take-over and the hand-back were published, and the model's audio played
        # to the caller by then (record.frames_out counts only the model's).
        moments: dict[str, tuple[float, int]] = {}

        def moment(event: CallEvent) -> None:
            moments.setdefault(event.type, (time.monotonic(), call.record.frames_out))

        call.events.on(TakeOver, moment)
        call.events.on(HandBack, moment)
        # Take over: the microphone reaches the caller, the model's audio does not.
        creates = sum(e.get("type") == "response.create" for e in session.received)
        await page.click("button:text('Take over')")
        await page.wait_for_selector(".pill-operator:has-text('Taken over · ann')")
        await page.wait_for_selector("button:text('Hand back')")
        control = feature.control
        assert control is not None and control.operator == "ann"
        sim.go_on(1)  # the caller speaks while the operator has the call
        await sim.turn_done(2)
        await page.wait_for_function("() => window.consoleProbe.talk && "
                                     "window.consoleProbe.talk.sent >= 60")
        # The model heard the operator: its input carries the microphone's tone.
        appended = [base64.b64decode(e["audio"]) for e in session.received
                    if e.get("type") == "input_audio_buffer.append"][-50:]
        assert dominant_hz(b"".join(appended), (250.0, 500.0, MIC_HZ, 2000.0)) == MIC_HZ
        # Hand back: the talk socket closes, the assistant answers the caller again.
        await page.click("button:text('Hand back')")
        await page.wait_for_selector("button:text('Take over')")
        await page.wait_for_selector(".pill-live")
        await wait_until(lambda: feature.control is None, WAIT, "the hand-back")
        # Meanwhile not one frame of the model's was played; what the caller got was the
        # operator's microphone, in the console's 20 ms frames.
        (taken_at, model_before), (back_at, model_after) = moments["takeover"], moments["handback"]
        assert model_after == model_before
        operator_frames = [base64.b64decode(m["media"]["payload"]) for m, at in
                           zip(sim.stream.received, sim.stream.arrivals, strict=True)
                           if m.get("event") == "media" and taken_at <= at <= back_at]
        assert control.frames >= len(operator_frames) >= 50
        assert {len(f) for f in operator_frames} == {160}
        assert dominant_hz(b"".join(operator_frames[10:50]),
                           (250.0, 500.0, MIC_HZ, 2000.0)) == MIC_HZ
        assert sum(e.get("type") == "response.create" for e in session.received) == creates
        assert (call.playback.muted, call.gate.held) == (False, False)  # the assistant's again
        await page.locator(".event-handback").wait_for()
        # Hang up from the console: the call ends, Twilio is told to hang up.
        await page.click("button:text('Hang up')")
        await page.click("dialog button[value=yes]")
        await asyncio.wait_for(sim.stream.closed.wait(), WAIT)  # the bridge ended it
        result = await sim.result()
        assert result.next_action == "hangup" and result.hung_up_by == "bridge"
        await page.wait_for_selector(".banner-ended")
        # The history: the call, its operator actions, and its recording plays and seeks.
        await page.click("text=See it in the history")
        await page.wait_for_url(f"**/console/history/{sim.sid}")
        actions = page.locator(".actions")
        for action in ("takeover", "handback", "hangup"):
            await actions.locator(f"text={action}").first.wait_for()
        # The URL changes before the call is fetched: wait for its player, then its metadata.
        await page.wait_for_selector("audio", state="attached")
        await page.wait_for_function("() => document.querySelector('audio').readyState >= 1")
        duration = await page.evaluate("document.querySelector('audio').duration")
        assert duration > 2
        line = page.locator(".turn-assistant.seekable").last
        at = float(await line.get_attribute("data-at") or 0)
        await line.click()
        await page.wait_for_function("at => document.querySelector('audio').currentTime > at",
                                     arg=at - 0.3)
        assert (await page.locator(".turn-operator").count()) >= 1  # the operator's words
    finally:
        await sim.close()


async def test_without_a_credential_every_route_is_401(bridge: Bridge) -> None:
    async with ClientSession() as http:
        for path in ("/calls", "/calls?status=live", "/events", "/stats", "/console/config",
                     "/calls/CA1/events", "/calls/CA1/recording.wav"):
            async with http.get(bridge.url + path) as response:
                assert response.status == 401, path
                assert "error" in await response.json()
        for name in ("whisper", "takeover", "handback", "hangup", "transfer"):
            async with http.post(f"{bridge.url}/calls/CA1/{name}", json={}) as response:
                assert response.status == 401, name
        for name in ("listen", "talk"):
            async with http.get(f"{bridge.url}/calls/CA1/{name}",
                                headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                         "Sec-WebSocket-Version": "13",
                                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
                                ) as response:
                assert response.status == 401, name


# --- a console on instance A, the call on instance B ---


async def test_a_console_on_one_instance_controls_a_call_on_another(
        page: Page, tmp_path: Path) -> None:
    redis = start_or_skip()
    try:
        url = f"redis://127.0.0.1:{redis.port}/0"
        async with running_bridge(tmp_path / "a", redis_url=url) as a, \
                running_bridge(tmp_path / "b", redis_url=url) as b:
            await log_in(page, a.url)
            sim = SimCall(b.url, turns=1, sid=new_sid(3), reply_wait=1.0).start()
            try:
                await page.locator(f"tr[data-sid='{sim.sid}']").click()
                await sim.turn_done(1)
                assert a.app[REGISTRY].find(sim.sid) is None  # the call is B's
                call = b.call(sim.sid)
                await page.locator(".turn-assistant .turn-text:has-text('echo of')").wait_for()
                await page.click("button:text('Take over')")
                await page.wait_for_selector(".pill-operator:has-text('Taken over · ann')")
                feature = call.feature(OperatorFeature)
                assert feature is not None
                await wait_until(lambda: feature.control is not None
                                 and feature.control.frames >= 30, WAIT, "the operator's audio")
                heard = sim.media()[-25:]
                assert dominant_hz(b"".join(heard), (250.0, 500.0, MIC_HZ, 2000.0)) == MIC_HZ
                await page.wait_for_function(  # A's listen-in hears B's caller
                    "() => window.consoleProbe.listen && window.consoleProbe.listen.stats"
                    " && window.consoleProbe.listen.stats.inboundFrames >= 25")
                await page.click("button:text('Hand back')")
                await wait_until(lambda: feature.control is None, WAIT, "the hand-back")
                await page.click("button:text('Hang up')")
                await page.click("dialog button[value=yes]")
                await asyncio.wait_for(sim.stream.closed.wait(), WAIT)
                result = await sim.result()
                assert result.next_action == "hangup"
                await page.wait_for_selector(".banner-ended")
                assert [(x["operator"], x["action"]) for x in call.record.operator_actions] \
                    == [("ann", "takeover"), ("ann", "listen"), ("ann", "handback"),
                        ("ann", "hangup")]
            finally:
                await sim.close()
    finally:
        redis.cleanup()


