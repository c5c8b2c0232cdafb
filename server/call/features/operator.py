"""An operator's powers in a call (the console): whisper to the model, take the call over and
hand it back, transfer it, hang up. Every model backend gets them through the `ModelSession`
interface; the console's routes (server/console/live.py) call these methods on the instance
that holds the call.

Whisper: a `Whisper` entry in the conversation and a system message to the model
(`add_text("system")`); "say it now" also asks for a response through the gate, which sends it
once the current one is done.

Take over: the model's audio stops reaching the caller (what is playing is cleared, then
muted), the gate holds every response and the model is told to listen only. The operator's
audio (the talk socket) goes to the caller as Twilio media frames, and, mixed into the caller's
(mu-law decoded, added, encoded: only while taken over, on the caller's 20 ms clock), to the
model, so its context has the operator's words. Hand back undoes all that and tells the model,
in a system message, which of the turns it heard were the operator's. A take-over whose talk
socket sends nothing for TALK_GRACE seconds (TALK_CONNECT_GRACE before its first audio) is
handed back by itself: a closed browser never leaves a caller alone with a muted assistant.

Who said it: the model hears one mixed input and transcribes one turn at a time. For every mixed
20 ms frame the mixer notes who was voiced in it (the caller, the operator, both); a turn goes to
whoever was voiced in more of its frames (its span from the model's speech start/stop on the
session's audio timeline, else the frames since the previous turn), ties to the caller. The
operator's turns become `OperatorTurn`s and `transcript` events with role `operator` (the
transcript feature does that on `SpeakerAttributed`). A turn in which both spoke keeps every
word under the one who spoke more of it: the model's transcription cannot be split.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, cast

from server.call.conversation import OperatorTurn, Whisper
from server.call.ending import Ending, EndKind
from server.call.events import HandBack, OperatorAction, SpeakerAttributed, TakeOver, WhisperSent
from server.call.features.base import CallControl, Feature
from server.models import events as ev
from server.sounds import ulaw_byte
from server.wire import twilio as tw

if TYPE_CHECKING:
    from server.call.model_link import Send, SendWrapper
    from server.call.playback import AudioListener

FRAME_MS = 20
MIX_BUFFER_BYTES = 3200  # operator audio waiting to be mixed in: 400 ms, the oldest dropped
MAX_TALK_BYTES = 1600  # one talk message: 200 ms at most (the console sends 20 ms)
TALK_CONNECT_GRACE = 10.0  # after a take-over, the talk socket's first audio must come by then
TALK_GRACE = 3.0  # a talk socket silent this long (dropped) hands the call back
LOUD_SAMPLE = 1000  # |linear sample| above which a sample counts as loud ...
VOICED_SHARE = 8  # ... and a frame with more than 1/8 of its samples loud is someone speaking
KEEP_FRAMES = 3000 * 2  # who-spoke-when kept for 2 minutes of the model's input
MAX_WHISPER = 2000
SAY_IT_NOW = "Act now on the operator's instruction you were just given."
CALLER, OPERATOR = 1, 2  # bits of a frame's activity


def ulaw_linear(byte: int) -> int:
    """One G.711 mu-law byte -> a signed 16-bit sample."""
    byte = ~byte & 0xFF
    magnitude = (((byte & 0x0F) << 3) + 0x84) << ((byte & 0x70) >> 4)
    return 0x84 - magnitude if byte & 0x80 else magnitude - 0x84


_LOUD = bytes(1 if abs(ulaw_linear(b)) > LOUD_SAMPLE else 0 for b in range(256))


def voiced(frame: bytes) -> bool:
    """Someone is speaking in this mu-law audio (bytes.translate: the per-sample work in C)."""
    return frame.translate(_LOUD).count(1) * VOICED_SHARE > len(frame)


def _mix_table() -> bytes:
    """mu-law a + mu-law b -> mu-law, for every pair (index a << 8 | b): decode, add, clip,
    encode, done once at startup (64 KB, ~30 ms) so mixing is one lookup per sample."""
    linear = [ulaw_linear(b) for b in range(256)]
    return bytes(ulaw_byte(max(-32768, min(32767, x + y))) for x in linear for y in linear)


_MIX = _mix_table()


def mix(a: bytes, b: bytes) -> bytes:
    """Two mu-law tracks added; the longer one's tail as it is."""
    table = _MIX
    n = min(len(a), len(b))
    head = bytes([table[x << 8 | y] for x, y in zip(a[:n], b[:n], strict=True)])
    return head + (a[n:] if len(a) > n else b[n:])


