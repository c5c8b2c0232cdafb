"""RECORD_CALLS=on: one stereo WAV per call, as the caller heard it.

Left is the caller, right the assistant, 16-bit PCM at 8 kHz. Per frame this only keeps the
base64 payload (no decoding on the media path). The assistant's audio is placed where the caller
heard it: Twilio plays what we send after what is already queued, in real time, and the caller's
frames arrive on a 20 ms clock, so a piece starts at max(end of the queued audio, caller audio so
far). A barge-in clears Twilio's buffer: what was queued past that moment is cut, since the caller
never heard it. The file is built and written in a thread after the call.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import wave
from pathlib import Path
from typing import TYPE_CHECKING

from server.call.ending import Ending
from server.call.features.base import CallControl, Feature

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("server.records")

RATE = 8000
ULAW_SILENCE = 0xFF
SILENCE_BYTE = bytes([ULAW_SILENCE])
BLOCK = RATE * 2  # samples per step when building the file: 2 s
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


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
    left = left.ljust(n, bytes([ULAW_SILENCE]))
    right = right.ljust(n, bytes([ULAW_SILENCE]))
    out = bytearray(4 * n)
    out[0::4] = left.translate(_LOW)
    out[1::4] = left.translate(_HIGH)
    out[2::4] = right.translate(_LOW)
    out[3::4] = right.translate(_HIGH)
    return bytes(out)


class Recorder:
    """App-wide: where recordings go, and the threads writing them (awaited at shutdown)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._tasks: set[asyncio.Task[None]] = set()

    def path_for(self, call_sid: str) -> Path:
        return self.directory.resolve() / f"{_SAFE.sub('_', call_sid) or 'call'}.wav"

    def submit(self, path: Path, caller: list[str],
               assistant: list[tuple[int, str, int]]) -> None:
        """Write the file in a thread; the task is owned here."""
        task = asyncio.get_running_loop().create_task(
            self._write(path, caller, assistant), name=f"recording {path.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, path: Path, caller: list[str],
                     assistant: list[tuple[int, str, int]]) -> None:
        try:
            await asyncio.to_thread(write_wav, path, caller, assistant)
        except OSError as e:
            log.warning("cannot write recording %s: %s", path, e.strerror or e)
        except Exception:
            log.exception("cannot write recording %s", path)

    async def close(self) -> None:
        """Wait for recordings still being written (they take milliseconds)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def feature(self) -> Callable[[CallControl], Feature]:
        return lambda call: Recording(call, self)


def write_wav(path: Path, caller: list[str], assistant: list[tuple[int, str, int]]) -> None:
    """Build both tracks and write the file (atomically: a reader never sees half of it).

    `assistant` holds (start byte on the caller's clock, base64 piece, bytes kept or -1)."""
    left = b"".join(base64.b64decode(p) for p in caller)
    end = max((start + (keep if keep >= 0 else decoded_length(p))
               for start, p, keep in assistant), default=0)
    right = bytearray([ULAW_SILENCE]) * end
    for start, piece, keep in assistant:
        audio = base64.b64decode(piece)
        if keep >= 0:
            audio = audio[:keep]
        right[start:start + len(audio)] = audio
    length = max(len(left), len(right))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".wav.part")
    with wave.open(str(partial), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(RATE)
        # In blocks: each C-level step holds the GIL only briefly, so the event loop's thread
        # (relaying other calls' audio) never waits long on this one.
        for at in range(0, length, BLOCK):
            out.writeframes(stereo_pcm(left[at:at + BLOCK].ljust(min(BLOCK, length - at),
                                                                 SILENCE_BYTE),
                                       bytes(right[at:at + BLOCK])))
    os.replace(partial, path)


class Recording(Feature):
    name = "recording"
    wants_audio = True

    def __init__(self, call: CallControl, recorder: Recorder) -> None:
        super().__init__(call)
        self.recorder = recorder
        self.caller: list[str] = []
        self.assistant: list[tuple[int, str, int]] = []
        self.clock = 0  # caller audio bytes so far: 8 per ms, the call's real-time clock
        self.queued_until = 0  # where the audio already sent to Twilio stops playing

    def on_caller_audio(self, payload: str) -> None:
        self.caller.append(payload)
        self.clock += decoded_length(payload)

    def on_assistant_audio(self, payload: str) -> None:
        start = max(self.queued_until, self.clock)
        self.assistant.append((start, payload, -1))
        self.queued_until = start + decoded_length(payload)

    def on_clear(self) -> None:
        self.cut()

    def cut(self) -> None:
        """Twilio's buffer was cleared now: drop what had not played yet."""
        now, pieces = self.clock, self.assistant
        while pieces and pieces[-1][0] >= now:
            pieces.pop()
        if pieces:
            start, payload, keep = pieces[-1]
            length = keep if keep >= 0 else decoded_length(payload)
            if start + length > now:
                pieces[-1] = (start, payload, now - start)
        self.queued_until = now

    async def on_end(self, ending: Ending) -> None:
        record = self.call.record
        if not self.caller and not self.assistant:
            return
        path = self.recorder.path_for(record.call_sid)
        record.recording = str(path)
        record.touch()
        self.recorder.submit(path, self.caller, self.assistant)
