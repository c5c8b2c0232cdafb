"""RECORD_CALLS: the stereo WAV as the caller heard it (assistant audio queued after what was
already playing, on the caller frames' clock; cleared audio cut), written as the call goes,
and joined across the instances a handed-over call went through."""

from __future__ import annotations

import asyncio
import base64
import random
import time
import wave
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from server.call.ending import Ending, EndKind
from server.call.features.recording import Recorder, Recording, decoded_length, stereo_pcm
from server.call.record import utc_now
from server.testing.memory import measure_recording
from tests.fake_call import FakeCall

FRAME = 160  # bytes of one 20 ms caller frame


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def read_wav(path: Path) -> tuple[bytes, bytes]:
    """Left and right channels as raw 16-bit little-endian samples."""
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        frames = wav.readframes(wav.getnframes())
    left = b"".join(frames[i:i + 2] for i in range(0, len(frames), 4))
    right = b"".join(frames[i + 2:i + 4] for i in range(0, len(frames), 4))
    return left, right


def pcm(ulaw_byte: int) -> bytes:
    """One sample of a mu-law byte as the recording stores it."""
    return stereo_pcm(bytes([ulaw_byte]), b"")[:2]


def test_decoded_length_and_pcm() -> None:
    for n in range(0, 12):
        assert decoded_length(b64(bytes(n))) == n
    assert pcm(0xFF) == b"\x00\x00" and pcm(0x7F) == b"\x00\x00"  # mu-law silence
    assert pcm(0x00) == (-32124).to_bytes(2, "little", signed=True)
    assert pcm(0x80) == (32124).to_bytes(2, "little", signed=True)


async def test_assistant_audio_placed_as_heard_and_cut_at_barge_in(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "recordings")
    call = FakeCall("CArec1")
    feature = call.add(recorder.feature()(call))
    assert isinstance(feature, Recording) and feature.wants_audio
    caller_byte, a1, a2, a3, a4 = 0x10, 0x20, 0x30, 0x40, 0x50
    for _ in range(10):  # 200 ms of caller audio: the clock is at 1600 bytes
        feature.on_caller_audio(b64(bytes([caller_byte]) * FRAME))
    for byte in (a1, a2, a3):  # a reply generated faster than real time: queued back to back
        feature.on_assistant_audio(b64(bytes([byte]) * 960))
    for _ in range(5):  # 100 ms later the caller talks over it
        feature.on_caller_audio(b64(bytes([caller_byte]) * FRAME))
    feature.on_clear()  # playback cleared Twilio's buffer (the barge-in)
    for _ in range(10):
        feature.on_caller_audio(b64(bytes([caller_byte]) * FRAME))
    feature.on_assistant_audio(b64(bytes([a4]) * 480))  # the next reply starts "now"
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    await recorder.close()

    path = Path(call.record.recording or "")
    assert path == (tmp_path / "recordings" / "CArec1.wav").resolve() and path.is_file()
    left, right = read_wav(path)
    samples = len(left) // 2
    assert samples == 4000 + 480  # caller: 25 frames = 4000; the last piece ends after
    assert left[: 4000 * 2] == pcm(caller_byte) * 4000
    assert left[4000 * 2:] == pcm(0xFF) * 480  # the caller track is padded with silence
    expected = (pcm(0xFF) * 1600 + pcm(a1) * 800  # heard 100 ms of the first piece, then cut
                + pcm(0xFF) * 1600 + pcm(a4) * 480)
    assert right == expected
    assert pcm(a2) not in right and pcm(a3) not in right


