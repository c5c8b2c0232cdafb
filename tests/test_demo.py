"""`make demo` in-process, at the fast pace: every scenario does what it should, the first call's
record and transcript are read back and the metrics summed; a scenario that goes wrong fails
the demo."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from server.records.store import CallQuery, SQLiteStore
from server.testing.demo import run_console, run_demo, sum_metrics, verdict
from server.testing.inbox import wait_until
from server.testing.scenarios import ADMIN_TOKEN, SALES, SCENARIOS, Env, Outcome
from server.testing.simulator import CallResult
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def _from_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` runs from the repository root (its config/ holds the prompt and the price
    table); everything it writes goes to the test's own out directory."""
    monkeypatch.chdir(ROOT)


async def test_greeting_tool_and_end_call(tmp_path: Path) -> None:
    lines: list[str] = []
    demo = await run_demo(tmp_path, ["tools"], fast=True, echo=lines.append)
    [outcome] = demo.outcomes
    assert outcome.ok, (outcome.problems, "\n".join(lines))
    result = outcome.result
    assert result is not None
    assert result.greeting_ms is not None
    assert len(result.latencies_ms) == 2
    assert (result.hung_up_by, result.next_action) == ("bridge", "hangup")
    assert any(line.endswith("Twilio hangs up") for line in lines)
    assert any(line.startswith('  * tool call lookup_order({"order_id":"1234"}) -> ok')
               for line in lines)
    # Read back by a fresh bridge: the record, its transcript; the metrics moved.
    assert demo.record is not None and demo.record["end_kind"] == "assistant_ended"
    assert demo.record["call_sid"] == result.call_sid
    assert demo.record["cost_usd"] is not None and demo.record["usage"]["input_tokens"] > 0
    tool = next(e for e in demo.record["timeline"] if e["kind"] == "tool")
    assert tool["result"]["status"] == "shipped"
    assert "Tool lookup_order" in demo.transcript and "Caller: caller turn 1" in demo.transcript
    assert 'bridge_calls_total{direction="inbound",end="assistant_ended"} 1' in demo.metrics
    assert 'bridge_tool_calls_total{outcome="ok",tool="lookup_order"} 1' in demo.metrics
    assert (tmp_path / "demo-calls.db").exists()
    assert verdict(demo) == ("demo OK", 0)


async def test_transfer(tmp_path: Path) -> None:
    demo = await run_demo(tmp_path, ["transfer"], fast=True, echo=lambda _: None)
    [outcome] = demo.outcomes
    assert outcome.ok, outcome.problems
    assert outcome.result is not None
    assert (outcome.result.next_action, outcome.result.dialled) == ("dial", SALES)
    assert outcome.record is not None
    assert outcome.record["end_reason"] == "transferred to sales"


async def test_barge_in(tmp_path: Path) -> None:
    demo = await run_demo(tmp_path, ["barge-in"], fast=True, echo=lambda _: None)
    [outcome] = demo.outcomes
    assert outcome.ok, outcome.problems
    assert outcome.result is not None and outcome.result.clears >= 1
    assert outcome.record is not None and outcome.record["barge_ins"] >= 1
    assert (tmp_path / "caller-heard.wav").stat().st_size > 44


async def test_model_drop(tmp_path: Path) -> None:
    demo = await run_demo(tmp_path, ["model-drop"], fast=True, echo=lambda _: None)
    [outcome] = demo.outcomes
    assert outcome.ok, outcome.problems
    assert outcome.result is not None and len(outcome.result.latencies_ms) == 2
    assert outcome.record is not None
    first, second = outcome.record["sessions"]
    assert "1011" in first["ended_because"] and second["gap_ms"] >= 0


async def test_handover(tmp_path: Path) -> None:
    lines: list[str] = []
    demo = await run_demo(tmp_path, ["handover"], fast=True, echo=lines.append)
    [outcome] = demo.outcomes
    assert outcome.ok, (outcome.problems, "\n".join(lines))
    result = outcome.result
    assert result is not None
    assert (result.streams, result.actions, len(result.latencies_ms)) == (2, ["stream"], 2)
    assert result.handover_gap_ms is not None
    assert any(line.startswith("  * handover gap: ") for line in lines)
    assert outcome.record is not None and outcome.record["end_kind"] == "caller_hung_up"
    # Both instances' metrics are summed: the call ended once on each.
    assert 'bridge_calls_total{direction="inbound",end="handover"} 1' in demo.metrics
    assert 'bridge_calls_total{direction="inbound",end="caller_hung_up"} 1' in demo.metrics


async def test_gpt_live(tmp_path: Path) -> None:
    lines: list[str] = []
    demo = await run_demo(tmp_path, ["gpt-live"], fast=True, echo=lines.append)
    [outcome] = demo.outcomes
    assert outcome.ok, (outcome.problems, "\n".join(lines))
    result, record = outcome.result, outcome.record
    assert result is not None and record is not None
    assert result.greeting_ms is not None and len(result.latencies_ms) == 2
    assert (result.hung_up_by, result.next_action) == ("bridge", "hangup")
    assert record["model"] == "gpt-live-1" and record["end_kind"] == "assistant_ended"
    assert record["usage"]["seconds"] > 0 and record["usage"]["input_tokens"] > 0
    assert record["cost_usd"] > record["usage"]["seconds"] / 60 * 0.05  # + the backend's
    assert any(line.startswith("  * GPT-Live session ") for line in lines)


