"""Sounds the bridge plays itself (hold audio), converted to Twilio's mu-law once at startup.

The product never imports `server.testing`, so the G.711 mu-law encoder lives here too: a few
lines, run once per file, never per call.
"""

from __future__ import annotations

import array
import sys
import wave
from pathlib import Path

from server.settings import ConfigError

RATE = 8000
_BIAS = 0x84
_CLIP = 32635


def ulaw_byte(sample: int) -> int:
    """One signed 16-bit sample -> one G.711 mu-law byte."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, _CLIP) + _BIAS
    exponent = max(magnitude.bit_length() - 8, 0)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


def ulaw_encode(pcm16: bytes) -> bytes:
    """Little-endian signed 16-bit PCM -> mu-law, one byte per sample."""
    samples = array.array("h")
    samples.frombytes(pcm16[: len(pcm16) // 2 * 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return bytes(ulaw_byte(s) for s in samples)


def load_ulaw(path: Path, variable: str = "HOLD_AUDIO") -> bytes:
    """Read a WAV (8 kHz, mono, 16-bit PCM) as mu-law; ConfigError naming `variable` if not."""
    try:
        with wave.open(str(path), "rb") as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            pcm = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise ConfigError(variable, f"no file at {path}") from None
    except (OSError, EOFError, wave.Error) as e:
        raise ConfigError(variable, f"{path} is not a readable WAV file ({e})") from None
    if (rate, channels, width) != (RATE, 1, 2):
        raise ConfigError(
            variable,
            f"{path} is {rate} Hz, {channels} channel(s), {width * 8}-bit: it must be 8000 Hz mono "
            "16-bit PCM (e.g. `sox in.wav -r 8000 -c 1 -b 16 out.wav`)",
        )
    if not pcm:
        raise ConfigError(variable, f"{path} holds no audio")
    return ulaw_encode(pcm)