async def test_a_call_without_audio_writes_nothing(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    call = FakeCall("CAsilent")
    call.add(recorder.feature()(call))
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    await recorder.close()
    assert call.record.recording is None and list(tmp_path.iterdir()) == []


async def test_an_unwritable_directory_is_logged(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    recorder = Recorder(blocker / "recordings")
    call = FakeCall("CA../../etc")
    feature = call.add(recorder.feature()(call))
    feature.on_caller_audio(b64(bytes(FRAME)))
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    await recorder.close()  # no exception escapes
    assert Path(call.record.recording or "").name == "CA______etc.wav"


# --- written as the call goes (issue 12): the same file, memory that does not grow ----------


class WholeCall:
    """The recording computed the simple way, from every piece kept to the end (what the
    feature did before it wrote as the call goes): the reference the file must equal."""

    def __init__(self) -> None:
        self.caller = bytearray()
        self.pieces: list[list[Any]] = []  # [start, audio, bytes kept]
        self.queued_until = 0

    def caller_audio(self, audio: bytes) -> None:
        self.caller += audio

    def assistant_audio(self, audio: bytes) -> None:
        start = max(self.queued_until, len(self.caller))
        self.pieces.append([start, audio, len(audio)])
        self.queued_until = start + len(audio)

    def barge_in(self) -> None:
        now = len(self.caller)
        while self.pieces and self.pieces[-1][0] >= now:
            self.pieces.pop()
        if self.pieces and self.pieces[-1][0] + self.pieces[-1][2] > now:
            self.pieces[-1][2] = now - self.pieces[-1][0]
        self.queued_until = now

    def channels(self) -> tuple[bytes, bytes]:
        end = max([len(self.caller), *(start + keep for start, _, keep in self.pieces)])
        right = bytearray(b"\xff" * end)
        for start, audio, keep in self.pieces:
            right[start:start + keep] = audio[:keep]
        left, _ = read_pcm(stereo_pcm(bytes(self.caller).ljust(end, b"\xff"), b""))
        _, right_pcm = read_pcm(stereo_pcm(b"", bytes(right)))
        return left, right_pcm


def read_pcm(frames: bytes) -> tuple[bytes, bytes]:
    left = b"".join(frames[i:i + 2] for i in range(0, len(frames), 4))
    right = b"".join(frames[i + 2:i + 4] for i in range(0, len(frames), 4))
    return left, right


@pytest.mark.parametrize("seed", range(6))
async def test_the_file_written_in_batches_equals_the_whole_call(tmp_path: Path,
                                                                 seed: int) -> None:
    """Random calls, with a batch every 50 ms of caller audio: assistant pieces queued ahead,
    played across batch boundaries, cut by barge-ins before and after a batch was written,
    and batches that wait because the previous write is still running. The file must be
    exactly what keeping everything to the end gives."""
    rng = random.Random(seed)
    recorder = Recorder(tmp_path, flush_bytes=400)
    call = FakeCall(f"CAbatch{seed}")
    feature = call.add(recorder.feature()(call))
    reference = WholeCall()
    for _step in range(600):
        roll = rng.random()
        if roll < 0.6:
            audio = bytes([rng.randrange(256)]) * rng.choice((160, 160, 160, 80, 1))
            feature.on_caller_audio(b64(audio))
            reference.caller_audio(audio)
        elif roll < 0.85:
            audio = bytes([rng.randrange(256)]) * rng.randrange(1, 1200)
            feature.on_assistant_audio(b64(audio))
            reference.assistant_audio(audio)
        elif roll < 0.92:
            feature.on_clear()  # a barge-in: playback cleared Twilio's buffer
            reference.barge_in()
        elif roll < 0.97:
            await recorder.wait_idle()  # what real time between frames does
        else:
            await asyncio.sleep(0)  # a write may have started but not finished
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    await recorder.close()
    assert read_wav(Path(call.record.recording or "")) == reference.channels()


async def test_nothing_is_at_the_final_path_until_the_call_ends(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, flush_bytes=1600, stagger=False)
    call = FakeCall("CAlive")
    feature = call.add(recorder.feature()(call))
    final = recorder.path_for("CAlive")
    for _ in range(50):  # 1 s: five batches
        feature.on_caller_audio(b64(bytes([0x10]) * FRAME))
        await recorder.wait_idle()
    (part,) = tmp_path.glob("CAlive.*.wav.part")
    assert part.stat().st_size == 44 + 4 * 8000 and not final.exists()
    assert call.record.recording == str(final)  # named while the call goes on
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    await recorder.close()
    assert list(tmp_path.iterdir()) == [final]
    assert read_wav(final)[0] == pcm(0x10) * 8000


async def test_a_60_minute_call_holds_under_a_megabyte(tmp_path: Path) -> None:
    """Bytes held (tracemalloc, threads included), not time: before, a 60-minute call held
    every frame's base64 (68 MB) and twice that while its file was written."""
    result = await measure_recording(tmp_path, minutes=60)
    assert result.path is not None
    try:
        with wave.open(str(result.path), "rb") as wav:
            assert wav.getnframes() == 60 * 60 * 8000
        assert result.held < 1_000_000, result
        assert result.peak < 1_000_000, result
        assert result.finish_peak < 1_000_000, result
    finally:
        result.path.unlink()  # 115 MB


async def test_a_handed_over_call_keeps_each_instance_audio_at_its_place(
        tmp_path: Path) -> None:
    """SHUTDOWN_MODE=handover with a shared RECORDINGS_DIR: the first instance leaves its 3 s
    at <CallSid>.wav, the second joins its 1 s after it, at its offset from the call's start:
    here the handover took about 6 s, heard as silence."""
    first = Recorder(tmp_path)
    a = FakeCall("CAmoved")
    on_a = a.add(first.feature()(a))
    for _ in range(150):
        on_a.on_caller_audio(b64(bytes([0x10]) * FRAME))
    on_a.on_assistant_audio(b64(bytes([0x20]) * 8000))  # 1 s of reply, from 3 s in
    await a.finish(Ending(EndKind.HANDOVER, "handed over to another instance"))
    final = first.path_for("CAmoved")
    assert final.is_file()  # in place before the handover's decision is written
    assert len(read_wav(final)[0]) == 2 * 32000  # 3 s of caller, then 1 s of reply

    second = Recorder(tmp_path)  # another instance
    b = FakeCall("CAmoved")
    b.record.started_at = utc_now() - timedelta(seconds=10)  # the call began 10 s ago
    began = time.monotonic()
    on_b = b.add(second.feature()(b))
    for _ in range(50):  # the caller's last second: the new stream began 9 s into the call
        on_b.on_caller_audio(b64(bytes([0x30]) * FRAME))
    on_b.on_assistant_audio(b64(bytes([0x40]) * 800))
    await b.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    late = time.monotonic() - began  # how much later than 9 s the new part may be placed
    await second.close()

    assert b.record.recording == a.record.recording == str(final)
    assert list(tmp_path.iterdir()) == [final]
    left, right = read_wav(final)
    place = len(left) // 2 - 8800  # where the second part (1.1 s) starts
    assert 9 * 8000 <= place <= (9 + late) * 8000 + 1
    assert left == (pcm(0x10) * 24000 + pcm(0xFF) * (place - 24000) + pcm(0x30) * 8000
                    + pcm(0xFF) * 800)
    assert right == (pcm(0xFF) * 24000 + pcm(0x20) * 8000 + pcm(0xFF) * (place - 32000)
                     + pcm(0xFF) * 8000 + pcm(0x40) * 800)


async def test_a_part_that_overlaps_the_one_before_goes_after_it(tmp_path: Path) -> None:
    """Clocks of two instances, or frames that came faster than real time, can put the new
    part's start inside the old one: it is placed right after it, nothing overwritten."""
    for sid, kind, byte in (("CAfast", EndKind.HANDOVER, 0x10),
                            ("CAfast", EndKind.CALLER_HUNG_UP, 0x30)):
        recorder = Recorder(tmp_path)
        call = FakeCall(sid)
        feature = call.add(recorder.feature()(call))
        for _ in range(100):
            feature.on_caller_audio(b64(bytes([byte]) * FRAME))
        await call.finish(Ending(kind, "ended"))
        await recorder.close()
    left, _ = read_wav(tmp_path / "CAfast.wav")
    assert left == pcm(0x10) * 16000 + pcm(0x30) * 16000


async def test_a_resumed_call_with_no_audio_still_names_the_recording(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    a = FakeCall("CAquiet")
    on_a = a.add(recorder.feature()(a))
    on_a.on_caller_audio(b64(bytes([0x10]) * FRAME))
    await a.finish(Ending(EndKind.HANDOVER, "handed over to another instance"))
    b = FakeCall("CAquiet")
    b.add(recorder.feature()(b))
    await b.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))  # before any audio
    await recorder.close()
    assert b.record.recording == str(recorder.path_for("CAquiet"))


async def test_audio_that_is_not_base64_is_recorded_as_silence(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(tmp_path, flush_bytes=320)
    call = FakeCall("CAbad")
    feature = call.add(recorder.feature()(call))
    feature.on_caller_audio(b64(bytes([0x10]) * FRAME))
    feature.on_caller_audio("%%%%" * 40)  # 120 bytes' worth of garbage from the network
    feature.on_caller_audio("QUJD=")  # 2 bytes by its length, but padded wrong
    feature.on_caller_audio(b64(bytes([0x10]) * FRAME))
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    await recorder.close()
    left, _ = read_wav(recorder.path_for("CAbad"))
    assert left == pcm(0x10) * 160 + pcm(0xFF) * (120 + 2) + pcm(0x10) * 160
    assert "were not base64 (kept as silence)" in caplog.text


async def test_a_file_in_the_way_that_is_no_recording_is_kept_and_so_is_the_audio(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(tmp_path)
    final = recorder.path_for("CAclash")
    final.write_bytes(b"not a wav file at all")
    call = FakeCall("CAclash")
    feature = call.add(recorder.feature()(call))
    feature.on_caller_audio(b64(bytes([0x10]) * FRAME))
    await call.finish(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
    await recorder.close()
    assert final.read_bytes() == b"not a wav file at all"
    (aside,) = (p for p in tmp_path.iterdir() if p != final)
    assert aside.name.startswith("CAclash.") and aside.suffix == ".wav"
    assert read_wav(aside)[0] == pcm(0x10) * FRAME
    assert f"this part is in {aside.name}" in caplog.text
