"""GPT-Live is priced per minute of session, plus its Responses backend's tokens; Realtime's
per-token pricing is unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.records.pricing import ModelPrice, PriceTable, responses_cost
from server.testing.live_standin import backend_usage

PRICES = Path(__file__).resolve().parent.parent / "config" / "prices.json"
BACKEND = ModelPrice(text_input=0.25, cached_text_input=0.025, text_output=2.0)
USAGE = {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1000,
                                                        "cache_write_tokens": 0},
         "output_tokens": 80, "output_tokens_details": {"reasoning_tokens": 30},
         "total_tokens": 1280}


def test_live_models_are_priced_per_minute_from_the_table() -> None:
    table = PriceTable.load(PRICES)
    for model in ("gpt-live-1", "gpt-live-1.1"):
        price = table.price(model)
        assert price is not None and price.usd_per_minute == 0.05
        assert table.cost_live(model, 90) == pytest.approx(0.075)
    assert table.cost_live("gpt-live-1", 61) == pytest.approx(61 / 60 * 0.05, abs=1e-6)  # per s
    assert table.cost_live("gpt-live-1-2026-11-01", 60) == pytest.approx(0.05)  # a snapshot
    assert table.cost_live("gpt-live-1", 0) == 0.0
    assert table.cost_live("gpt-live-1", None) is None  # no usage seen at all
    assert table.cost_live("gpt-live-9", 60) is None
    assert table.cost_live("gpt-realtime", 60) is None  # priced per token, not per minute
    # and the other way: a per-minute model has no token price
    assert table.cost("gpt-live-1", {"input_tokens": 10, "output_tokens": 10}) is None
    realtime = table.price("gpt-realtime")
    assert realtime is not None and realtime.usd_per_minute is None


def test_backend_tokens_are_added_at_the_backend_models_prices() -> None:
    table = PriceTable({"gpt-live-1": ModelPrice(usd_per_minute=0.05), "gpt-5-mini": BACKEND})
    backend = (200 * 0.25 + 1000 * 0.025 + 80 * 2.0) / 1e6
    assert responses_cost(BACKEND, USAGE) == pytest.approx(backend)
    assert table.cost_live("gpt-live-1", 120, "gpt-5-mini", USAGE) == pytest.approx(
        0.1 + backend, abs=1e-6)
    # the stand-in's backend usage prices the same way (the tests' totals rely on it)
    assert responses_cost(BACKEND, backend_usage(1)) == pytest.approx(
        (172 * 0.25 + 128 * 0.025 + 35 * 2.0) / 1e6)
    # used but unpriced: no estimate rather than a wrong one
    assert table.cost_live("gpt-live-1", 120, "gpt-9-nano", USAGE) is None
    assert table.cost_live("gpt-live-1", 120, None, USAGE) is None
    # not used: the minutes alone
    assert table.cost_live("gpt-live-1", 120, "gpt-9-nano", {}) == pytest.approx(0.1)
    assert table.cost_live("gpt-live-1", 120, None, {"input_tokens": 0}) == pytest.approx(0.1)
    odd = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 500}}  # more cached
    assert responses_cost(BACKEND, odd) == pytest.approx(100 * 0.025 / 1e6)


def test_per_minute_entries_are_validated() -> None:
    table = PriceTable.parse({"models": {"live": {"usd_per_minute": 0.05},
                                         "live-next": {"same_as": "live"}}})
    assert table.price("live-next") == ModelPrice(usd_per_minute=0.05)
    for bad in ({"usd_per_minute": -1}, {"usd_per_minute": "0.05"},
                {"usd_per_minute": True}):
        with pytest.raises(ValueError, match="usd_per_minute: expected a number"):
            PriceTable.parse({"models": {"live": bad}})
    with pytest.raises(ValueError, match=r"usd_per_minut'.*usd_per_minute"):
        PriceTable.parse({"models": {"live": {"usd_per_minut": 0.05}}})
