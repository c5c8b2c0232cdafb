"""RECORD_CALLS: the stereo WAV as the caller heard it (assistant audio queued after what was
already playing, on the caller frames' clock; cleared audio cut), written after the call."""

from __future__ import annotations

import base64
import wave
from pathlib import Path

from server.call.ending import Ending, EndKind
from server.call.features.recording import Recorder, Recording, decoded_length, stereo_pcm
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
