"""mu-law and WAV conversion used by the simulator and the stand-in."""

from __future__ import annotations

import array
import math
import wave
from itertools import pairwise
from pathlib import Path

import pytest

from server.testing import audio


def pcm(samples: list[int]) -> bytes:
    return array.array("h", samples).tobytes()


def samples(data: bytes) -> list[int]:
    return list(array.array("h", data))


def test_reference_points() -> None:
    assert audio.ulaw_encode(pcm([0])) == b"\xff"
    assert audio.ulaw_encode(pcm([32767, -32768])) == b"\x80\x00"
    assert samples(audio.ulaw_decode(b"\xff\x7f\x80\x00")) == [0, 0, 32124, -32124]


def test_round_trip_within_quantisation() -> None:
    values = list(range(-32768, 32768, 97))
    back = samples(audio.ulaw_decode(audio.ulaw_encode(pcm(values))))
    for v, b in zip(values, back, strict=True):
        # G.711 steps grow with magnitude: error is at most ~1/16 of the value (plus a floor).
        assert abs(v - b) <= max(abs(v) / 16, 8) + 4, (v, b)
        assert (v >= 0) == (b >= 0) or abs(v) < 8


def sine_wav(path: Path, rate: int, width: int, channels: int, hz: float = 400.0,
             seconds: float = 0.5) -> None:
    n = int(rate * seconds)
    scale = (1 << (8 * width - 1)) - 1
    frames = bytearray()
    for i in range(n):
        value = int(0.5 * scale * math.sin(2 * math.pi * hz * i / rate))
        sample = (value + 128).to_bytes(1, "little") if width == 1 else value.to_bytes(
            width, "little", signed=True)
        frames += sample * channels
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(frames))


def zero_crossings(data: list[int]) -> int:
    return sum(1 for a, b in pairwise(data) if (a < 0) != (b < 0))


@pytest.mark.parametrize(("rate", "width", "channels"), [
    (8000, 2, 1), (16000, 2, 1), (22050, 2, 2), (24000, 3, 1), (44100, 1, 2), (48000, 4, 2),
    (4000, 2, 1),
])
def test_read_wav_any_pcm(tmp_path: Path, rate: int, width: int, channels: int) -> None:
    path = tmp_path / "in.wav"
    sine_wav(path, rate, width, channels)
    out = samples(audio.read_wav(path))
    assert abs(len(out) - 4000) <= 2  # 0.5 s at 8 kHz
    # 400 Hz for 0.5 s crosses zero ~400 times: the pitch survived the resampling.
    assert 380 <= zero_crossings(out) <= 420
    assert 0.3 * 32767 < max(out) < 0.6 * 32767


def test_write_then_read(tmp_path: Path) -> None:
    data = pcm([0, 1000, -1000, 32767])
    audio.write_wav(tmp_path / "sub" / "x.wav", data)
    assert audio.read_wav(tmp_path / "sub" / "x.wav") == data


def test_frames_are_padded_with_silence() -> None:
    chunks = list(audio.frames(b"\x01" * 170))
    assert [len(c) for c in chunks] == [160, 160]
    assert chunks[1] == b"\x01" * 10 + b"\xff" * 150


def test_levels_tell_speech_from_silence() -> None:
    assert audio.level(b"\xff" * 160) == 0
    assert audio.level(audio.tone(20)) > 3000
    assert audio.level(b"") == 0
