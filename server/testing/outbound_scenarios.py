"""The demo's outbound scenarios: the bridge places calls through a fake Twilio REST API on
loopback (`server.testing.twilio_rest`), which plays Twilio and each callee: a person who says
"hello?", an answering machine with a greeting and a beep, a busy line.

- `outbound`: `POST /calls` to a person (greeted once AMD says human, with the call's variables)
  and to an answering machine (the voicemail message left after the beep, then hung up).
- `campaign`: a small campaign from JSON, two at a time, a busy number retried, a number on the
  do-not-call list skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from server.app import create_app
from server.testing import audio
from server.testing.scenarios import ADMIN_TOKEN, AUTH_TOKEN, Env, Outcome, keep_metrics, serving
from server.testing.simulator import CallResult
from server.testing.standin import StandinOptions, create_standin_app
from server.testing.twilio_rest import Callee, FakeCall, FakeTwilio, answering_machine, speech

PUBLIC = "https://bridge.example.com"  # what Twilio calls back: routed to the local bridge
FROM = "+15550001234"
PERSON, MACHINE = "+15550107001", "+15550107002"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _router(target: list[str]) -> Callable[[str], str]:
    def route(url: str) -> str:
        base = target[0]
        for public, local in ((PUBLIC, base), (PUBLIC.replace("https", "wss", 1),
                                               base.replace("http", "ws", 1))):
            if url.startswith(public):
                return local + url[len(public):]
        return url
    return route


def _heard_ms(call: FakeCall) -> int:
    import base64

    return sum(len(base64.b64decode(m["media"]["payload"])) for s in call.streams
               for m in s.received if m.get("event") == "media") // audio.BYTES_PER_MS


def _first_audio(call: FakeCall) -> float | None:
    for stream in call.streams:
        for message, at in zip(stream.received, stream.arrivals, strict=True):
            if message.get("event") == "media":
                return at
    return None


async def _post(env: Env, url: str, body: Mapping[str, Any]) -> tuple[int, Any]:
    async with env.http.post(url, json=dict(body), headers=AUTH) as resp:
        return resp.status, await resp.json()


async def _record(env: Env, base: str, sid: str, timeout: float = 15.0) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async with env.http.get(f"{base}/calls/{sid}", headers=AUTH) as resp:
            if resp.status == 200:
                record = await resp.json()
                if record.get("ended_at"):
                    return dict(record)
        await asyncio.sleep(0.1)
    return None


def _story(env: Env, fake: FakeTwilio, call: FakeCall, placed_at: float) -> None:
    """What Twilio saw of one call, in order, from the moment it was placed."""
    answered = call.answered_at
    for callback in fake.callbacks:
        if callback.form.get("CallSid") != call.sid:
            continue
        at = callback.at - placed_at
        if callback.kind == "status":
            env.say(f"{at:6.2f} s  status {callback.form.get('CallStatus')}")
        elif callback.kind == "amd":
            env.say(f"{at:6.2f} s  answering-machine detection: "
                    f"{callback.form.get('AnsweredBy')}")
        elif callback.kind == "twiml":
            env.say(f"{at:6.2f} s  Twilio fetched the TwiML (signed, with the plan's id)")
    first = _first_audio(call)
    if first is not None and answered is not None:
        env.say(f"         the callee first heard the assistant {first - answered:.2f} s after "
                f"answering ({_heard_ms(call)} ms of audio in all)")


async def outbound(env: Env) -> Outcome:
    """A person greeted once AMD says human; an answering machine gets the voicemail."""
    outcome = Outcome("outbound")
    fast = env.pace.say_ms < 500
    greeting_ms, beep_ms = (600, 200) if fast else (2500, 400)
    target: list[str] = []
    fake = FakeTwilio(auth_token=AUTH_TOKEN, marks="playback", route=_router(target))
    fake.callees[PERSON] = Callee("human", audio=speech(300 if fast else 800),
                                  amd_after_s=0.5 if fast else 1.5,
                                  hang_up_after_s=2.0 if fast else 5.0)
    fake.callees[MACHINE] = Callee("machine", audio=answering_machine(greeting_ms, beep_ms))
    standin = create_standin_app(StandinOptions(greeting_ms=env.pace.greeting_ms))
    async with serving(standin) as standin_base, serving(fake.app) as api:
        settings = env.settings(
            standin_base, public_url=PUBLIC, twilio_account_sid=fake.account_sid,
            twilio_api_url=api, twilio_from_number=FROM, outbound_cps=10.0,
            do_not_call=env.out_dir / "demo-do-not-call.txt")
        async with serving(create_app(settings)) as bridge:
            target.append(bridge)
            env.say(f"POST /calls to a person ({PERSON}) and to an answering machine "
                    f"({MACHINE}); Twilio is a fake at {api}")
            placed: dict[str, tuple[str, float]] = {}
            for to, body in ((PERSON, {"greeting": "Hi {{name}}, this is the clinic.",
                                       "variables": {"name": "Ann"}}),
                             (MACHINE, {"greeting": "Hi, this is the clinic.",
                                        "voicemail": "Hi, this is the clinic: please call "
                                                     "us back about your appointment."})):
                status, answer = await _post(env, f"{bridge}/calls", {"to": to, **body})
                outcome.expect(status == 201, f"POST /calls answered {status}: {answer}")
                if status == 201:
                    placed[to] = (answer["call_sid"], time.monotonic())
                    env.say(f"{to}: 201 {answer}")
            records: dict[str, dict[str, Any] | None] = {}
            for to, (sid, at) in placed.items():
                call = fake.calls[sid]
                await asyncio.wait_for(call.ended.wait(), 30.0)
                env.echo(f"  -- {to} ({'a person' if to == PERSON else 'a machine'})")
                _story(env, fake, call, at)
                records[to] = record = await _record(env, bridge, sid)
                if record is not None:
                    env.say(f"record: status {record['status']}, answered_by "
                            f"{record['answered_by']}, end_kind {record['end_kind']} "
                            f"({record['end_reason']})")
            await keep_metrics(env, bridge)
    person, machine = records.get(PERSON), records.get(MACHINE)
    outcome.result = CallResult(ok=bool(person and machine),
                                call_sid=placed.get(PERSON, ("", 0.0))[0])
    outcome.record = person
    outcome.expect(person is not None and person["answered_by"] == "human"
                   and person["status"] == "completed", f"the person's record: {person}")
    if PERSON in placed:
        call = fake.calls[placed[PERSON][0]]
        amd = next((c.at for c in fake.callbacks if c.kind == "amd"
                    and c.form.get("CallSid") == call.sid), None)
        first = _first_audio(call)
        outcome.expect(amd is not None and first is not None and first > amd,
                       "the person heard the assistant before AMD said human")
    outcome.expect(machine is not None and machine["end_kind"] == "voicemail",
                   f"the machine's record: {machine}")
    return outcome


async def campaign(env: Env) -> Outcome:
    """Six numbers, two at a time: four people, a busy line retried once, one on the
    do-not-call list."""
    outcome = Outcome("campaign")
    fast = env.pace.say_ms < 500
    target: list[str] = []
    fake = FakeTwilio(auth_token=AUTH_TOKEN, marks="playback", route=_router(target))
    numbers = [f"+155501080{n:02d}" for n in range(6)]
    busy, blocked = numbers[4], numbers[5]
    fake.default = Callee("human", audio=b"", amd_after_s=0.1 if fast else 0.3,
                          hang_up_after_s=0.5 if fast else 1.5)
    fake.callees[busy] = Callee("busy", ring_s=0.2)
    dnc = env.out_dir / "demo-do-not-call.txt"
    dnc.write_text(f"# numbers never to call\n{blocked}\n")
    standin = create_standin_app(StandinOptions(greeting_ms=env.pace.greeting_ms))
    async with serving(standin) as standin_base, serving(fake.app) as api:
        settings = env.settings(
            standin_base, public_url=PUBLIC, twilio_account_sid=fake.account_sid,
            twilio_api_url=api, twilio_from_number=FROM, outbound_cps=5.0, do_not_call=dnc)
        async with serving(create_app(settings)) as bridge:
            target.append(bridge)
            body = {"name": "appointment reminders", "concurrency": 2,
                    "retries": {"busy": 1}, "retry_after_s": 0.2 if fast else 1.0,
                    "greeting": "Hi {{name}}!",
                    "voicemail": "hangup",
                    "calls": [{"to": n, "variables": {"name": f"caller {i}"}}
                              for i, n in enumerate(numbers)]}
            status, created = await _post(env, f"{bridge}/campaigns", body)
            outcome.expect(status == 201, f"POST /campaigns answered {status}: {created}")
            env.say(f"POST /campaigns: {status} {created}")
            progress: dict[str, Any] = {}
            started = time.monotonic()
            shown = ""
            while status == 201 and time.monotonic() - started < 30:
                async with env.http.get(f"{bridge}/campaigns/{created['id']}",
                                        headers=AUTH) as resp:
                    progress = await resp.json()
                line = ", ".join(f"{k} {v}" for k, v in progress["states"].items() if v)
                if line != shown:
                    env.say(f"{time.monotonic() - started:5.1f} s  {progress['status']}: {line}")
                    shown = line
                if progress["status"] == "done":
                    break
                await asyncio.sleep(0.1)
            await keep_metrics(env, bridge)
    live = max_live(fake)
    env.say(f"outcomes {progress.get('outcomes')}; at most {live} calls at once; "
            f"{progress.get('attempts')} attempts for {len(numbers) - 1} numbers dialled")
    outcome.result = CallResult(ok=progress.get("status") == "done")
    outcome.expect(progress.get("outcomes") == {"completed": 4, "busy": 1, "do-not-call": 1},
                   f"outcomes {progress.get('outcomes')}")
    outcome.expect(live <= 2, f"{live} calls at once with concurrency 2")
    outcome.expect(blocked not in {c.to for c in fake.calls.values()},
                   "a number on the do-not-call list was dialled")
    return outcome


def max_live(fake: FakeTwilio) -> int:
    created = {c.sid: p.at for c, p in zip(fake.calls.values(), fake.creates(), strict=True)}
    edges = sorted([(created[c.sid], 1) for c in fake.calls.values()]
                   + [(c.ended_at or float("inf"), -1) for c in fake.calls.values()])
    live = most = 0
    for _, step in edges:
        live += step
        most = max(most, live)
    return most