class Activity:
    """Who was voiced in each 20 ms frame of the model's input while an operator had the call,
    by frame index (`record.frames_in`); the last KEEP_FRAMES frames."""

    def __init__(self, keep: int = KEEP_FRAMES) -> None:
        self.base = 0
        self.flags = bytearray()
        self._keep = keep

    @property
    def end(self) -> int:
        return self.base + len(self.flags)

    def note(self, index: int, flags: int) -> None:
        if not self.flags or index - self.end > self._keep or index < self.base:
            self.base, self.flags = index, bytearray()
        elif index > self.end:
            self.flags.extend(bytes(index - self.end))  # frames nobody noted: nobody spoke
        elif index < self.end:
            self.flags[index - self.base] |= flags  # the same frame again (a gap send)
            return
        self.flags.append(flags)
        if len(self.flags) > self._keep:
            drop = len(self.flags) - self._keep // 2
            del self.flags[:drop]
            self.base += drop

    def count(self, start: int, end: int) -> tuple[int, int, int]:
        """(frames the caller was voiced in, the operator, frames known) in [start, end)."""
        lo, hi = max(start, self.base) - self.base, min(end, self.end) - self.base
        if hi <= lo:
            return 0, 0, 0
        span = self.flags[lo:hi]
        caller = sum(1 for f in span if f & CALLER)
        operator = sum(1 for f in span if f & OPERATOR)
        return caller, operator, hi - lo


class Mixer:
    """Takes the operator's audio as it comes and mixes it into the caller's frames on their
    way to the model (the caller's 20 ms clock paces it); notes who was voiced in each."""

    def __init__(self, activity: Activity, frame_index: Callable[[], int],
                 limit: int = MIX_BUFFER_BYTES) -> None:
        self._pending = bytearray()
        self._limit = limit
        self._activity = activity
        self._frame_index = frame_index
        self.dropped = 0  # operator bytes dropped because the caller's side ran slower
        self.mixed = 0  # frames with operator audio in them

    def add(self, ulaw: bytes) -> None:
        pending = self._pending
        pending += ulaw
        if len(pending) > self._limit:
            drop = len(pending) - self._limit
            self.dropped += drop
            del pending[:drop]

    def mix(self, payload: str) -> str:
        """One caller frame (base64 mu-law) -> what the model gets."""
        try:
            caller = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return payload  # not ours to judge: the model refuses it as it would anyway
        pending = self._pending
        operator = bytes(pending[:len(caller)])
        del pending[:len(caller)]
        flags = (CALLER if voiced(caller) else 0) | (OPERATOR if operator and voiced(operator)
                                                    else 0)
        self._activity.note(self._frame_index(), flags)
        if not operator:
            return payload
        self.mixed += 1
        return base64.b64encode(mix(caller, operator)).decode()

    def wrap(self, send: Send) -> Send:
        """The model link's send, with the operator mixed in (see `ModelLink.route`)."""
        mixed = self.mix

        async def send_mixed(payload: str) -> None:
            await send(mixed(payload))

        return send_mixed


class OperatorCall(CallControl, Protocol):
    """What the operator's powers need of the call beyond `CallControl` (thin `Call` methods)."""

    async def mute_assistant(self, on: bool) -> None: ...

    def route_caller_audio(self, wrap: SendWrapper | None) -> None: ...

    def input_frame(self, audio_ms: int | None = None) -> int: ...

    @property
    def audio_listeners(self) -> list[AudioListener]: ...


class Busy(Exception):
    """Another operator has the call."""

    def __init__(self, operator: str) -> None:
        super().__init__(f"{operator} has taken this call over")
        self.operator = operator


class NotTakenOver(Exception):
    """The call is not taken over (by this operator)."""


class BadTalk(Exception):
    """A talk message that is not µ-law audio in base64 (or too long): `str()` says why."""


@dataclass
class TakenOver:
    """One take-over, from `take_over` to its hand-back."""

    operator: str
    at: float  # record.elapsed() when it began
    mixer: Mixer
    began: float = field(default_factory=time.monotonic)
    last_audio: float | None = None  # monotonic time of the operator's latest audio
    frames: int = 0  # talk messages played to the caller
    released: asyncio.Event = field(default_factory=asyncio.Event)


