"""A fake Twilio REST API (2010-04-01) on loopback, that also plays Twilio's part of each call.

`FakeTwilio.app` serves `POST /2010-04-01/Accounts/{AccountSid}/Calls.json` (create),
`POST …/Calls/{Sid}.json` (hang up, cancel, redirect) and `GET …/Calls/{Sid}.json`. It checks
HTTP basic auth (account SID + auth token) and answers errors as Twilio does (JSON with `code`,
`message`, `more_info`, `status`). Every form post is kept in `posts`.

Then, per created call, it does what Twilio does, every request signed with
`X-Twilio-Signature`:
- status callbacks for the subscribed events (`initiated`, `ringing`, `answered`, and the final
  status: `completed`, or `busy` / `no-answer` / `failed` / `canceled`);
- on answer, it fetches `Url` (`Direction=outbound-api`) and runs the TwiML: a
  `<Connect><Stream>` opens a media stream (`TwilioStream`: `connected`, `start` with the
  `<Parameter>`s) on which the callee's audio is sent in real time; `<Say>` and `<Hangup>` are
  recorded; when the server closes the stream, the `<Connect action>` URL is asked what next;
- the asynchronous AMD callback (`AnsweredBy`, `MachineDetectionDuration`) when the call asked
  for machine detection;
- `Status=completed` on a live call: `stop` on the stream, the socket closed, then `completed`.

How each number behaves is a `Callee`: a person (a short "hello", then silence), an answering
machine (a long greeting, a beep, then silence while it records), busy, no answer, failed, a fax,
or a REST error. Run it alone: `python -m server.testing.twilio_rest --port 8099`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from server.testing import audio
from server.testing.dial import ACCOUNT_SID, TwilioStream
from server.testing.twiml import Twiml, parse_twiml
from server.wire.twilio import compute_signature

log = logging.getLogger("server.testing.twilio_rest")

API = "/2010-04-01/Accounts/{account}/Calls"
EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})
ANSWERS = ("human", "machine", "busy", "no-answer", "failed", "fax", "unknown")
ANSWERED_BY = ("human", "machine_start", "machine_end_beep", "machine_end_silence",
               "machine_end_other", "fax", "unknown")
SILENCE_FRAME = bytes([audio.ULAW_SILENCE]) * audio.FRAME_BYTES


@cache
def hello() -> bytes:
    """The shipped sample (≈3.5 s of speech) as mu-law."""
    path = Path(str(resources.files("server.testing") / "samples" / "hello.wav"))
    return audio.ulaw_encode(audio.read_wav(path))


def speech(ms: int) -> bytes:
    """`ms` of speech-like audio: the sample, repeated or cut."""
    sample = hello()
    want = ms * audio.BYTES_PER_MS
    return (sample * (want // len(sample) + 1))[:want]


def answering_machine(greeting_ms: int = 6000, beep_ms: int = 500) -> bytes:
    """An answering machine's side: a long spoken greeting, then the beep (1 kHz). After it,
    the fake sends silence: the machine is recording."""
    return speech(greeting_ms) + audio.tone(beep_ms, 1000.0, 12000)


@dataclass(frozen=True)
class Callee:
    """What the dialled number does.

    `answer`: human | machine | busy | no-answer | failed | fax | unknown.
    `audio`: what it says once answered (default: human 800 ms of speech; machine the greeting
    and beep of `answering_machine()`; others nothing); silence follows.
    `answered_by`: the AMD result (default from `answer`: human, machine_end_beep, fax, unknown).
    `amd_after_s`: seconds after the answer the AMD result is sent (default: the end of `audio`,
    plus 0.2 s: DetectMessageEnd waits for the beep).
    `hang_up_after_s`: the callee hangs up this long after answering (None: it waits for the
    server to end the call).
    `rest_error`: the create request itself fails: (HTTP status, Twilio code, message)."""

    answer: str = "human"
    ring_s: float = 0.0
    audio: bytes | None = None
    answered_by: str | None = None
    amd_after_s: float | None = None
    hang_up_after_s: float | None = None
    rest_error: tuple[int, int, str] | None = None

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {', '.join(ANSWERS)}")
        if self.answered_by is not None and self.answered_by not in ANSWERED_BY:
            raise ValueError(f"answered_by must be one of {', '.join(ANSWERED_BY)}")

    def spoken(self) -> bytes:
        if self.audio is not None:
            return self.audio
        if self.answer == "human":
            return speech(800)
        if self.answer == "machine":
            return answering_machine()
        return b""

    def amd_result(self) -> str:
        if self.answered_by:
            return self.answered_by
        return {"human": "human", "machine": "machine_end_beep", "fax": "fax"}.get(
            self.answer, "unknown")


PERSON = Callee("human")
MACHINE = Callee("machine")


@dataclass
class Post:
    """One form POST to the REST API, as received."""

    path: str
    form: MultiDictProxy[str]
    user: str | None  # the basic-auth user name (the account SID), None without auth
    authorized: bool
    at: float  # time.monotonic() on arrival


@dataclass
class Callback:
    """One request the fake made to the application: a status or AMD callback, a TwiML fetch."""

    kind: str  # "status", "amd", "twiml", "action"
    url: str
    form: dict[str, str]
    status: int | None  # the answer's HTTP status (None: no answer)
    at: float


@dataclass
class FakeCall:
    sid: str
    to: str
    from_: str
    url: str | None
    twiml: str | None
    status_callback: str | None
    events: frozenset[str]
    amd_callback: str | None
    machine_detection: str | None
    timeout: int
    callee: Callee
    status: str = "queued"
    answered_by: str | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    hung_up_by: str | None = None  # "callee", "api" (Status=completed), "server" (TwiML)
    streams: list[TwilioStream] = field(default_factory=list)
    twimls: list[Twiml] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    _hangup: asyncio.Event = field(default_factory=asyncio.Event)
    _redirect: list[str] = field(default_factory=list)  # new TwiML, for a redirect
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def to_dict(self, account_sid: str) -> dict[str, Any]:
        return {"sid": self.sid, "account_sid": account_sid, "to": self.to, "from": self.from_,
                "status": self.status, "direction": "outbound-api",
                "answered_by": self.answered_by, "api_version": "2010-04-01",
                "uri": f"{API.format(account=account_sid)}/{self.sid}.json"}


class FakeTwilio:
    """The fake. Serve `app` (aiohttp_server in tests, or `start()`); script numbers with
    `callees[number] = Callee(...)` (others get `default`)."""

    def __init__(self, *, auth_token: str, account_sid: str = ACCOUNT_SID,
                 default: Callee = PERSON, marks: str = "immediate",
                 route: Callable[[str], str] | None = None) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.default = default
        self.callees: dict[str, Callee] = {}
        self.posts: list[Post] = []
        self.calls: dict[str, FakeCall] = {}
        self.callbacks: list[Callback] = []
        self._marks = marks
        self._route = route
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.cleanup_ctx.append(self._lifetime)
        calls = API.format(account="{account}")
        self.app.router.add_post(f"{calls}.json", self._create)
        self.app.router.add_post(calls + "/{sid}.json", self._update)
        self.app.router.add_get(calls + "/{sid}.json", self._fetch)

    # --- running alone ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on `host:port` (0: a free port); the base URL (TWILIO_API_URL)."""
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0][1]
        return f"http://{host}:{bound}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _lifetime(self, _app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as http:
            self._http = http
            try:
                yield
            finally:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for call in self.calls.values():
                    for stream in call.streams:
                        await stream.close()
                self._http = None

    # --- what tests look at ---

    def creates(self) -> list[Post]:
        return [p for p in self.posts if p.path.endswith("/Calls.json")]

    def call_to(self, number: str) -> FakeCall:
        """The latest call placed to `number`."""
        found = [c for c in self.calls.values() if c.to == number]
        if not found:
            raise KeyError(f"no call to {number}")
        return found[-1]

    def live(self) -> list[FakeCall]:
        return [c for c in self.calls.values() if not c.ended.is_set()]

    # --- the REST API ---

    def _auth(self, request: web.Request) -> tuple[str | None, bool]:
        """(the basic-auth user name, whether the credentials are this account's)."""
        kind, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None, False
        user, sep, password = decoded.partition(":")
        if kind.lower() != "basic" or not sep:
            return None, False
        return user, user == self.account_sid and password == self.auth_token

    async def _checked(self, request: web.Request) -> MultiDictProxy[str] | web.Response:
        form = await request.post()
        text: MultiDict[str] = MultiDict((k, v) for k, v in form.items() if isinstance(v, str))
        user, ok = self._auth(request)
        self.posts.append(Post(request.path, MultiDictProxy(text), user, ok, time.monotonic()))
        if not ok:
            return _error(401, 20003, "Authenticate")
        if request.match_info["account"] != self.account_sid:
            return _error(404, 20404, "The requested resource was not found")
        return MultiDictProxy(text)

    async def _create(self, request: web.Request) -> web.Response:
        form = await self._checked(request)
        if isinstance(form, web.Response):
            return form
        to, from_ = form.get("To", ""), form.get("From", "")
        if not to:
            return _error(400, 21201, "No 'To' number is specified")
        if not from_:
            return _error(400, 21213, "No 'From' number is specified")
        if not form.get("Url") and not form.get("Twiml"):
            return _error(400, 21205, "Url parameter is required")
        if not to.startswith("+") or not to[1:].isdigit():
            return _error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        events = frozenset(e for v in form.getall("StatusCallbackEvent", [])
                           for e in v.split())
        if events - EVENTS:
            return _error(400, 21626, "Invalid 'StatusCallbackEvent'")
        callee = self.callees.get(to, self.default)
        if callee.rest_error is not None:
            status, code, message = callee.rest_error
            return _error(status, code, message)
        try:
            timeout = int(form.get("Timeout", "60"))
        except ValueError:
            return _error(400, 21207, "Timeout must be an integer")
        amd = form.get("MachineDetection")
        call = FakeCall(
            sid="CA" + uuid4().hex, to=to, from_=from_, url=form.get("Url"),
            twiml=form.get("Twiml"), status_callback=form.get("StatusCallback"),
            events=events or frozenset({"completed"}),
            amd_callback=form.get("AsyncAmdStatusCallback")
            if amd and form.get("AsyncAmd") == "true" else None,
            machine_detection=amd, timeout=timeout, callee=callee)
        self.calls[call.sid] = call
        self._spawn(self._life(call), f"fake-twilio-{call.sid}")
        return web.json_response(call.to_dict(self.account_sid), status=201)

    async def _update(self, request: web.Request) -> web.Response:
        form = await self._checked(request)
        if isinstance(form, web.Response):
            return form
        call = self.calls.get(request.match_info["sid"])
        if call is None:
            return _error(404, 20404, "The requested resource was not found")
        status = form.get("Status")
        if status in ("completed", "canceled"):
            if call.status in ("queued", "initiated", "ringing"):
                call.hung_up_by = "api"
                call._hangup.set()
            elif call.status == "in-progress" and status == "completed":
                call.hung_up_by = call.hung_up_by or "api"
                call._hangup.set()
            return web.json_response(call.to_dict(self.account_sid))
        if form.get("Twiml") or form.get("Url"):
            if call.status != "in-progress":
                return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
            call._redirect.append(form.get("Twiml") or f"url:{form.get('Url')}")
            call._hangup.set()
            return web.json_response(call.to_dict(self.account_sid))
        return _error(400, 21218, "Invalid update: give Status, Twiml or Url")

    async def _fetch(self, request: web.Request) -> web.Response:
        _, ok = self._auth(request)
        if not ok:
            return _error(401, 20003, "Authenticate")
        call = self.calls.get(request.match_info["sid"])
        if call is None:
            return _error(404, 20404, "The requested resource was not found")
        return web.json_response(call.to_dict(self.account_sid))

    # --- Twilio's side of the call ---

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _life(self, call: FakeCall) -> None:
        try:
            await self._ring(call)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the fake must show, not hang the test
            call.errors.append(f"fake Twilio failed: {type(e).__name__}: {e}")
            log.exception("fake Twilio: call %s failed", call.sid)
            await self._end(call, "failed")

    async def _ring(self, call: FakeCall) -> None:
        callee = call.callee
        call.status = "initiated"
        await self._status(call, "initiated", "initiated")
        call.status = "ringing"
        await self._status(call, "ringing", "ringing")
        ring = min(callee.ring_s, call.timeout) if callee.answer == "no-answer" else callee.ring_s
        if await self._wait_hangup(call, ring):
            await self._end(call, "canceled")
            return
        if callee.answer in ("busy", "no-answer", "failed"):
            await self._end(call, callee.answer)
            return
        call.status = "in-progress"
        call.answered_at = time.monotonic()
        call.answered.set()
        await self._status(call, "answered", "in-progress")
        if call.amd_callback:
            self._spawn(self._amd(call), f"fake-twilio-amd-{call.sid}")
        if callee.hang_up_after_s is not None:
            self._spawn(self._callee_hangs_up(call, callee.hang_up_after_s),
                        f"fake-twilio-hangup-{call.sid}")
        twiml = await self._first_twiml(call)
        while twiml is not None and call.status == "in-progress":
            twiml = await self._run_twiml(call, twiml)
        await self._end(call, "completed")

    async def _first_twiml(self, call: FakeCall) -> Twiml | None:
        if call.twiml:
            return self._parse(call, call.twiml)
        assert call.url is not None
        return await self._fetch_twiml(call, call.url, "twiml")

    async def _run_twiml(self, call: FakeCall, twiml: Twiml) -> Twiml | None:
        """Run one TwiML document; the next one to run (an action's or a redirect's answer),
        or None when the call is over."""
        call.twimls.append(twiml)
        call.said.extend(s for s in twiml.says if s)
        if twiml.stream_url is None:
            if not twiml.hangs_up and not twiml.says and not twiml.dials:
                call.errors.append(f"TwiML does nothing: verbs {twiml.verbs}")
            if twiml.hangs_up:
                call.hung_up_by = call.hung_up_by or "server"
            return None
        url = self._route(twiml.stream_url) if self._route else twiml.stream_url
        assert self._http is not None
        try:
            stream = await TwilioStream.connect(self._http, url, marks=self._marks)
        except (aiohttp.ClientError, OSError) as e:
            call.errors.append(f"stream connect failed: {type(e).__name__}: {e}")
            return None
        call.streams.append(stream)
        await stream.send_connected()
        await stream.send_start(call.sid, "MZ" + uuid4().hex, twiml.parameters,
                                account_sid=self.account_sid)
        speaking = asyncio.get_running_loop().create_task(self._speak(call, stream))
        hangup = asyncio.get_running_loop().create_task(call._hangup.wait())
        closed = asyncio.get_running_loop().create_task(stream.closed.wait())
        try:
            await asyncio.wait({hangup, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (speaking, hangup, closed):
                task.cancel()
            await asyncio.gather(speaking, hangup, closed, return_exceptions=True)
        if not stream.closed.is_set():  # we end it: Twilio sends `stop`, then closes
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await stream.send_stop()
            await stream.close()
            if call._redirect:
                call._hangup.clear()
                redirect = call._redirect.pop(0)
                if redirect.startswith("url:"):
                    return await self._fetch_twiml(call, redirect[4:], "twiml")
                return self._parse(call, redirect)
            return None
        # The server closed the stream: ask <Connect action> what next, as Twilio does.
        if twiml.action is None:
            call.hung_up_by = call.hung_up_by or "server"
            return None
        return await self._fetch_twiml(call, twiml.action, "action")

    async def _speak(self, call: FakeCall, stream: TwilioStream) -> None:
        """The callee's audio in real time (a 20 ms frame every 20 ms), then silence."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        frames = itertools.chain(audio.frames(call.callee.spoken()),
                                 itertools.repeat(SILENCE_FRAME))
        for n, frame in enumerate(frames):
            await asyncio.sleep(max(start + n * audio.FRAME_MS / 1000 - loop.time(), 0))
            if stream.closed.is_set():
                return
            try:
                await stream.send_media(frame)
            except (ConnectionError, aiohttp.ClientError):
                return

    async def _amd(self, call: FakeCall) -> None:
        callee = call.callee
        spoken_s = len(callee.spoken()) / audio.RATE
        after = callee.amd_after_s if callee.amd_after_s is not None else spoken_s + 0.2
        if await self._wait_hangup(call, after) or call.ended.is_set():
            return
        call.answered_by = callee.amd_result()
        assert call.amd_callback is not None
        await self._post(call, "amd", call.amd_callback, {
            "CallSid": call.sid, "AccountSid": self.account_sid,
            "AnsweredBy": call.answered_by,
            "MachineDetectionDuration": str(round(after * 1000))})

    async def _callee_hangs_up(self, call: FakeCall, after: float) -> None:
        if not await self._wait_hangup(call, after):
            call.hung_up_by = call.hung_up_by or "callee"
            call._hangup.set()

    async def _wait_hangup(self, call: FakeCall, seconds: float) -> bool:
        """Wait `seconds` unless a hang-up comes first; True if it did."""
        if call._hangup.is_set():
            return True
        if seconds <= 0:
            return False
        try:
            await asyncio.wait_for(call._hangup.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _end(self, call: FakeCall, status: str) -> None:
        if call.ended.is_set():
            return
        call.status = status
        call.ended_at = time.monotonic()
        duration = round(call.ended_at - call.answered_at) if call.answered_at else 0
        await self._status(call, "completed", status, CallDuration=str(duration))
        call.ended.set()

    async def _status(self, call: FakeCall, event: str, status: str, **extra: str) -> None:
        if event not in call.events or not call.status_callback:
            return
        await self._post(call, "status", call.status_callback, {
            "CallSid": call.sid, "AccountSid": self.account_sid, "From": call.from_,
            "To": call.to, "CallStatus": status, "Direction": "outbound-api",
            "ApiVersion": "2010-04-01", "CallbackSource": "call-progress-events",
            "SequenceNumber": str(next(call._seq)), "Timestamp": formatdate(usegmt=True),
            **extra})

    def _form(self, call: FakeCall, status: str) -> dict[str, str]:
        return {"CallSid": call.sid, "AccountSid": self.account_sid, "From": call.from_,
                "To": call.to, "CallStatus": status, "Direction": "outbound-api",
                "ApiVersion": "2010-04-01"}

    async def _fetch_twiml(self, call: FakeCall, url: str, kind: str) -> Twiml | None:
        body = await self._post(call, kind, url, self._form(call, call.status))
        return None if body is None else self._parse(call, body)

    def _parse(self, call: FakeCall, body: str) -> Twiml | None:
        try:
            return parse_twiml(body)
        except ValueError as e:
            call.errors.append(f"bad TwiML: {e}")
            return None

    async def _post(self, call: FakeCall, kind: str, url: str,
                    form: Mapping[str, str]) -> str | None:
        """A signed POST to the application; its body on 200, None otherwise (recorded)."""
        assert self._http is not None
        headers = {"X-Twilio-Signature": compute_signature(self.auth_token, url, form)}
        target = self._route(url) if self._route else url
        status: int | None = None
        body: str | None = None
        try:
            async with self._http.post(target, data=dict(form), headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=15)) as resp:
                status = resp.status
                text = await resp.text()
                body = text if status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            call.errors.append(f"{kind} {url}: {type(e).__name__}")
        self.callbacks.append(Callback(kind, url, dict(form), status, time.monotonic()))
        if status is not None and status >= 300:
            call.errors.append(f"{kind} {url}: HTTP {status}")
        return body


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message,
                              "more_info": f"https://www.twilio.com/docs/errors/{code}",
                              "status": status}, status=status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--auth-token", default="fake-auth-token")
    parser.add_argument("--account-sid", default=ACCOUNT_SID)
    args = parser.parse_args(argv)
    fake = FakeTwilio(auth_token=args.auth_token, account_sid=args.account_sid)
    print(f"fake Twilio REST API on http://127.0.0.1:{args.port} (account {args.account_sid})")
    web.run_app(fake.app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
