"""Shared rig: the bridge on a loopback port, the Realtime stand-in (or, with
`model_api="live"`, the GPT-Live stand-in) as OpenAI, and a Twilio stream client, all over real
sockets."""

from __future__ import annotations

import asyncio
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import REGISTRY, create_app
from server.call.call import Call
from server.fleet.events import EventBus
from server.fleet.state import SharedState
from server.settings import Settings
from server.testing.dial import call_form, dial, post_webhook
from server.testing.inbox import wait_until
from server.testing.live_standin import (
    LiveStandinOptions,
    LiveStandinSession,
    create_live_standin_app,
    next_live_session,
)
from server.testing.sdk_check import EventChecker, problems
from server.testing.simulator import TwilioStream
from server.testing.standin import (
    StandinOptions,
    StandinSession,
    create_standin_app,
    next_session,
)
from tests.redis_server import redis_prefix, redis_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "config" / "prompts"

API_KEY = "sk-test-0123456789abcdef"
AUTH_TOKEN = "twilio-auth-token-0123456789"

CALLER, CALLED = "+15550001111", "+15550002222"
LOUD = bytes([0x80, 0x00] * 80)  # one 20 ms mu-law frame at full scale: speech to any VAD
SILENCE = b"\xff" * 160


def loud(variant: int = 0) -> bytes:
    """A loud frame whose bytes are distinct per variant, to tell calls' audio apart."""
    return bytes([0x80 + variant, 0x00 + variant] * 80)


class Line:
    """The caller's side of a stream as Twilio sends it: a 20 ms frame every 20 ms, speech when
    a test says so, silence otherwise. GPT-Live needs it: its timeline (its turns, its output)
    advances only while input arrives."""

    def __init__(self, stream: TwilioStream, period: float = 0.02) -> None:
        self.stream = stream
        self.period = period
        self.sent = 0
        self._queue: deque[bytes] = deque()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self.stream.closed.is_set():
            frame = self._queue.popleft() if self._queue else SILENCE
            try:
                await self.stream.send_media(frame)
            except (ConnectionError, RuntimeError):  # the bridge closed the stream
                return
            self.sent += 1
            due += self.period
            await asyncio.sleep(max(due - loop.time(), 0))

    async def say(self, frames: int = 10, variant: int = 0) -> bytes:
        """One caller turn: `frames` of speech (then the line goes on in silence); returns
        once they are sent."""
        spoken = loud(variant)
        self._queue.extend([spoken] * frames)
        await wait_until(lambda: not self._queue or self._task.done(), 10.0, "speech sent")
        return spoken

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Rig:
    standin: TestServer
    bridge: TestClient[web.Request, web.Application]
    settings: Settings
    streams: list[TwilioStream] = field(default_factory=list)
    # every event both ways through the stand-in, checked against openai-python's GA types
    # (or GPT-Live's)
    events: EventChecker = field(default_factory=EventChecker)
    lines: list[Line] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.settings.model_api

    @property
    def app(self) -> web.Application:
        return self.bridge.app

    async def webhook(self, call_sid: str, sign: bool = True) -> tuple[str, dict[str, str]]:
        """Do what Twilio does on an incoming call; return the stream URL and parameters."""
        twiml = await post_webhook(
            self.bridge.session, str(self.bridge.make_url("/incoming-call")),
            call_form(call_sid, CALLER, CALLED),
            self.settings.twilio_auth_token if sign else None)
        assert twiml.stream_url is not None, twiml
        return twiml.stream_url, twiml.parameters

    async def open_stream(self, url: str, marks: str = "manual",
                          headers: dict[str, str] | None = None) -> TwilioStream:
        stream = await TwilioStream.connect(self.bridge.session, url, headers=headers,
                                            marks=marks)
        self.streams.append(stream)
        return stream

    async def place(self, marks: str = "manual", **start: Any) -> tuple[TwilioStream,
                                                                        StandinSession]:
        """A whole call set-up: webhook, stream, connected + start, the OpenAI session."""
        call = await dial(self.bridge.session, str(self.bridge.make_url("")),
                          auth_token=self.settings.twilio_auth_token, caller=CALLER,
                          called=CALLED, marks=marks, parameters=start.get("parameters"))
        stream = call.stream
        self.streams.append(stream)
        session = await next_session(self.standin.app)
        await session.wait_for("session.update")
        # The session may have been opened at the webhook (pre-warmed): wait until the
        # stream's call has it and has started, as it had when it sent session.update itself.
        await wait_until(lambda: any(c.call_sid == call.call_sid and c.events.seq > 0
                                     for c in self.live_calls()), 5.0, "the call started")
        return stream, session

    async def place_live(self, marks: str = "immediate",
                         **start: Any) -> tuple[TwilioStream, LiveStandinSession, Line]:
        """`place` on a GPT-Live rig: the caller's line keeps sending frames from the start."""
        assert self.api == "live", "a GPT-Live rig: make_rig(model_api='live')"
        call = await dial(self.bridge.session, str(self.bridge.make_url("")),
                          auth_token=self.settings.twilio_auth_token, caller=CALLER,
                          called=CALLED, marks=marks, parameters=start.get("parameters"))
        stream = call.stream
        self.streams.append(stream)
        line = self.line(stream)
        session = await next_live_session(self.standin.app)
        await session.wait_for("session.start")
        return stream, session, line

    def line(self, stream: TwilioStream) -> Line:
        """The stream's line (started on first use)."""
        for line in self.lines:
            if line.stream is stream:
                return line
        line = Line(stream)
        self.lines.append(line)
        return line

    def live_calls(self) -> list[Call]:
        return list(self.app[REGISTRY].calls)