class OperatorFeature(Feature):
    name = "operator"
    model_events: ClassVar[tuple[type, ...]] = (
        ev.SpeechStarted, ev.SpeechStopped, ev.TranscriptDelta, ev.CallerTranscript)

    def __init__(self, call: OperatorCall) -> None:
        super().__init__(call)
        self.ops = call
        self.control: TakenOver | None = None
        self.talk_grace = TALK_GRACE
        self.connect_grace = TALK_CONNECT_GRACE
        self._activity: Activity | None = None  # from the first take-over on
        self._spans: dict[str, int] = {}  # input item -> its first frame (speech started)
        self._decided: dict[str, str | None] = {}  # input item -> its operator (None: caller)
        self._last_end = 0  # the frame where the last decided turn ended
        self._listeners: list[AudioListener] = []  # listen-in taps added through here

    @classmethod
    def factory(cls) -> Callable[[CallControl], Feature]:
        def make(call: CallControl) -> Feature:
            return cls(cast("OperatorCall", call))  # the call is a `Call`, which is one
        return make

    async def on_session_ready(self, first: bool) -> None:
        """A new model session (a reconnect) while an operator has the call: it listens only
        too (the gate and the muted playback outlive sessions; the session's settings do not)."""
        if self.control is not None:
            await self.call.model.listen_only(True)

    @property
    def taken_over_by(self) -> str | None:
        control = self.control
        return control.operator if control is not None else None

    # --- whisper ---

    async def whisper(self, operator: str, text: str, respond: bool) -> None:
        call = self.call
        call.conversation.add(Whisper(call.record.elapsed(), text, operator))
        await call.model.add_text("system", text)
        call.record.add_operator_action(operator, "whisper",
                                        text + (" (say it now)" if respond else ""))
        call.publish(WhisperSent(operator, text, respond))
        call.log.info("operator %s whispered (%d characters%s)", operator, len(text),
                      ", say it now" if respond else "")
        if respond:
            # Realtime: a plain request (the instruction is in the conversation); a model that
            # decides its own turns acts only on a request with words.
            await call.request_response(
                "whisper", SAY_IT_NOW if call.model.decides_turns else None)

    # --- take over, hand back ---

    async def take_over(self, operator: str) -> TakenOver:
        """The operator has the call from now on; Busy if another one has it (the same one
        taking it again changes nothing)."""
        control = self.control
        if control is not None:
            if control.operator != operator:
                raise Busy(control.operator)
            return control
        call = self.ops
        if self._activity is None:
            self._activity = Activity()
        control = self.control = TakenOver(operator, call.record.elapsed(),
                                           Mixer(self._activity, call.input_frame))
        await call.mute_assistant(True)
        call.route_caller_audio(control.mixer.wrap)
        await call.model.listen_only(True)
        call.record.add_operator_action(operator, "takeover")
        call.publish(TakeOver(operator))
        call.log.info("operator %s took the call over", operator)
        call.spawn(self._watch_talk(control), "operator-talk-watch")
        return control

    async def hand_back(self, operator: str, why: str | None = None) -> None:
        """The assistant has the call again; NotTakenOver if nobody had it. `operator` is who
        handed it back (any operator may; `why` when the bridge did, for them)."""
        control = self.control
        if control is None:
            raise NotTakenOver("the call is not taken over")
        self.control = None
        control.released.set()
        call = self.ops
        call.route_caller_audio(None)
        await call.mute_assistant(False)
        await call.model.listen_only(False)
        await call.model.add_text("system", self._handed_back_note(control))
        call.record.add_operator_action(operator, "handback", why)
        call.publish(HandBack(operator))
        call.log.info("the call is handed back to the assistant (%s)%s",
                      operator, f": {why}" if why else "")

    def _handed_back_note(self, control: TakenOver) -> str:
        """What the model is told at hand-back: that it only listened, and whose turns were
        whose (it heard the operator as the caller's side)."""
        said = [e.text for e in self.call.conversation
                if isinstance(e, OperatorTurn) and e.at >= control.at and e.text]
        note = (f"An operator ({control.operator}) had taken this call over and talked with "
                "the caller themselves; you only listened. The call is yours again now: go on "
                "helping the caller, knowing what was said.")
        if said:
            quoted = " / ".join(f'"{text}"' for text in said[-10:])
            note += f" These turns you heard were the operator's, not the caller's: {quoted}"
        return note[:4000]

    async def _watch_talk(self, control: TakenOver) -> None:
        """Hand back when the operator's audio stops: nothing within `connect_grace` of the
        take-over, or nothing for `talk_grace` since it last came (the socket dropped)."""
        while self.control is control:
            if control.last_audio is None:
                due = control.began + self.connect_grace
            else:
                due = control.last_audio + self.talk_grace
            wait = due - time.monotonic()
            if wait <= 0:
                break
            try:
                async with asyncio.timeout(wait):
                    await control.released.wait()
                return  # handed back meanwhile
            except TimeoutError:
                continue
        if self.control is control:
            reason = ("no audio from the operator's microphone" if control.last_audio is None
                      else "the operator's audio connection dropped")
            await self.hand_back(control.operator, reason)

    # --- the operator's voice ---

    async def operator_audio(self, operator: str, payload: str) -> None:
        """One talk message (base64 µ-law): to the caller now, and into the model's input.
        NotTakenOver when this operator does not have the call; BadTalk for bad audio."""
        control = self.control
        if control is None or control.operator != operator:
            raise NotTakenOver("the call is not taken over by this operator")
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadTalk("the payload is not base64") from None
        if not audio or len(audio) > MAX_TALK_BYTES:
            raise BadTalk(f"the payload is {len(audio)} bytes (1 to {MAX_TALK_BYTES})")
        control.last_audio = time.monotonic()
        control.frames += 1
        call = self.ops
        await call.send_to_caller(tw.media_frame(call.stream_sid, payload))
        for listener in call.audio_listeners:  # what the caller hears: recording, listen-in
            own = getattr(listener, "on_operator_audio", None)  # (a listener may tell who)
            if own is not None:
                own(operator, payload)
            else:
                listener.on_assistant_audio(payload)
        control.mixer.add(audio)

    # --- hang up, transfer, listen ---

    def hang_up(self, operator: str) -> None:
        call = self.call
        call.log.info("hanging up on an operator's request (%s)", operator)
        call.record.add_operator_action(operator, "hangup")
        call.publish(OperatorAction(operator, "hangup"))
        call.end(Ending(EndKind.ADMIN_HUNG_UP, f"operator {operator} hung up the call",
                        tw.HANGUP))

    def transfer(self, operator: str, target: str, number: str) -> None:
        call = self.call
        call.log.info("transferring to %s on an operator's request (%s)", target, operator)
        call.record.add_operator_action(operator, "transfer", target)
        call.publish(OperatorAction(operator, "transfer", target))
        call.end(Ending(EndKind.TRANSFERRED, f"transferred to {target} by operator {operator}",
                        tw.dial(number)))

    def listening(self, operator: str) -> None:
        """An operator started listening in (recorded once per listen)."""
        self.call.record.add_operator_action(operator, "listen")
        self.call.publish(OperatorAction(operator, "listen"))

    def add_listener(self, listener: AudioListener) -> None:
        """A listen-in tap hears the call from now on; it is told (`close`) when the call
        ends, if it has a close."""
        self.ops.audio_listeners.append(listener)
        self._listeners.append(listener)

    def remove_listener(self, listener: AudioListener) -> None:
        listeners = self.ops.audio_listeners
        if listener in listeners:
            listeners.remove(listener)
        if listener in self._listeners:
            self._listeners.remove(listener)

    # --- whose turn was it ---

    async def on_model(self, event: ev.ModelEvent) -> None:
        if self._activity is None:  # never taken over: every turn is the caller's
            return
        if isinstance(event, ev.SpeechStarted):
            self._spans[event.item_id] = self.ops.input_frame(event.audio_start_ms)
            if len(self._spans) > 100:
                self._spans.pop(next(iter(self._spans)))
        elif isinstance(event, ev.SpeechStopped):
            self._decide(event.item_id, self.ops.input_frame(event.audio_end_ms))
        elif isinstance(event, ev.TranscriptDelta):
            if event.role == "caller":
                self._decide(event.item_id, self.ops.input_frame())
        elif isinstance(event, ev.CallerTranscript):
            self._decide(event.item_id, self.ops.input_frame())

    def _decide(self, item_id: str, end: int) -> None:
        if item_id in self._decided:
            return
        activity = self._activity
        assert activity is not None
        start = self._spans.pop(item_id, self._last_end)
        caller, operator, known = activity.count(start, max(end, start + 1))
        who = None
        if known and operator > caller:
            who = self.taken_over_by or self._last_operator()
        self._decided[item_id] = who
        if len(self._decided) > 200:
            self._decided.pop(next(iter(self._decided)))
        self._last_end = max(self._last_end, end)
        if who is not None:
            self.call.publish(SpeakerAttributed(item_id, who))

    def _last_operator(self) -> str:
        """Who had the call last (a turn transcribed after the hand-back)."""
        for action in reversed(self.call.record.operator_actions):
            if action.get("action") == "takeover":
                return str(action.get("operator") or "operator")
        return "operator"

    async def on_end(self, ending: Ending) -> None:
        control, self.control = self.control, None
        if control is not None:
            control.released.set()
        for listener in list(self._listeners):
            close = getattr(listener, "close", None)
            if callable(close):
                close()
        self._listeners.clear()
