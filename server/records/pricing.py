"""An estimate of what a call cost, from its usage and a price table.

The table (config/prices.json) is keyed by model and is meant to be edited when OpenAI's prices
change: this is an estimate, not a bill. A Realtime model is priced per 1M tokens, from its
summed token usage (OpenAI's own field names; cached input tokens are part of the text/audio
input counts and are billed at the cached rate instead of the full one). A GPT-Live model is
priced per minute of session (`usd_per_minute`, per second, no rounding), plus the tokens of its
Responses backend, priced from the backend model's per-token entry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("server.records")

DEFAULT_PRICES = Path("config") / "prices.json"
RATES = ("text_input", "cached_text_input", "audio_input", "cached_audio_input",
         "text_output", "audio_output")
PER_MINUTE = "usd_per_minute"
_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per 1M tokens; `usd_per_minute` for a model billed by session time (GPT-Live)."""

    text_input: float = 0.0
    cached_text_input: float = 0.0
    audio_input: float = 0.0
    cached_audio_input: float = 0.0
    text_output: float = 0.0
    audio_output: float = 0.0
    usd_per_minute: float | None = None


class PriceTable:
    def __init__(self, models: Mapping[str, ModelPrice] | None = None) -> None:
        self.models = dict(models or {})

    @classmethod
    def load(cls, path: Path = DEFAULT_PRICES) -> PriceTable:
        """Read the table; a missing or broken file gives an empty table (cost_usd null) and
        one warning, never a failed start."""
        try:
            data = orjson.loads(path.read_bytes())
        except OSError as e:
            log.warning("no price table at %s (%s): call records will have no cost_usd",
                        path, e.strerror or e)
            return cls()
        except orjson.JSONDecodeError as e:
            log.warning("price table %s is not valid JSON (%s): no cost_usd", path, e)
            return cls()
        try:
            return cls.parse(data)
        except ValueError as e:
            log.warning("price table %s: %s: no cost_usd", path, e)
            return cls()

    @classmethod
    def parse(cls, data: Any) -> PriceTable:
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise ValueError('expected {"models": {"<model>": {...}}}')
        table: dict[str, ModelPrice] = {}
        aliases: dict[str, str] = {}
        for name, entry in models.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{name}: expected an object")
            if "same_as" in entry:
                aliases[name] = str(entry["same_as"])
                continue
            rates: dict[str, float] = {}
            for key, value in entry.items():
                if key not in RATES and key != PER_MINUTE:
                    raise ValueError(f"{name}: unknown rate {key!r} "
                                     f"(known: {', '.join((*RATES, PER_MINUTE))})")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"{name}.{key}: expected a number >= 0")
                rates[key] = float(value)
            table[name] = ModelPrice(**rates)
        for name, target in aliases.items():
            if target not in table:
                raise ValueError(f"{name}: same_as {target!r}, which has no prices")
            table[name] = table[target]
        return cls(table)

    def price(self, model: str) -> ModelPrice | None:
        """Exact name, else the name without a -YYYY-MM-DD snapshot suffix."""
        return self.models.get(model) or self.models.get(_DATE_SUFFIX.sub("", model))

    def cost(self, model: str, usage: Mapping[str, Any]) -> float | None:
        """USD for `usage` (summed response.done usage); None when the model has no price,
        or is priced by the minute (GPT-Live: `cost_live`)."""
        price = self.price(model)
        if price is None or price.usd_per_minute is not None or not usage:
            return None
        given = usage.get("input_token_details")
        details: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        text_in, audio_in = _n(details, "text_tokens"), _n(details, "audio_tokens")
        if not details:  # no breakdown: count it all as text
            text_in = _n(usage, "input_tokens")
        cached = _n(details, "cached_tokens")
        cached_given = details.get("cached_tokens_details")
        cached_details: Mapping[str, Any] = (
            cached_given if isinstance(cached_given, Mapping) else {})
        if cached_details:
            cached_text, cached_audio = (_n(cached_details, "text_tokens"),
                                         _n(cached_details, "audio_tokens"))
        else:
            cached_text = min(cached, text_in)
            cached_audio = min(cached - cached_text, audio_in)
        out_given = usage.get("output_token_details")
        out: Mapping[str, Any] = out_given if isinstance(out_given, Mapping) else {}
        text_out, audio_out = _n(out, "text_tokens"), _n(out, "audio_tokens")
        if not out:
            audio_out = _n(usage, "output_tokens")  # a voice call's output is mostly audio
        total = (
            max(text_in - cached_text, 0) * price.text_input
            + cached_text * price.cached_text_input
            + max(audio_in - cached_audio, 0) * price.audio_input
            + cached_audio * price.cached_audio_input
            + text_out * price.text_output
            + audio_out * price.audio_output
        ) / 1_000_000
        return round(total, 6)

    def estimate(self, model: str, usage: Mapping[str, Any],
                 backend_model: str | None = None) -> float | None:
        """A call's cost, however its model is priced: per minute (GPT-Live: `usage` holds
        the session `seconds` and its backend's summed Responses tokens) or per token."""
        price = self.price(model)
        if price is not None and price.usd_per_minute is not None:
            seconds = usage.get("seconds")
            return self.cost_live(model, float(seconds) if isinstance(seconds, (int, float))
                                  and not isinstance(seconds, bool) else None,
                                  backend_model, usage)
        return self.cost(model, usage)

    def cost_live(self, model: str, seconds: float | None, backend_model: str | None = None,
                  backend_usage: Mapping[str, Any] | None = None) -> float | None:
        """USD for a GPT-Live call: its session seconds at the model's per-minute price, plus
        its backend's summed Responses usage at the backend model's per-token prices. None when
        a part that was used has no price (an estimate with a hole in it would mislead)."""
        price = self.price(model)
        if price is None or price.usd_per_minute is None or seconds is None:
            return None
        total = max(seconds, 0.0) / 60 * price.usd_per_minute
        if backend_usage and (_n(backend_usage, "input_tokens")
                              or _n(backend_usage, "output_tokens")):
            backend = self.price(backend_model) if backend_model else None
            if backend is None:
                return None
            total += responses_cost(backend, backend_usage)
        return round(total, 6)


def responses_cost(price: ModelPrice, usage: Mapping[str, Any]) -> float:
    """USD for a Responses API usage (`input_tokens`, `input_tokens_details.cached_tokens`,
    `output_tokens`, reasoning included): a text model's rates."""
    given = usage.get("input_tokens_details")
    details: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    input_tokens = _n(usage, "input_tokens")
    cached = min(_n(details, "cached_tokens"), input_tokens)
    return ((input_tokens - cached) * price.text_input + cached * price.cached_text_input
            + _n(usage, "output_tokens") * price.text_output) / 1_000_000


def _n(mapping: Mapping[str, Any], key: str) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
