"""Keypad: the caller's key presses, told to the model as one short user message.

Twilio sends one `dtmf` event per key. Digits are collected until `#` or a pause of
KEYPAD_TIMEOUT (2 s), then sent as a user text item ("The caller typed 1 2 3 4 on the keypad.")
and answered through the call's response gate (after the response in progress, if any). Digits
can be account numbers or PINs: they are never logged unless LOG_PII=true.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import ClassVar

from server.call.events import KeypadEntry
from server.call.features.base import CallControl, Feature
from server.settings import Settings
from server.wire import twilio as tw

KEYS = frozenset("0123456789*#")
MAX_DIGITS = 32  # an entry this long is sent at once: no unbounded buffer per call

FeatureFactory = Callable[[CallControl], Feature | None]


def factory(settings: Settings) -> FeatureFactory | None:
    """The keypad feature for every call; None when KEYPAD=off (key presses are ignored)."""
    if not settings.keypad:
        return None
    return functools.partial(KeypadFeature, timeout=settings.keypad_timeout)


def message(digits: str) -> str:
    return f"The caller typed {' '.join(digits)} on the keypad."


class KeypadFeature(Feature):
    name = "keypad"
    twilio_events: ClassVar[tuple[type, ...]] = (tw.Dtmf,)

    def __init__(self, call: CallControl, timeout: float = 2.0) -> None:
        super().__init__(call)
        self._timeout = timeout
        self._digits: list[str] = []
        self._timer: asyncio.Task[None] | None = None
        self._deadline = 0.0  # loop time at which the entry ends, unless another key comes
        self._show = call.settings.log_pii

    async def on_twilio(self, event: tw.TwilioEvent) -> None:
        if not isinstance(event, tw.Dtmf):
            return
        if event.digit not in KEYS:
            self.call.warn("keypad: ignored an unknown key")
            return
        if event.digit == "#":
            await self._send(self._take() or "#")
            return
        self._digits.append(event.digit)
        if len(self._digits) >= MAX_DIGITS:
            await self._send(self._take())
            return
        # One timer per entry, pushed back by each key (never cancelled and re-made per key).
        self._deadline = asyncio.get_running_loop().time() + self._timeout
        if self._timer is None:
            self._timer = self.call.spawn(self._after_pause(), "keypad-pause")

    def _take(self) -> str:
        digits, self._digits = "".join(self._digits), []
        return digits

    async def _after_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self._deadline - loop.time()) > 0:
            await asyncio.sleep(wait)
        self._timer = None  # a key from now on starts a new entry and a new timer
        await self._send(self._take())  # nothing, if `#` or the length limit sent it already

    async def _send(self, digits: str) -> None:
        if not digits:
            return
        shown = f": {digits}" if self._show else ""
        self.call.log.info("keypad: the caller typed %d key(s)%s", len(digits), shown)
        self.call.publish(KeypadEntry(digits, self._show))
        await self.call.model.add_text("user", message(digits))
        await self.call.request_response("keypad")
