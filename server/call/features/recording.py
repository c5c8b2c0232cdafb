"""RECORD_CALLS=on: one stereo WAV per call, as the caller heard it, written as the call goes.

Left is the caller, right the assistant, 16-bit PCM at 8 kHz. Per frame this only keeps the
base64 payload (no decoding on the media path). The assistant's audio is placed where the caller
heard it: Twilio plays what we send after what is already queued, in real time, and the caller's
frames arrive on a 20 ms clock, so a piece starts at max(end of the queued audio, caller audio so
far). A barge-in clears Twilio's buffer: what was queued past that moment is cut, since the caller
never heard it.

Memory does not grow with the call: every `flush_bytes` of caller audio (5 s) what is final is
handed to the recorder's one writer thread, which decodes it and appends it to
`<CallSid>.<id>.wav.part`. One thread, not asyncio's pool: a batch holds the GIL for about half a
millisecond, and the relay on the event loop's thread must never queue behind several of them at
once (with 100 recorded calls on the default pool, the relay's p99 latency went from 1.6 to 44
ms). Each call's first batch comes at a random point between 0.5 and 1.5 batches, so calls that
started together do not all write at the same moment. Final means
before the caller's clock: assistant audio queued past it may still be cut by a barge-in, so it
waits (as base64) for a later batch. When the call ends here, the part becomes `<CallSid>.wav`
by a rename, a reader never seeing a half-written file there. A call handed over to another
instance (SHUTDOWN_MODE=handover) leaves its audio so far at `<CallSid>.wav`; the instance that
resumes it joins its own part after that one (at its offset from the call's start when the
handover left a gap), so the file always holds every instance's audio.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import os
import random
import re
import struct
import uuid
import wave
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from server.call.ending import Ending, EndKind
from server.call.features.base import CallControl, Feature
from server.call.record import utc_now

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import datetime
    from typing import Any

log = logging.getLogger("server.records")
T = TypeVar("T")

RATE = 8000
ULAW_SILENCE = 0xFF
SILENCE_BYTE = bytes([ULAW_SILENCE])
BLOCK = RATE * 2  # samples per step when converting or copying audio: 2 s
FLUSH_BYTES = RATE * 5  # caller audio between two writes: 5 s (8 bytes per ms)
FRAME_BYTES = 4  # a stereo 16-bit sample
_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")  # RIFF/WAVE, a 16-byte PCM fmt chunk, data
_SAFE = re.compile(r"[^A-Za-z0-9_-]")

Piece = tuple[int, str, int, int]
"""Assistant audio: (start byte on the caller's clock, base64, lo, hi): bytes lo..hi of the
decoded payload play at start+lo..start+hi (lo > 0 once its head is written, hi cut short by a
barge-in)."""


def _ulaw_to_linear(byte: int) -> int:
    byte = ~byte & 0xFF
    magnitude = (((byte & 0x0F) << 3) + 0x84) << ((byte & 0x70) >> 4)
    return 0x84 - magnitude if byte & 0x80 else magnitude - 0x84


# mu-law -> 16-bit little-endian, as two byte tables: bytes.translate does the per-sample work in C.
_LOW = bytes(_ulaw_to_linear(b) & 0xFF for b in range(256))
_HIGH = bytes((_ulaw_to_linear(b) >> 8) & 0xFF for b in range(256))


def decoded_length(b64: str) -> int:
    """Bytes a base64 string decodes to, without decoding it."""
    n = len(b64)
    if n and b64[-1] == "=":
        return n // 4 * 3 - (2 if n > 1 and b64[-2] == "=" else 1)
    return n // 4 * 3


def stereo_pcm(left: bytes, right: bytes) -> bytes:
    """Two mu-law tracks (padded to one length with silence) -> interleaved 16-bit PCM."""
    n = max(len(left), len(right))
    left = left.ljust(n, SILENCE_BYTE)
    right = right.ljust(n, SILENCE_BYTE)
    out = bytearray(4 * n)
    out[0::4] = left.translate(_LOW)
    out[1::4] = left.translate(_HIGH)
    out[2::4] = right.translate(_LOW)
    out[3::4] = right.translate(_HIGH)
    return bytes(out)


def wav_header(frames: int) -> bytes:
    """The 44-byte header of a stereo 16-bit 8 kHz WAV holding `frames` samples per channel."""
    size = frames * FRAME_BYTES
    return _HEADER.pack(b"RIFF", 36 + size, b"WAVE", b"fmt ", 16, 1, 2, RATE, RATE * FRAME_BYTES,
                        FRAME_BYTES, 16, b"data", size)


class Recorder:
    """App-wide: where recordings go, and the tasks writing them (awaited at shutdown)."""

    def __init__(self, directory: Path, flush_bytes: int = FLUSH_BYTES,
                 stagger: bool = True) -> None:
        self.directory = directory
        self.flush_bytes = flush_bytes
        self.stagger = stagger  # False: every call's first batch after exactly flush_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recording")

    def first_flush(self) -> int:
        """Caller bytes before a call's first batch (spread: see the module's docstring)."""
        if not self.stagger:
            return self.flush_bytes
        return self.flush_bytes // 2 + random.randrange(self.flush_bytes)

    def in_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on the writer thread: disk work of every call, one at a time."""
        return asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def path_for(self, call_sid: str) -> Path:
        return self.directory.resolve() / f"{_SAFE.sub('_', call_sid) or 'call'}.wav"

    def run(self, work: Awaitable[None], path: Path) -> asyncio.Task[None]:
        """Run a write as a task owned here; a failure is logged, never raised."""
        task = asyncio.get_running_loop().create_task(self._guard(work, path),
                                                      name=f"recording {path.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _guard(work: Awaitable[None], path: Path) -> None:
        try:
            await work
        except Exception:
            log.exception("cannot write recording %s", path)

    async def wait_idle(self) -> None:
        """Wait until no write is running (including ones started meanwhile)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Wait for recordings still being written (each step takes milliseconds)."""
        await self.wait_idle()
        self._writer.shutdown(wait=False)  # idle now: its thread ends

    def feature(self) -> Callable[[CallControl], Feature]:
        return lambda call: Recording(call, self)


class Track:
    """This instance's part of a call's recording, on disk: appended to in batches, from one
    thread at a time (the feature keeps one write running per call), never held in memory.

    A failure to write is logged once; the rest of the call's audio is then dropped."""

    def __init__(self, final: Path, part_id: str) -> None:
        self.final = final
        self.part = final.with_name(f"{final.stem}.{part_id}.wav.part")
        self.joined = final.with_name(f"{final.stem}.{part_id}.join.wav.part")
        self.written = 0  # bytes per channel (samples) in the file so far
        self.failed = False
        self.bad_pieces = 0  # payloads that were not base64: recorded as silence

    def write(self, caller: list[str], assistant: list[Piece], upto: int) -> None:
        """Append the audio up to `upto` on the caller's clock: the caller's payloads (exactly
        the audio after what is written) and the assistant pieces that play in that span."""
        if self.failed or upto <= self.written:
            return
        length = upto - self.written
        left = b"".join(self._decode(p, decoded_length(p)) for p in caller)
        right = bytearray(SILENCE_BYTE) * length
        for start, payload, lo, hi in assistant:
            audio = self._decode(payload, decoded_length(payload))[lo:hi]
            at = start + lo - self.written
            if at < 0:  # never by construction; a wrong index must not move the audio
                audio, at = audio[-at:], 0
            right[at:at + len(audio)] = audio
        del right[length:]
        try:
            if self.written == 0:
                self.part.parent.mkdir(parents=True, exist_ok=True)
                with self.part.open("wb") as out:
                    out.write(wav_header(0))
            with self.part.open("ab") as out:
                # In blocks: each C-level step holds the GIL only briefly, so the event loop's
                # thread (relaying other calls' audio) never waits long on this one.
                for at in range(0, length, BLOCK):
                    out.write(stereo_pcm(left[at:at + BLOCK], bytes(right[at:at + BLOCK])))
        except OSError as e:
            self._fail(e)
            return
        self.written = upto

    def finish(self, caller: list[str], assistant: list[Piece], upto: int,
               offset: float) -> None:
        """Write the rest, then make the recording at `final` hold it: renamed there, or joined
        after the audio another instance left there (a handed-over call), starting `offset`
        seconds after the call started if that leaves a gap."""
        self.write(caller, assistant, upto)
        if self.bad_pieces:
            log.warning("recording %s: %d audio payload(s) were not base64 (kept as silence)",
                        self.final.name, self.bad_pieces)
        if self.failed or self.written == 0:
            return
        try:
            with self.part.open("r+b") as out:
                out.write(wav_header(self.written))
            if not self.final.exists():
                os.replace(self.part, self.final)
                return
            try:
                self._join(offset)
            except (wave.Error, EOFError) as e:  # not a recording of ours: keep both files
                aside = self.part.with_name(self.part.name.removesuffix(".part"))
                os.replace(self.part, aside)
                self.joined.unlink(missing_ok=True)
                log.warning("recording %s: cannot add to it (%s); this part is in %s",
                            self.final, e, aside.name)
        except OSError as e:
            self._fail(e)

    def _join(self, offset: float) -> None:
        with wave.open(str(self.final), "rb") as before:
            if (before.getnchannels(), before.getsampwidth(), before.getframerate()) != (
                    2, 2, RATE):
                raise wave.Error(f"{self.final.name} is not a recording made here")
            with self.joined.open("wb") as out:
                out.write(wav_header(0))
                frames = 0
                while chunk := before.readframes(BLOCK):
                    out.write(chunk)
                    frames += len(chunk) // FRAME_BYTES
                place = max(frames, round(offset * RATE))
                silence = place - frames
                for at in range(0, silence, BLOCK):
                    out.write(bytes(FRAME_BYTES * min(BLOCK, silence - at)))
                with self.part.open("rb") as mine:
                    mine.seek(_HEADER.size)
                    while chunk := mine.read(BLOCK * FRAME_BYTES):
                        out.write(chunk)
                out.seek(0)
                out.write(wav_header(place + self.written))
        os.replace(self.joined, self.final)
        self.part.unlink()

    def _decode(self, payload: str, length: int) -> bytes:
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):  # ValueError: not even ASCII
            audio = b""
        if len(audio) != length:  # the clock counted `length` bytes: keep it in step
            self.bad_pieces += 1
            return SILENCE_BYTE * length
        return audio

    def _fail(self, error: Exception) -> None:
        self.failed = True
        reason = (error.strerror if isinstance(error, OSError) else None) or error
        log.warning("cannot write recording %s: %s", self.final, reason)
        for path in (self.part, self.joined):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


