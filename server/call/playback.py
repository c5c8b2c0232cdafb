"""Playback: the assistant's audio on its way to the caller, what the caller has heard of it, and
what to cut when they talk over it.

Twilio plays our audio from a buffer and echoes a mark once the audio sent before it has played:
marks are the only server-side signal of what the caller heard. We send a mark once 120 ms of
unmarked audio has gone out (before the piece that would take it past 120 ms) and at the end of
each audio item, and remember how far into its item each mark reaches. When the caller starts
speaking while marks are pending, audio is still playing: clear Twilio's buffer and truncate the
playing item at the last echoed mark, so the model's memory of the conversation matches what the
caller actually heard (mu-law at 8 kHz: 8 bytes per millisecond).

GPT-Live (`continuous`) is different: its output is one continuous track, silence included, and
the model handles barge-in itself. Nothing is truncated, so no periodic marks are sent; a mark
goes only when the bridge must know that what it sent so far has played (the goodbye before a
hang-up or a transfer, the time limit's goodbye, before hold audio), and "played" means: the
model has been quiet for a moment (QUIET seconds without a word) and that mark has come back.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aiohttp import WSMsgType

from server.call.conversation import AssistantTurn
from server.call.ending import CallEnds, hung_up
from server.call.events import BargeIn, ReplyStarted
from server.models import events as ev
from server.wire import twilio as tw

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from server.call.call import Call

BYTES_PER_MS = 8
MARK_EVERY_MS = 120  # most audio sent without a mark: the precision of a truncation
MARK_BYTES = MARK_EVERY_MS * BYTES_PER_MS
MARK_CHARS = MARK_BYTES // 3 * 4  # as base64; a multiple of 4 chars
TEXT = WSMsgType.TEXT
QUIET = 0.7  # continuous output: seconds without a word of the model's that mean it is done


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


class PlayState:
    """The arithmetic, with no I/O: every method is synchronous and cheap."""

    __slots__ = (
        "_dropping",
        "_heard",
        "_heard_item",
        "_item",
        "_next",
        "_pending",
        "_response",
        "_sent",
        "_unmarked",
        "interruptions",
    )

    def __init__(self) -> None:
        self._pending: deque[tuple[int, str, int]] = deque()  # (mark, item id, item bytes sent)
        self._next = 0
        self._item: str | None = None  # the item whose audio we are sending
        self._sent = 0  # bytes of that item sent to Twilio
        self._unmarked = 0  # bytes sent since the last mark
        self._heard_item: str | None = None
        self._heard = 0  # bytes of _heard_item the caller has heard (last echoed mark)
        self._response: str | None = None  # the response being generated, if any
        self._dropping: str | None = None  # a response cut by barge-in: drop its late audio
        self.interruptions = 0

    @property
    def playing(self) -> bool:
        """Audio sent to Twilio that it has not confirmed playing."""
        return bool(self._pending) or self._unmarked > 0

    @property
    def last_mark(self) -> int | None:
        """The newest mark still waiting for its echo."""
        return self._pending[-1][0] if self._pending else None

    def played_up_to(self, mark: int) -> bool:
        """Twilio echoed this mark (or it was cleared): the audio before it is over."""
        return not self._pending or self._pending[0][0] > mark

    def sent(self, item_id: str, nbytes: int) -> None:
        """Continuous output: account for audio sent without marking it (a mark goes only
        when asked for, by `flush`)."""
        if item_id != self._item:
            self._item = item_id
            self._sent = 0
        self._sent += nbytes
        self._unmarked += nbytes

    def on_response_created(self, response_id: str) -> None:
        self._response = response_id

    def on_response_done(self, response_id: str) -> None:
        if self._response == response_id:
            self._response = None
        if self._dropping == response_id:
            self._dropping = None

    def dropped(self, response_id: str | None) -> bool:
        """Audio of a response cut by barge-in: stale, never sent."""
        return response_id is not None and response_id == self._dropping

    def add(self, item_id: str, nbytes: int) -> str | None:
        """Account for a piece about to be sent; return a mark to send *before* it (covering
        the audio already sent) when one is due."""
        mark = None
        if item_id != self._item:
            mark = self.flush()
            self._item = item_id
            self._sent = 0
        elif self._unmarked and self._unmarked + nbytes > MARK_BYTES:
            mark = self.flush()
        self._sent += nbytes
        self._unmarked += nbytes
        return mark

    def flush(self) -> str | None:
        """A mark for the audio sent since the last one (end of an item), if any."""
        if not self._unmarked or self._item is None:
            return None
        self._next += 1
        self._pending.append((self._next, self._item, self._sent))
        self._unmarked = 0
        return str(self._next)

    def forget(self) -> None:
        """A new model session: the old one's items cannot be truncated any more. Audio already
        sent still plays; its marks' echoes are ignored."""
        self._pending.clear()
        self._item = None
        self._unmarked = 0
        self._response = self._dropping = None

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
        if not self.playing:
            return None
        item_id = self._pending[0][1] if self._pending else self._item
        assert item_id is not None
        offsets = [offset for _, item, offset in self._pending if item == item_id]
        if item_id == self._item:
            offsets.append(self._sent)
        heard = self._heard if self._heard_item == item_id else 0
        self._pending.clear()
        self._item = None
        self._unmarked = 0
        self.interruptions += 1
        return Interruption(item_id, min(heard, max(offsets)) // BYTES_PER_MS)


class AudioListener(Protocol):
    """Hears both directions of a call's audio without sitting in the relay: recording,
    listen-in. Each method must return at once (keep the base64, queue it, or drop it)."""

    def on_caller_audio(self, payload: str) -> None: ...

    def on_assistant_audio(self, payload: str) -> None: ...

    def on_clear(self) -> None: ...


class Playback:
    """The call's output transport: the call hands it every delta (`play`, the fast path); it
    owns marks, clear and truncate, and tells the call's listeners what the caller hears."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.state = PlayState()
        self._idle = asyncio.Event()
        self._idle.set()
        self._started: set[str] = set()  # responses whose first audio went out
        self._item: str | None = None  # the item of the last delta played
        self._send: Callable[[bytes, WSMsgType], Awaitable[None]] | None = None
        self.muted = False  # an operator has the call: the model's audio is not played
        # Held (an outbound call waiting for its answering-machine result): the model's audio
        # is kept here, in order, and played on `release` (or dropped by `cut`).
        self.held: list[ev.AudioDelta] | None = None
        self.holding = False  # hold audio plays instead of the model's (continuous) audio
        self.continuous = False  # GPT-Live: output flows all the time; marks only on demand
        self._spoke_at = float("-inf")  # loop time of the model's latest word (continuous)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (mark, its echo)
        # Shared with the caller-side relay: listeners added mid-call (listen-in) are heard.
        self.listeners: list[AudioListener] = []

    def attach(self, send: Callable[[bytes, WSMsgType], Awaitable[None]]) -> None:
        """The raw Twilio send (the call gives it once the stream has started)."""
        self._send = send

    @property
    def idle(self) -> bool:
        return not self.state.playing

    async def wait_played(self, timeout: float) -> bool:
        """Until the assistant's last words have played; False after `timeout`. Realtime:
        until nothing sent is unplayed. Continuous output: until the model has been quiet for
        QUIET (counted from now at the earliest), then until what was sent by then has
        played."""
        try:
            async with asyncio.timeout(timeout):
                if not self.continuous:
                    await self._idle.wait()
                    return True
                loop = asyncio.get_running_loop()
                asked = loop.time()
                while (wait := max(self._spoke_at, asked) + QUIET - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._sent_played()
        except TimeoutError:
            return False
        return True

    async def _sent_played(self) -> None:
        """A mark now, then its echo: what was sent so far has played (or was cleared)."""
        await self._flush()
        mark = self.state.last_mark
        if mark is None:
            return
        echo = asyncio.get_running_loop().create_future()
        self._waiters.append((mark, echo))
        try:
            await echo
        finally:
            self._waiters = [(m, f) for m, f in self._waiters if f is not echo]

    async def play(self, event: ev.AudioDelta) -> int:
        """Send one delta to the caller (split and marked); the bytes of audio sent (0: it was
        dropped)."""
        state = self.state
        if state.dropped(event.response_id) or self.muted or self.holding:
            return 0
        if self.held is not None:
            self.held.append(event)
            return 0
        send = self._send
        assert send is not None
        sid = self.call.stream_sid
        item_id, delta = event.item_id, event.delta
        if item_id != self._item:  # a new item: the first audio of a reply?
            self._new_item(event.response_id, item_id)
        self._idle.clear()
        sent = 0
        listeners = self.listeners
        continuous = self.continuous
        try:
            for piece in (delta,) if len(delta) <= MARK_CHARS else split(delta):
                nbytes = decoded_length(piece)
                if continuous:
                    state.sent(item_id, nbytes)
                else:
                    mark = state.add(item_id, nbytes)
                    if mark is not None:
                        await send(tw.mark_frame(sid, mark), TEXT)
                await send(tw.media_frame(sid, piece), TEXT)
                sent += nbytes
                for listener in listeners:
                    listener.on_assistant_audio(piece)
        except ConnectionError:  # the caller's side went away mid-send: a hang-up
            raise CallEnds(hung_up("Twilio stream closed (caller gone)")) from None
        # 20 ms frames of audio (160 bytes), however the model cuts its deltas
        self.call.record.frames_out += (sent + 159) // 160
        return sent

    def hold(self) -> None:
        """Keep the model's audio back from now on (nothing is cut: what was sent plays)."""
        if self.held is None:
            self.held = []

    async def release(self, play: bool = True) -> None:
        """Play what was kept back, in order (`play`; else drop it), and let the model's
        audio through again."""
        held, self.held = self.held, None
        if held and play:
            for event in held:
                await self.play(event)
            await self._flush()

    async def cut(self) -> None:
        """The bridge cuts the assistant off (an answering machine answered): audio kept back
        is dropped and the model told none of it was heard; audio playing is cleared and the
        playing item truncated at what was heard, as for a barge-in; the rest of the reply in
        progress is dropped. Nothing is published: the caller did not speak."""
        held, self.held = self.held, None
        unheard: dict[str, None] = {}
        for event in held or ():
            if event.item_id not in unheard and not self.state.dropped(event.response_id):
                unheard[event.item_id] = None
        cut = self.state.on_speech_started()  # the response in progress: its audio dropped
        self._check_idle()
        if cut is not None:
            await self.call.send_to_caller(tw.clear_frame(self.call.stream_sid))
            for listener in self.listeners:
                listener.on_clear()
            await self.call.model.truncate(cut.item_id, cut.audio_end_ms)
            unheard.pop(cut.item_id, None)
            self._heard(cut.item_id, cut.audio_end_ms)
        for item_id in unheard:
            await self.call.model.truncate(item_id, 0)
            self._heard(item_id, 0)

    def _heard(self, item_id: str, heard_ms: int) -> None:
        """The conversation says what the caller heard of an assistant turn the bridge cut."""
        conversation = self.call.conversation
        for entry in conversation:
            if isinstance(entry, AssistantTurn) and entry.item_id == item_id:
                entry.interrupted, entry.heard_ms = True, heard_ms
                conversation.changed()

    def _new_item(self, response_id: str | None, item_id: str) -> None:
        """Audio of another item from now on: the start of a reply, unless its response has
        begun already ("": GPT-Live's output before its first turn)."""
        self._item = item_id
        key = response_id or item_id
        if item_id and key not in self._started:
            self._started.add(key)
            latency = self.call.latency.reply_started()
            self.call.publish(ReplyStarted(response_id, item_id, None if latency is None
                                           else round(latency * 1000, 1)))

    def forget(self) -> None:
        """A new model session: the old one's items cannot be truncated any more."""
        self.state.forget()
        self._started.clear()
        self._item = None
        self._check_idle()

    async def clear(self) -> None:
        """The bridge itself cuts what is playing (an operator takes over, a hang-up): clear
        Twilio's buffer; nothing is truncated (the model will be told in words if need be)."""
        if self._send is None:
            return
        self.state.forget()
        self._item = None
        self._check_idle()
        await self.call.send_to_caller(tw.clear_frame(self.call.stream_sid))
        for listener in self.listeners:
            listener.on_clear()

    async def _flush(self) -> None:
        mark = self.state.flush()
        if mark is not None and self._send is not None:
            await self._send(tw.mark_frame(self.call.stream_sid, mark), TEXT)

    def _check_idle(self) -> None:
        if not self.state.playing:
            self._idle.set()
        for mark, echo in self._waiters:
            if not echo.done() and self.state.played_up_to(mark):
                echo.set_result(None)

    def mark_played(self, name: str) -> None:
        self.state.on_mark(name)
        self._check_idle()

    async def on_model(self, event: ev.ModelEvent) -> None:
        """The model events playback follows (the call hands them over before the features)."""
        if isinstance(event, ev.AudioDone):
            await self._flush()
        elif isinstance(event, ev.ResponseCreated):
            self.state.on_response_created(event.response_id)
        elif isinstance(event, ev.ResponseDone):
            await self._flush()
            self.state.on_response_done(event.response_id)
            self._started.discard(event.response_id)
            self._check_idle()
        elif isinstance(event, ev.SpeechStarted):
            if not self.continuous:  # GPT-Live yields by itself (ModelYielded)
                await self._on_speech_started()
        elif isinstance(event, ev.TranscriptDelta):
            if event.role == "assistant" and self.continuous:
                self._spoke_at = asyncio.get_running_loop().time()
                # GPT-Live's first words of a turn come right after the audio that carries
                # them, which is already on its way: the reply started now, not at the next
                # audio (the rest of the turn's audio has this item id)
                if event.item_id != self._item:
                    self._new_item(None, event.item_id)
        elif isinstance(event, ev.ModelYielded):
            self.state.interruptions += 1
            self.call.log.info("barge-in: the model went quiet after %d ms of %s as the caller "
                               "spoke", event.heard_ms, event.item_id)
            self.call.publish(BargeIn(event.item_id, event.heard_ms))

    async def _on_speech_started(self) -> None:
        if self.held is not None:
            return  # nothing of the assistant's is playing, and the model only listens
        cut = self.state.on_speech_started()
        self._check_idle()
        if cut is None:
            return
        await self.call.send_to_caller(tw.clear_frame(self.call.stream_sid))
        for listener in self.listeners:
            listener.on_clear()
        await self.call.model.truncate(cut.item_id, cut.audio_end_ms)
        self.call.log.info("barge-in: cleared playback, truncated %s at %d ms",
                           cut.item_id, cut.audio_end_ms)
        self.call.publish(BargeIn(cut.item_id, cut.audio_end_ms))
