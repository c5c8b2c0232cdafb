"""Which OpenAI API a call uses: MODEL_API for every plan that does not choose, a line's own
`model_api` in NUMBERS_FILE, the settings that go with GPT-Live, the record's model and how its
cost is estimated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.call.plan import CallPlan, Plans
from server.records.pricing import ModelPrice, PriceTable
from server.settings import ConfigError, Settings
from server.testing.dial import dial
from server.testing.live_standin import LiveStandinOptions, next_live_session
from tests.conftest import API_KEY, CALLED, CALLER, PROMPTS, MakeRig

BASE = {"OPENAI_API_KEY": "sk-test-secret-value"}


def test_model_api_settings_default_and_are_checked() -> None:
    s = Settings.from_env(BASE)
    assert (s.model_api, s.openai_live_model, s.live_backend_model) == (
        "realtime", "gpt-live-1", "gpt-5.4-mini")
    assert s.openai_live_url == "wss://api.openai.com/v1/live/sessions"
    s = Settings.from_env({**BASE, "MODEL_API": "Live", "OPENAI_LIVE_MODEL": "gpt-live-1.1",
                           "OPENAI_LIVE_URL": "ws://127.0.0.1:8766/v1/live/sessions/",
                           "LIVE_BACKEND_MODEL": "gpt-5.5"})
    assert (s.model_api, s.openai_live_model, s.live_backend_model) == (
        "live", "gpt-live-1.1", "gpt-5.5")
    assert s.openai_live_url == "ws://127.0.0.1:8766/v1/live/sessions"
    for name, value, problem in [
            ("MODEL_API", "duplex", "'duplex' is not one of live, realtime"),
            ("OPENAI_LIVE_URL", "https://api.openai.com/v1/live/sessions", "is not a ws://"),
            ("OPENAI_LIVE_URL", "wss://x/v1/live/sessions?model=gpt-live-1", "query string"),
            ("OPENAI_LIVE_MODEL", "gpt live", "is not a model name"),
            ("LIVE_BACKEND_MODEL", "gpt-5.4-mini; rm", "is not a model name")]:
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({**BASE, name: value})
        assert caught.value.variable == name and problem in str(caught.value)


def test_model_api_is_every_plans_default_and_a_line_may_choose(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.json"
    numbers.write_text(json.dumps({"+15550002222": {"voice": "marin"},
                                   "+15550003333": {"model_api": "realtime"}}))
    settings = Settings(openai_api_key=API_KEY, prompts_dir=PROMPTS, model_api="live",
                        numbers_file=numbers)
    plans = Plans(settings)
    assert plans.default == CallPlan(model_api="live")
    assert plans.inbound("+15550009999").model_api == "live"  # not a line of the file
    assert plans.inbound("+15550002222").model_api == "live"  # a line that does not choose
    assert plans.inbound("+15550003333").model_api == "realtime"  # one that does
    live, realtime = (plans.resolve(plans.inbound(n)) for n in ("+15550002222", "+15550003333"))
    assert (live.model_api, live.model) == ("live", "gpt-live-1")
    assert (realtime.model_api, realtime.model) == ("realtime", "gpt-realtime")
    assert Plans(Settings(openai_api_key=API_KEY, prompts_dir=PROMPTS)).default.model_api \
        == "realtime"


def test_a_hosted_prompt_cannot_go_to_gpt_live(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.json"
    numbers.write_text(json.dumps({"+15550002222": {"model_api": "live"}}))
    with pytest.raises(ConfigError, match=r"NUMBERS_FILE: \+15550002222: .*hosted prompt"):
        Plans(Settings(openai_api_key=API_KEY, prompt_id="pmpt_abc", numbers_file=numbers))
    with pytest.raises(ConfigError, match=r"PROMPT_ID: pmpt_abc is a hosted prompt"):
        Plans(Settings(openai_api_key=API_KEY, prompt_id="pmpt_abc", model_api="live"))
    # on Realtime it is passed through, as before
    Plans(Settings(openai_api_key=API_KEY, prompt_id="pmpt_abc"))


async def test_a_line_on_gpt_live_in_a_realtime_bridge(make_rig: MakeRig,
                                                      tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.json"
    numbers.write_text(json.dumps({CALLED: {"model_api": "live", "voice": "marin"}}))
    rig = await make_rig(LiveStandinOptions(api_key=API_KEY, pace=0), model_api="realtime",
                         numbers_file=numbers)
    call = await dial(rig.bridge.session, str(rig.bridge.make_url("")),
                      auth_token=rig.settings.twilio_auth_token, caller=CALLER, called=CALLED,
                      marks="immediate")
    rig.streams.append(call.stream)
    rig.line(call.stream)
    session = await next_live_session(rig.standin.app)
    start = await session.wait_for("session.start")
    assert start["session"]["model"] == "gpt-live-1"
    assert start["session"]["audio"]["output"]["voice"] == "marin"
    (c,) = rig.live_calls()
    assert (c.plan.model_api, c.record.model) == ("live", "gpt-live-1")


def test_the_cost_estimate_follows_how_the_model_is_priced() -> None:
    table = PriceTable({"gpt-live-1": ModelPrice(usd_per_minute=0.05),
                        "gpt-5.4-mini": ModelPrice(text_input=0.75, cached_text_input=0.075,
                                                   text_output=4.5),
                        "gpt-realtime": ModelPrice(text_input=4.0, audio_output=64.0)})
    live = {"seconds": 120.0, "input_tokens": 1000, "output_tokens": 100,
            "input_tokens_details": {"cached_tokens": 400}}
    assert table.estimate("gpt-live-1", live, "gpt-5.4-mini") == pytest.approx(
        0.1 + (600 * 0.75 + 400 * 0.075 + 100 * 4.5) / 1e6, abs=1e-6)
    assert table.estimate("gpt-live-1", {"seconds": 30}, "gpt-5.4-mini") == pytest.approx(0.025)
    assert table.estimate("gpt-live-1", {}, "gpt-5.4-mini") is None  # no seconds seen
    assert table.estimate("gpt-live-1", {"seconds": True}, None) is None  # not a number
    realtime = {"input_tokens": 1000, "output_tokens": 100}
    assert table.estimate("gpt-realtime", realtime, "gpt-5.4-mini") == \
        table.cost("gpt-realtime", realtime)
    shipped = PriceTable.load(Path(__file__).resolve().parent.parent / "config" / "prices.json")
    assert shipped.price(Settings(openai_api_key="k").live_backend_model) is not None
