"""Records through real calls: the bridge, the stand-in (with transcripts and usage) and a Twilio
stream over loopback leave a stored record with both sides' turns, latency, usage, cost and a
recording, served over the API and the CLI, still there after a restart; metrics move."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.call.record import CallRecord
from server.records import cli
from server.testing.standin import StandinOptions
from tests.conftest import API_KEY, CALLED, CALLER, MakeRig, Rig, speak
from tests.test_metrics import value

ADMIN = "admin-token-for-e2e-0123"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def final_record(rig: Rig, call_sid: str) -> dict[str, Any]:
    """Wait until the call's final record is stored, as an operator would read it."""
    async with asyncio.timeout(10):
        while True:
            resp = await rig.bridge.get(f"/calls/{call_sid}", headers=AUTH)
            if resp.status == 200:
                record: dict[str, Any] = await resp.json()
                if record["ended_at"]:
                    return record
            await asyncio.sleep(0.02)


async def hang_up(rig: Rig) -> str:
    (call,) = rig.live_calls()
    stream = rig.streams[-1]
    await stream.send_stop()
    await asyncio.wait_for(call.finished.wait(), 5)
    return call.call_sid


async def live_until(rig: Rig, predicate: Callable[[CallRecord], bool]) -> CallRecord:
    """Wait until the live call's record shows what the test waits for."""
    (call,) = rig.live_calls()
    async with asyncio.timeout(10):
        while not predicate(call.record):
            await asyncio.sleep(0.01)
    return call.record


def kinds(record: CallRecord) -> list[str]:
    return [e["kind"] for e in record.timeline]


async def test_a_call_leaves_a_full_record(make_rig: MakeRig, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path}/e2e.db"
    rig = await make_rig(admin_token=ADMIN, record_calls=True, database_url=db)
    stream, _ = await rig.place()
    await speak(stream, frames=25)  # 500 ms of speech, then silence: one turn
    await live_until(rig, lambda r: "caller" in kinds(r) and "assistant" in kinds(r)
                     and r.usage.get("input_tokens", 0) > 0)
    for m in [m for m in stream.received if m["event"] == "mark"]:
        await stream.send_mark(m["mark"]["name"])  # the reply has played
    call_sid = await hang_up(rig)

    record = await final_record(rig, call_sid)
    assert record["from"] == CALLER and record["to"] == CALLED
    assert record["end_kind"] == "caller_hung_up" and record["end_reason"]
    assert record["started_at"].endswith("Z") and record["ended_at"].endswith("Z")
    turns = [(e["kind"], e["text"]) for e in record["timeline"]
             if e["kind"] in ("caller", "assistant")]
    assert ("caller", "caller turn 1 (500 ms)") in turns
    assert ("assistant", "echo of 500 ms") in turns
    assert turns.index(("caller", "caller turn 1 (500 ms)")) < turns.index(
        ("assistant", "echo of 500 ms"))
    assert len(record["latencies_ms"]) == 1 and 0 <= record["latencies_ms"][0] < 5000
    assert record["usage"]["input_tokens"] >= 140
    assert record["usage"]["input_token_details"]["cached_tokens_details"]["audio_tokens"] >= 16
    assert record["cost_usd"] > 0
    assert record["frames_in"] >= 33 and record["frames_out"] >= 1

    # The recording: caller left, the echo right, as heard.
    async with asyncio.timeout(5):
        while (resp := await rig.bridge.get(f"/calls/{call_sid}/recording.wav",
                                            headers=AUTH)).status != 200:
            await asyncio.sleep(0.02)
    path = Path(record["recording"])
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (2, 8000)
        assert wav.getnframes() >= 33 * 160
    assert (await resp.read())[:4] == b"RIFF"

    text = await (await rig.bridge.get(f"/calls/{call_sid}",
                                       headers={**AUTH, "Accept": "text/plain"})).text()
    assert "Caller: caller turn 1 (500 ms)" in text and "Assistant: echo of 500 ms" in text

    metrics = await (await rig.bridge.get("/metrics")).text()
    assert value(metrics, "bridge_calls_total", end="caller_hung_up", direction="inbound") == 1
    assert value(metrics, "bridge_calls_active") == 0
    assert value(metrics, "bridge_frames_total", direction="in") == record["frames_in"]
    assert value(metrics, "bridge_response_latency_seconds_count") == 1
    assert value(metrics, "bridge_call_setup_seconds_count") == 1

    # After a restart (a new app on the same database) the record is still there.
    again = await make_rig(admin_token=ADMIN, database_url=db)
    listing = await (await again.bridge.get("/calls", headers=AUTH)).json()
    assert [c["call_sid"] for c in listing["calls"]] == [call_sid]
    # And the CLI reads it straight from the database.
    monkeypatch.setenv("DATABASE_URL", db)
    monkeypatch.chdir(tmp_path)
    assert await asyncio.to_thread(cli.main, [call_sid]) == 0
    assert "Assistant: echo of 500 ms" in capsys.readouterr().out


async def test_a_barge_in_is_in_the_record(make_rig: MakeRig) -> None:
    rig = await make_rig(StandinOptions(api_key=API_KEY, pace=1.0, chunk_ms=20),
                         admin_token=ADMIN)
    stream, session = await rig.place()
    await speak(stream, frames=40)
    await stream.wait_for("mark", count=3)
    await stream.send_mark(
        [m["mark"]["name"] for m in stream.received if m["event"] == "mark"][1])
    await speak(stream, frames=5, variant=3, silence=0)  # the caller talks over the reply
    await stream.wait_for("clear")
    await session.wait_for("conversation.item.truncate")
    await live_until(rig, lambda r: any(e.get("interrupted") for e in r.timeline))
    call_sid = await hang_up(rig)
    record = await final_record(rig, call_sid)
    assert record["barge_ins"] == 1
    (cut,) = [e for e in record["timeline"] if e.get("interrupted")]
    assert cut["kind"] == "assistant" and cut["heard_ms"] == 240
    metrics = await (await rig.bridge.get("/metrics")).text()
    assert value(metrics, "bridge_barge_ins_total") == 1


async def test_records_api_refuses_bad_tokens_on_the_real_app(make_rig: MakeRig) -> None:
    rig = await make_rig(admin_token=ADMIN, metrics_token="metrics-token-e2e")
    for path in ("/calls", "/calls/CAx", "/calls/CAx/recording.wav", "/metrics"):
        assert (await rig.bridge.get(path)).status == 401
        assert (await rig.bridge.get(path, headers={"Authorization": "Bearer x"})).status == 401
    assert (await rig.bridge.get("/calls", headers=AUTH)).status == 200
    assert (await rig.bridge.get("/metrics", headers={
        "Authorization": "Bearer metrics-token-e2e"})).status == 200
    assert (await rig.bridge.get("/readyz")).status == 200
    assert (await rig.bridge.get("/healthz")).status == 200


async def test_database_url_off_keeps_nothing(make_rig: MakeRig, tmp_path: Path) -> None:
    rig = await make_rig(database_url="off", admin_token="admin-token-123")
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    await stream.send_stop()
    await asyncio.wait_for(call.finished.wait(), 10)
    resp = await rig.bridge.get(f"/calls/{call.call_sid}",
                                headers={"Authorization": "Bearer admin-token-123"})
    assert resp.status == 404
    assert list(tmp_path.glob("*.db")) == []
