"""Logging: text or one JSON object per line, call ids on every call line, secrets scrubbed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson

CALL_FIELDS = ("call_sid", "stream_sid", "peer")


class _Scrubber(logging.Formatter):
    """Replaces any configured secret in the final line: defence in depth, not the only guard."""

    def __init__(self, secrets: Iterable[str], fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

    def scrub(self, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "[redacted]")
        return line


class TextFormatter(_Scrubber):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(secrets, "%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(
            f"{k}={getattr(record, k)}" for k in CALL_FIELDS if getattr(record, k, None)
        )
        return self.scrub(f"{line} [{ids}]" if ids else line)


class JsonFormatter(_Scrubber):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in (*CALL_FIELDS, "call"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self.scrub(orjson.dumps(entry, default=str).decode())


class CallLog(logging.LoggerAdapter[logging.Logger]):
    """Adds the call's ids to every line it logs."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


class RepeatedWarnings:
    """Warnings that one peer's input causes (bad keys, repeated frames): the first few of each
    are logged, the rest counted and reported in one line each (`report`), so a peer repeating
    a fault cannot flood the log. Distinct messages are bounded too."""

    __slots__ = ("_kinds", "_seen", "_shown")

    def __init__(self, shown: int = 3, kinds: int = 32) -> None:
        self._seen: dict[str, int] = {}
        self._shown, self._kinds = shown, kinds

    def warn(self, log: logging.LoggerAdapter[logging.Logger], message: str) -> None:
        seen = self._seen.get(message, 0) + 1
        self._seen[message] = seen
        if seen <= self._shown:
            log.warning("%s", message)
        elif len(self._seen) > self._kinds:
            self._seen.pop(message)

    def report(self, log: logging.LoggerAdapter[logging.Logger]) -> None:
        for message, seen in self._seen.items():
            if seen > self._shown:
                log.warning("%s (%d more times)", message, seen - self._shown)


def mask_number(number: str, show: bool = False) -> str:
    """A phone number fit for an INFO line: `+1555***4567` (all of it when `show`, for
    LOG_PII=true). Numbers are personal data; sip: URIs and short values are masked whole."""
    if show or not number:
        return number or "?"
    if len(number) < 8:
        return "***"
    return f"{number[:5]}***{number[-4:]}"


def setup_logging(level: str, fmt: str, secrets: Iterable[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log line per webhook is noise next to our own call lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