async def test_a_scenario_that_goes_wrong_fails_the_demo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(env: Env) -> Outcome:
        raise RuntimeError("boom")

    async def wrong(env: Env) -> Outcome:
        outcome = Outcome("wrong", result=CallResult(ok=True))
        outcome.expect(False, "Twilio did not dial")
        return outcome

    monkeypatch.setitem(SCENARIOS, "broken", ("a broken scenario", broken))
    monkeypatch.setitem(SCENARIOS, "wrong", ("a wrong outcome", wrong))
    lines: list[str] = []
    demo = await run_demo(tmp_path, ["broken", "wrong"], fast=True, echo=lines.append)
    assert demo.failed == ["broken", "wrong"]
    assert "  => FAILED: RuntimeError: boom" in lines
    assert "  => FAILED: Twilio did not dial" in lines
    assert verdict(demo) == ("demo FAILED: broken, wrong", 1)


def test_sum_metrics_adds_up_the_instances() -> None:
    one = ("# HELP bridge_calls_total Calls.\n# TYPE bridge_calls_total counter\n"
           'bridge_calls_total{direction="inbound",end="handover"} 1.0\n'
           'bridge_calls_created{end="handover"} 1.7e9\n'
           "# HELP bridge_calls_active Live.\n# TYPE bridge_calls_active gauge\n"
           "bridge_calls_active 0.0\n"
           "# HELP other_total Not ours.\n# TYPE other_total counter\nother_total 3.0\n")
    two = ("# HELP bridge_calls_total Calls.\n# TYPE bridge_calls_total counter\n"
           'bridge_calls_total{direction="inbound",end="handover"} 2.0\n'
           'bridge_calls_total{direction="inbound",end="caller_hung_up"} 1.0\n')
    assert sum_metrics([one, two]) == [
        'bridge_calls_total{direction="inbound",end="handover"} 3',
        'bridge_calls_total{direction="inbound",end="caller_hung_up"} 1',
        "bridge_calls_active 0"]


async def test_outbound_calls_to_a_person_and_an_answering_machine(tmp_path: Path) -> None:
    lines: list[str] = []
    demo = await run_demo(tmp_path, ["outbound"], fast=True, echo=lines.append)
    [outcome] = demo.outcomes
    assert outcome.ok, (outcome.problems, "\n".join(lines))
    assert any("answering-machine detection: human" in line for line in lines)
    assert any("answering-machine detection: machine_end_beep" in line for line in lines)
    assert any("end_kind voicemail" in line for line in lines)
    assert 'bridge_calls_total{direction="outbound",end="voicemail"} 1' in demo.metrics
    assert demo.record is not None and demo.record["end_kind"] == "caller_hung_up"
    assert "Outcome: completed, answered by human" in demo.transcript


async def test_a_small_campaign(tmp_path: Path) -> None:
    lines: list[str] = []
    demo = await run_demo(tmp_path, ["campaign"], fast=True, echo=lines.append)
    [outcome] = demo.outcomes
    assert outcome.ok, (outcome.problems, "\n".join(lines))
    assert any(line.startswith("  * outcomes {") and "at most 2 calls at once" in line
               for line in lines)
    assert 'bridge_calls_total{direction="outbound",end="busy"} 2' in demo.metrics


async def test_the_console_demo_serves_the_console_while_its_calls_go_on(tmp_path: Path) -> None:
    """`make demo CONSOLE=1`: the console's URL is printed, it answers the demo's token, and
    the simulated call is in its live list while it goes on, then in its history."""
    lines: list[str] = []
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    demo = asyncio.ensure_future(run_console(tmp_path, port=0, calls=1, turns=1, pause=0.1,
                                             fast=True, echo=lines.append,
                                             ready=ready.set_result))
    url = await asyncio.wait_for(ready, 10)
    base = url.removesuffix("/console")
    assert f"  open {url} and log in with the token {ADMIN_TOKEN}" in lines
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as page:  # not logged in: the login page
            assert page.status == 200 and page.url.path == "/console/login"

        async def live() -> bool:
            async with http.get(f"{base}/calls?status=live", headers=auth) as response:
                return bool((await response.json())["calls"])

        await wait_until(live, 10, "the demo's call in the live list")
        assert await asyncio.wait_for(demo, 30) == 1
    assert any(line.startswith("  call 1: call OK") for line in lines), lines
    store = SQLiteStore(tmp_path / "demo-calls.db")  # the console's history
    await store.open()
    try:
        (call,), _ = await store.page(CallQuery(limit=10))
        assert call["end_kind"] == "caller_hung_up" and call["recording"]
    finally:
        await store.close()


def test_the_demo_checks_that_the_record_and_the_caller_agree(tmp_path: Path) -> None:
    """At the normal pace the demo fails a call whose recorded latency is more than 20 ms from
    what the caller measured (the fast pace, run beside other tests, does not check it)."""
    from typing import Any, cast

    from server.testing.scenarios import Pace, _common

    for pace, caller_ms, problems in ((Pace.normal(), 470.0, 1), (Pace.normal(), 505.0, 0),
                                      (Pace.fast(), 470.0, 0)):
        env = Env(tmp_path, pace, lambda _: None, cast(Any, None))
        outcome = Outcome("latency")
        result = CallResult(ok=True, latencies_ms=[caller_ms])
        _common(env, outcome, result, {"latencies_ms": [500.0]})
        assert len(outcome.problems) == problems, outcome.problems