MakeRig = Callable[..., Awaitable[Rig]]


def setting_names() -> set[str]:
    """Every environment variable `Settings.from_env` reads (from its source: one place)."""
    source = (ROOT / "server" / "settings.py").read_text()
    return set(re.findall(r'r\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', source))


def subprocess_env(**extra: str) -> dict[str, str]:
    """A clean environment for `python -m server` in a test: nothing of the developer's
    (no .env is read either: the process runs in the test's own working directory)."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
            "PROMPTS_DIR": str(PROMPTS), "PRICES_FILE": str(ROOT / "config" / "prices.json"),
            "HOST": "127.0.0.1", **extra}


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory,
              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in an empty working directory of its own (a `.env`, `calls.db` or
    recordings there are the test's, never the repository's) and without any bridge setting
    from the developer's environment."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)


_TOOLING = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__"}


def _tree_files() -> set[Path]:
    """Every file in the checkout but version control's, the venv's and the caches'."""
    found: set[Path] = set()
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _TOOLING and not d.endswith(".egg-info")]
        found.update(Path(top, f).relative_to(ROOT) for f in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def _working_tree_untouched() -> Any:
    """No test, and nothing a test starts (a server, the bench, the demo), writes into the
    checkout: a run fails if a file appeared there."""
    before = _tree_files()
    yield
    new = sorted(map(str, _tree_files() - before))
    assert not new, f"the tests wrote into the working tree: {new}"


@pytest.fixture(scope="session", autouse=True)
def _warm_sdk_checker() -> None:
    """Build the SDK's validators once, before any test's loop is timing a handshake (the
    first build takes about a second, more on a loaded machine)."""
    assert problems("client", {"type": "response.create"}) == []


@pytest.fixture
async def make_rig(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> Any:
    rigs: list[Rig] = []

    async def make(standin: StandinOptions | LiveStandinOptions | None = None,
                   prepare: Callable[[web.Application], None] | None = None,
                   state: SharedState | None = None,
                   bus: EventBus | None = None,
                   **overrides: Any) -> Rig:
        """`prepare`, if given, may change the app before it starts (e.g. its features).
        `model_api="live"` (or LiveStandinOptions): the GPT-Live stand-in plays OpenAI."""
        live = overrides.get("model_api") == "live" or isinstance(standin, LiveStandinOptions)
        events = EventChecker("live" if live else "realtime")
        app_factory: Callable[[], web.Application]
        if live:
            options = standin if isinstance(standin, LiveStandinOptions) else LIVE_OPTIONS
            if options.check_events is None:
                options = replace(options, check_events=events)
            overrides.setdefault("model_api", "live")
            app_factory = lambda: create_live_standin_app(options)  # noqa: E731
        else:
            realtime = standin if isinstance(standin, StandinOptions) \
                else StandinOptions(api_key=API_KEY)
            if realtime.check_events is None:  # a test may pass its own hook to opt out
                realtime = replace(realtime, check_events=events)
            app_factory = lambda: create_standin_app(realtime)  # noqa: E731
        standin_server = await aiohttp_server(app_factory())
        base = str(standin_server.make_url("")).replace("http://", "ws://").rstrip("/")
        settings = Settings(
            openai_api_key=API_KEY,
            openai_realtime_url=base + "/v1/realtime",
            openai_live_url=base + "/v1/live/sessions",
            twilio_auth_token=AUTH_TOKEN,
            vad_silence_ms=100,
            openai_connect_timeout=5.0,
            stream_start_timeout=2.0,
            database_url=f"sqlite:///{tmp_path}/calls-{len(rigs)}.db",
            prompts_dir=PROMPTS,
            prices_file=ROOT / "config" / "prices.json",
            records_spool=tmp_path / f"records-spool-{len(rigs)}.jsonl",
            recordings_dir=tmp_path / "recordings",
        )
        settings = replace(settings, **overrides)
        app = create_app(settings, state=state, bus=bus)
        if prepare is not None:
            prepare(app)
        bridge = await aiohttp_client(app)
        rig = Rig(standin_server, bridge, settings, events=events)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        for line in rig.lines:
            await line.close()
        for stream in rig.streams:
            await stream.close()
    for rig in rigs:
        rig.events.assert_clean()  # names each event and key the SDK rejects


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    return await make_rig()


# The GPT-Live stand-in in tests: unpaced (its output follows the input, which the rig's lines
# send in real time), a caller turn over after 200 ms of quiet.
LIVE_OPTIONS = LiveStandinOptions(api_key=API_KEY, pace=0, silence_ms=200)


@pytest.fixture(params=["realtime", "live"])
def api(request: pytest.FixtureRequest) -> str:
    """Run the test once per model API."""
    return str(request.param)


async def speak(stream: TwilioStream, frames: int = 10, variant: int = 0,
                silence: int = 8) -> bytes:
    """Send one caller turn: speech frames, then enough silence to end the turn."""
    spoken = loud(variant)
    for _ in range(frames):
        await stream.send_media(spoken)
    for _ in range(silence):
        await stream.send_media(SILENCE)
    return spoken


def heard(stream: TwilioStream) -> bytes:
    """All audio the bridge sent to this stream, decoded from base64, in order."""
    import base64

    return b"".join(base64.b64decode(m["media"]["payload"])
                    for m in stream.received if m.get("event") == "media")



from tests.outbound_rig import make_line  # noqa: E402, F401  (fixture; it imports this module)
