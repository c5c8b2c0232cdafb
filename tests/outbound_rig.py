"""Outbound calls end to end on loopback: the fake Twilio REST API plays Twilio (it fetches the
signed TwiML, opens the media stream, sends status and AMD callbacks), one or more bridges
behind one public URL (a load balancer picks an instance per request), the Realtime stand-in as
OpenAI."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis import Redis as SyncRedis

from server.testing.dial import ACCOUNT_SID
from server.testing.inbox import wait_until
from server.testing.standin import StandinOptions
from server.testing.twilio_rest import FakeCall, FakeTwilio
from tests.conftest import API_KEY, AUTH_TOKEN, MakeRig, Rig
from tests.redis_server import RedisServer

PUBLIC = "https://bridge.example"
ADMIN = "admin-token-0123456789"
FROM = "+15550009999"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = "Call {{name}} about their appointment on {{day}}. Be brief and friendly.\n"


@dataclass
class Line:
    fake: FakeTwilio
    api: TestServer
    rigs: list[Rig] = field(default_factory=list)
    down: set[int] = field(default_factory=set)  # instances the load balancer skips
    # another instance like the first (a deploy's new one): its own state, same database
    another: Callable[[], Awaitable[Rig]] | None = None
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def rig(self) -> Rig:
        return self.rigs[0]

    def pick(self) -> Rig:
        """The load balancer: round robin over the instances that are up."""
        up = [r for i, r in enumerate(self.rigs) if i not in self.down]
        return up[next(self._turn) % len(up)]

    def route(self, url: str) -> str:
        """Where a request Twilio makes to the public URL actually goes."""
        base = str(self.pick().bridge.make_url("")).rstrip("/")
        for public, local in ((PUBLIC, base), (PUBLIC.replace("https", "wss", 1),
                                               base.replace("http", "ws", 1))):
            if url.startswith(public):
                return local + url[len(public):]
        return url

    async def post(self, path: str, body: Any = None, rig: Rig | None = None,
                   headers: Mapping[str, str] = AUTH) -> tuple[int, Any]:
        rig = rig or self.rig
        resp = await rig.bridge.post(path, json=body, headers=dict(headers))
        return resp.status, await resp.json()

    async def get(self, path: str, rig: Rig | None = None) -> tuple[int, Any]:
        resp = await (rig or self.rig).bridge.get(path, headers=AUTH)
        return resp.status, await resp.json()

    async def place(self, rig: Rig | None = None, **body: Any) -> str:
        status, answer = await self.post("/calls", body, rig)
        assert status == 201, answer
        assert answer["status"] == "queued"
        return str(answer["call_sid"])

    async def ended(self, sid: str, timeout: float = 15.0) -> FakeCall:
        call = self.fake.calls[sid]
        await asyncio.wait_for(call.ended.wait(), timeout)
        return call

    async def record(self, sid: str, ready: Callable[[dict[str, Any]], bool] | None = None,
                     rig: Rig | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The stored record once it is final (and `ready`)."""
        found: dict[str, Any] = {}

        async def stored() -> bool:
            resp = await (rig or self.rig).bridge.get(f"/calls/{sid}", headers=AUTH)
            if resp.status != 200:
                return False
            found.clear()
            found.update(await resp.json())
            return bool(found.get("ended_at")) and (ready is None or ready(found))

        await wait_until(stored, timeout, f"the final record of {sid}", interval=0.05)
        return found


MakeLine = Callable[..., Awaitable[Line]]


def prompts(tmp: Path) -> Path:
    """A prompts folder with the default prompt and `reminders` (it needs {{name}}, {{day}})."""
    root = tmp / "prompts"
    (root / "default").mkdir(parents=True, exist_ok=True)
    (root / "default" / "1.md").write_text("You are a helpful phone assistant.\n")
    (root / "reminders").mkdir(exist_ok=True)
    (root / "reminders" / "1.md").write_text(PROMPT)
    return root


_DATABASES = itertools.count(0)


def redis_db(request: pytest.FixtureRequest) -> str:
    """A REDIS_URL with a database of this test's own, emptied (the bridge has no key prefix
    setting: a fleet's instances share the default prefix inside it). Skips without Redis."""
    server: RedisServer = request.getfixturevalue("redis_server")
    db = 15 - next(_DATABASES) % 8  # test_fleet counts up from 1
    url = f"redis://127.0.0.1:{server.port}/{db}"
    client = SyncRedis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
async def make_line(make_rig: MakeRig, aiohttp_server: Callable[..., Awaitable[TestServer]],
                    tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[MakeLine]:
    lines: list[Line] = []

    async def make(instances: int = 1, standin: StandinOptions | None = None,
                   marks: str = "playback",
                   prepare: Callable[[web.Application], None] | None = None,
                   fleet: bool | None = None, **overrides: Any) -> Line:
        """`instances` bridges behind PUBLIC; with more than one they share Redis (a database
        of the test's own) and one records database. `marks`: how the fake's streams
        echo marks ("playback": once their audio has played, in real time, as Twilio does).
        `fleet`: Redis and one database even for one instance (`another()` joins it).
        `overrides`: Settings fields."""
        lb: list[Line] = []  # the load balancer in front of the bridges, once they exist
        fake = FakeTwilio(auth_token=AUTH_TOKEN, marks=marks,
                          route=lambda url: lb[0].route(url))
        api = await aiohttp_server(fake.app)
        line = Line(fake, api)
        lb.append(line)
        settings: dict[str, Any] = {
            "public_url": PUBLIC, "twilio_account_sid": ACCOUNT_SID,
            "twilio_api_url": str(api.make_url("")).rstrip("/"),
            "twilio_from_number": FROM, "admin_token": ADMIN, "outbound_cps": 200.0,
            "amd_wait_s": 4.0, "do_not_call": tmp_path / "do-not-call.txt",
            "prompts_dir": prompts(tmp_path),
        }
        if instances > 1 if fleet is None else fleet:
            # a fleet: Redis (control actions, capacity, pacing, decisions), one database
            settings["redis_url"] = redis_db(request)
            settings["database_url"] = f"sqlite:///{tmp_path}/fleet.db"
        settings.update(overrides)
        for _ in range(instances):
            line.rigs.append(await make_rig(standin or StandinOptions(api_key=API_KEY),
                                            prepare=prepare, **settings))

        async def another() -> Rig:
            rig = await make_rig(standin or StandinOptions(api_key=API_KEY), prepare=prepare,
                                 **{**settings, "database_url": line.rig.settings.database_url})
            line.rigs.append(rig)
            return rig

        line.another = another
        lines.append(line)
        return line

    yield make
    for line in lines:
        for call in line.fake.calls.values():
            for stream in call.streams:
                await stream.close()