class Recording(Feature):
    name = "recording"
    wants_audio = True

    def __init__(self, call: CallControl, recorder: Recorder) -> None:
        super().__init__(call)
        self.recorder = recorder
        self.caller: list[str] = []  # caller payloads not yet handed to the writer
        self.assistant: list[Piece] = []  # assistant audio not yet handed to the writer
        self.clock = 0  # caller audio bytes so far: 8 per ms, the call's real-time clock
        self.queued_until = 0  # where the audio already sent to Twilio stops playing
        self.writing: asyncio.Task[None] | None = None  # the batch being written, if any
        self._flush_at = recorder.first_flush()
        self._track: Track | None = None
        self._began: datetime | None = None  # when this instance's first caller frame came

    def on_caller_audio(self, payload: str) -> None:
        self.caller.append(payload)
        self.clock += decoded_length(payload)
        if self.clock >= self._flush_at:
            self.flush()

    def on_assistant_audio(self, payload: str) -> None:
        start = max(self.queued_until, self.clock)
        length = decoded_length(payload)
        self.assistant.append((start, payload, 0, length))
        self.queued_until = start + length

    def on_clear(self) -> None:
        self.cut()

    def cut(self) -> None:
        """Twilio's buffer was cleared now: drop what had not played yet."""
        now, pieces = self.clock, self.assistant
        while pieces and pieces[-1][0] + pieces[-1][2] >= now:
            pieces.pop()
        if pieces:
            start, payload, lo, hi = pieces[-1]
            if start + hi > now:
                pieces[-1] = (start, payload, lo, now - start)
        self.queued_until = now

    def flush(self) -> None:
        """Hand what is final (everything before the caller's clock) to a thread to write.
        Skipped while the previous batch is still being written: the next frame tries again."""
        if self.writing is not None and not self.writing.done():
            return
        upto = self.clock
        self._flush_at = upto + self.recorder.flush_bytes
        caller, assistant = self._take(upto)
        track = self._start_track()
        write = self.recorder.in_thread(track.write, caller, assistant, upto)
        self.writing = self.recorder.run(write, track.final)

    def _take(self, upto: int) -> tuple[list[str], list[Piece]]:
        """The caller's payloads so far and the assistant audio before `upto`, no longer held
        here (a piece that plays across `upto` stays, for what comes after it)."""
        caller, self.caller = self.caller, []
        ready: list[Piece] = []
        later: list[Piece] = []
        for piece in self.assistant:
            start, payload, lo, hi = piece
            if start + hi <= upto:
                ready.append(piece)
            elif start + lo < upto:
                ready.append((start, payload, lo, upto - start))
                later.append((start, payload, upto - start, hi))
            else:
                later.append(piece)
        self.assistant = later
        return caller, ready

    def _start_track(self) -> Track:
        if self._track is None:
            # The caller's frames come in real time: the first came `clock` bytes ago.
            self._began = utc_now() - timedelta(seconds=self.clock / RATE)
            record = self.call.record
            self._track = Track(self.recorder.path_for(record.call_sid), uuid.uuid4().hex[:12])
            # Named from the first batch on: a resumed call's record, saved while it goes on,
            # keeps pointing at the audio recorded before the handover.
            record.recording = str(self._track.final)
            record.touch()
        return self._track

    async def on_end(self, ending: Ending) -> None:
        record = self.call.record
        path = self.recorder.path_for(record.call_sid)
        if self._track is None and not self.caller and not self.assistant:
            # Nothing recorded here; a call handed over to us keeps what was recorded before.
            if await self.recorder.in_thread(path.exists):
                record.recording = str(path)
                record.touch()
            return
        upto = max([self.clock, *(start + hi for start, _, _, hi in self.assistant)])
        caller, assistant = self._take(upto)
        track = self._start_track()
        assert self._began is not None
        offset = (self._began - record.started_at).total_seconds()
        task = self.recorder.run(self._finish(self.writing, track, caller, assistant, upto,
                                              offset), track.final)
        self.writing = task
        if ending.kind == EndKind.HANDOVER:
            # The next instance joins its audio after ours: it must find ours in place.
            await asyncio.shield(task)

    async def _finish(self, previous: asyncio.Task[None] | None, track: Track,
                      caller: list[str], assistant: list[Piece], upto: int,
                      offset: float) -> None:
        if previous is not None:
            await previous  # never raises: Recorder.run logs failures
        await self.recorder.in_thread(track.finish, caller, assistant, upto, offset)
