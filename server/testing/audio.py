"""G.711 mu-law and WAV helpers for the simulator and the stand-in (never on the bridge's relay
path: the bridge passes audio through untouched). Pure Python: audioop is gone from 3.13."""

from __future__ import annotations

import array
import math
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

RATE = 8000
BYTES_PER_MS = RATE // 1000  # mu-law: one byte per sample
FRAME_MS = 20
FRAME_BYTES = FRAME_MS * BYTES_PER_MS
ULAW_SILENCE = 0xFF
_BIAS = 0x84
_CLIP = 32635


def _encode_sample(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), _CLIP) + _BIAS
    exponent = max(magnitude.bit_length() - 8, 0)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _decode_byte(byte: int) -> int:
    byte = ~byte & 0xFF
    magnitude = (((byte & 0x0F) << 3) + _BIAS) << ((byte & 0x70) >> 4)
    return _BIAS - magnitude if byte & 0x80 else magnitude - _BIAS


# Encode table indexed by the unsigned 16-bit sample; decode table of 256 little-endian pairs.
_ENCODE = bytes(_encode_sample(s - 65536 if s >= 32768 else s) for s in range(65536))
_DECODE = [_decode_byte(b) for b in range(256)]


def ulaw_encode(pcm16: bytes) -> bytes:
    """16-bit little-endian signed PCM -> mu-law."""
    samples = array.array("H", pcm16[: len(pcm16) // 2 * 2])
    if sys.byteorder == "big":
        samples.byteswap()
    table = _ENCODE
    return bytes(table[s] for s in samples)


def ulaw_decode(ulaw: bytes) -> bytes:
    """mu-law -> 16-bit little-endian signed PCM."""
    samples = array.array("h", (_DECODE[b] for b in ulaw))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


def level(ulaw: bytes) -> int:
    """Mean absolute sample value: a cheap speech/silence measure."""
    return sum(abs(_DECODE[b]) for b in ulaw) // len(ulaw) if ulaw else 0


def tone(ms: int, hz: float = 440.0, amplitude: int = 8000) -> bytes:
    """A mu-law sine beep."""
    table = _ENCODE
    return bytes(table[int(amplitude * math.sin(2 * math.pi * hz * n / RATE)) & 0xFFFF]
                 for n in range(ms * RATE // 1000))


def read_wav(path: str | Path) -> bytes:
    """Any PCM WAV (8/16/24/32-bit, mono or stereo, any rate) -> 16-bit mono 8 kHz PCM."""
    with wave.open(str(path), "rb") as wav:
        width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    if width not in (1, 2, 3, 4):
        raise ValueError(f"{path}: unsupported sample width {width * 8} bits")
    samples = _to_ints(raw, width)
    if channels > 1:
        samples = [sum(samples[i:i + channels]) // channels
                   for i in range(0, len(samples) - channels + 1, channels)]
    return array.array("h", _resample(samples, rate, RATE)).tobytes()


def write_wav(path: str | Path, pcm16: bytes, rate: int = RATE) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm16)


def frames(ulaw: bytes, size: int = FRAME_BYTES) -> Iterator[bytes]:
    """20 ms frames, the last one padded with silence, as Twilio sends them."""
    for offset in range(0, len(ulaw), size):
        frame = ulaw[offset:offset + size]
        yield frame + bytes([ULAW_SILENCE]) * (size - len(frame))


def _to_ints(raw: bytes, width: int) -> list[int]:
    if width == 1:  # 8-bit WAV is unsigned
        return [(b - 128) << 8 for b in raw]
    if width == 2:
        return list(array.array("h", raw))
    if width == 4:
        return [s >> 16 for s in array.array("i", raw)]
    return [int.from_bytes(raw[i + 1:i + 3], "little", signed=True)
            for i in range(0, len(raw) - 2, 3)]


def _resample(samples: list[int], src: int, dst: int) -> list[int]:
    """Box-filter average over each output sample's span (anti-aliasing when downsampling),
    linear interpolation when upsampling."""
    if src == dst or not samples:
        return [max(-32768, min(32767, s)) for s in samples]
    n_out = len(samples) * dst // src
    out = []
    if src > dst:
        step = src / dst
        for i in range(n_out):
            lo, hi = int(i * step), max(int((i + 1) * step), int(i * step) + 1)
            span = samples[lo:hi]
            out.append(sum(span) // len(span))
    else:
        step = src / dst
        last = len(samples) - 1
        for i in range(n_out):
            pos = i * step
            j = int(pos)
            frac = pos - j
            nxt = samples[min(j + 1, last)]
            out.append(int(samples[j] + (nxt - samples[j]) * frac))
    return [max(-32768, min(32767, s)) for s in out]
