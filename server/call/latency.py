"""Response latency per turn: from the caller's real end of speech to the reply's first audio.

The call marks where the caller stopped speaking (from the model's `speech_stopped`, mapped to
the moment the bridge received that audio from Twilio) and asks once per reply, when its first
audio goes to the caller. The record and the metrics read the same number.
"""

from __future__ import annotations

import time

FRAME_MS = 20  # Twilio sends one 20 ms frame every 20 ms

_now = time.monotonic  # one name for tests to replace


class TurnLatency:
    __slots__ = ("_ended",)

    def __init__(self) -> None:
        self._ended: float | None = None

    def speech_ended(self, at: float) -> None:
        """The caller stopped speaking at `at` (monotonic seconds)."""
        self._ended = at

    def reply_started(self) -> float | None:
        """Seconds for this turn, once per turn; None for audio no caller turn asked for
        (the greeting, a second item of the same reply)."""
        ended, self._ended = self._ended, None
        return None if ended is None else max(_now() - ended, 0.0)
