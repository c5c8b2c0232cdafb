"""Barge-in: what the caller has heard, and what to cut when they talk over the assistant.

Twilio plays our audio from a buffer and echoes a mark once the audio sent before it has played:
marks are the only server-side signal of what the caller heard. We send one mark after each audio
delta, named by a rising counter, and remember how far into its item each mark reaches. When the
caller starts speaking while marks are still pending, audio is still playing: clear Twilio's
buffer and truncate the playing item at the last echoed mark, so the model's memory of the
conversation matches what the caller actually heard (mu-law at 8 kHz: 8 bytes per millisecond).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

BYTES_PER_MS = 8
MARK_EVERY_MS = 120  # longest audio sent without a mark: the precision of a truncation
MARK_CHARS = MARK_EVERY_MS * BYTES_PER_MS // 3 * 4  # as base64; a multiple of 4 chars


@dataclass(frozen=True, slots=True)
class Interruption:
    """What to do about a barge-in: the item to truncate and how much of it was heard."""

    item_id: str
    audio_end_ms: int


def split(b64: str) -> list[str]:
    """Cut base64 into MARK_CHARS pieces; each is valid base64 (4 chars = 3 bytes), so a long
    delta can be sent in marked pieces without decoding it."""
    return [b64[i:i + MARK_CHARS] for i in range(0, len(b64), MARK_CHARS)]


def decoded_length(b64: str) -> int:
    """Bytes a base64 string decodes to, without decoding it."""
    n = len(b64)
    if n and b64[-1] == "=":
        return n // 4 * 3 - (2 if b64[-2] == "=" else 1)
    return n // 4 * 3


class BargeIn:
    """Per call; every method is synchronous and cheap (the audio hot path calls `on_audio`)."""

    __slots__ = (
        "_dropping",
        "_heard",
        "_heard_item",
        "_item",
        "_next",
        "_pending",
        "_response",
        "_sent",
        "interruptions",
    )

    def __init__(self) -> None:
        self._pending: deque[tuple[int, str, int]] = deque()  # (mark, item id, item bytes sent)
        self._next = 0
        self._item: str | None = None  # the item whose audio we are sending
        self._sent = 0  # bytes of that item sent to Twilio
        self._heard_item: str | None = None
        self._heard = 0  # bytes of _heard_item the caller has heard (last echoed mark)
        self._response: str | None = None  # the response being generated, if any
        self._dropping: str | None = None  # a response cut by barge-in: drop its late audio
        self.interruptions = 0

    @property
    def playing(self) -> bool:
        """Audio sent to Twilio that it has not confirmed playing."""
        return bool(self._pending)

    def on_response_created(self, response_id: str) -> None:
        self._response = response_id

    def on_response_done(self, response_id: str) -> None:
        if self._response == response_id:
            self._response = None
        if self._dropping == response_id:
            self._dropping = None

    def on_audio(self, response_id: str | None, item_id: str, nbytes: int) -> str | None:
        """Account for a delta about to be sent; return the mark to send after it, or None if
        the delta belongs to an interrupted response and must be dropped."""
        if response_id is not None and response_id == self._dropping:
            return None
        if item_id != self._item:
            self._item = item_id
            self._sent = 0
        self._sent += nbytes
        self._next += 1
        self._pending.append((self._next, item_id, self._sent))
        return str(self._next)

    def on_mark(self, name: str) -> None:
        """Twilio echoed a mark: everything up to it has played (older marks included)."""
        try:
            number = int(name)
        except ValueError:
            return  # not ours
        pending = self._pending
        while pending and pending[0][0] <= number:
            mark, item_id, offset = pending.popleft()
            if mark == number:
                self._heard_item, self._heard = item_id, offset
        # Echoes of marks we cleared find nothing pending: they are ignored by construction.

    def on_speech_started(self) -> Interruption | None:
        """The caller started talking. Returns the truncation to send (after clearing Twilio),
        or None when nothing is playing."""
        if self._response is not None:
            # The service cancels it (interrupt_response); audio still in flight is stale.
            self._dropping = self._response
        if not self._pending:
            return None
        _, item_id, _ = self._pending[0]
        generated = max(offset for _, item, offset in self._pending if item == item_id)
        heard = self._heard if self._heard_item == item_id else 0
        self._pending.clear()
        self._item = None
        self.interruptions += 1
        return Interruption(item_id, min(heard, generated) // BYTES_PER_MS)
