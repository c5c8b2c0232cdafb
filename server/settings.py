"""Settings: one frozen, typed object, built from the environment in one place.

`load_dotenv()` runs only in `server.main`, so tests build `Settings(...)` directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "config" / "prompts"

DEFAULT_INSTRUCTIONS = (
    "You are a friendly, efficient voice assistant answering a phone call. "
    "Speak naturally and briefly, one or two sentences at a time, and let the caller interrupt."
)

DEFAULT_LOG_EVENT_TYPES = frozenset(
    {
        "error",
        "response.done",
        "rate_limits.updated",
        "input_audio_buffer.committed",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "session.created",
        "session.updated",
    }
)

VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
)
TURN_DETECTION_TYPES = frozenset({"server_vad", "semantic_vad"})
EAGERNESS = frozenset({"low", "medium", "high", "auto"})
NOISE_REDUCTION = frozenset({"off", "near_field", "far_field"})
LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR"})
LOG_FORMATS = frozenset({"text", "json"})


class ConfigError(Exception):
    """A setting is missing or invalid; `str()` is one line that names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    openai_api_key: str = field(repr=False)
    openai_realtime_url: str = "wss://api.openai.com/v1/realtime"
    openai_model: str = "gpt-realtime"
    voice: str = "alloy"
    instructions: str | None = None
    prompt_id: str | None = None
    prompt_version: str | None = None
    prompts_dir: Path = DEFAULT_PROMPTS_DIR
    turn_detection: str = "server_vad"
    vad_threshold: float = 0.5
    vad_prefix_padding_ms: int = 300
    vad_silence_ms: int = 500
    vad_eagerness: str = "auto"
    noise_reduction: str = "off"
    transcription_model: str | None = None
    host: str = "0.0.0.0"
    port: int = 5050
    public_url: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    log_event_types: frozenset[str] = DEFAULT_LOG_EVENT_TYPES
    log_level: str = "INFO"
    log_format: str = "text"
    openai_connect_timeout: float = 8.0
    stream_start_timeout: float = 10.0
    stream_idle_timeout: float = 60.0
    stream_token_ttl: float = 120.0
    max_calls: int = 0
    shutdown_drain_seconds: float = 0.0
    fallback_message: str = (
        "Sorry, our assistant is not available right now. Please try again later."
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read and validate every variable; raise ConfigError naming the first bad one."""
        r = _Reader(env)
        api_key = r.text("OPENAI_API_KEY")
        if not api_key:
            raise ConfigError(
                "OPENAI_API_KEY",
                "is required: put it in .env (see .env.example) or the environment",
            )
        public_url = r.text("PUBLIC_URL")
        if public_url:
            public_url = _check_base_url("PUBLIC_URL", public_url, {"http", "https"})
        realtime_url = _check_base_url(
            "OPENAI_REALTIME_URL",
            r.text("OPENAI_REALTIME_URL") or cls.openai_realtime_url,
            {"ws", "wss"},
        )
        event_types = r.text("LOG_EVENT_TYPES")
        return cls(
            openai_api_key=api_key,
            openai_realtime_url=realtime_url,
            openai_model=r.text("OPENAI_REALTIME_MODEL") or cls.openai_model,
            voice=r.choice("VOICE", VOICES, cls.voice),
            instructions=r.text("INSTRUCTIONS"),
            prompt_id=r.text("PROMPT_ID"),
            prompt_version=r.text("PROMPT_VERSION"),
            prompts_dir=Path(r.text("PROMPTS_DIR") or DEFAULT_PROMPTS_DIR),
            turn_detection=r.choice("TURN_DETECTION", TURN_DETECTION_TYPES, cls.turn_detection),
            vad_threshold=r.number("VAD_THRESHOLD", float, cls.vad_threshold, 0.0, 1.0),
            vad_prefix_padding_ms=r.number(
                "VAD_PREFIX_PADDING_MS", int, cls.vad_prefix_padding_ms, 0, 10_000
            ),
            vad_silence_ms=r.number("VAD_SILENCE_MS", int, cls.vad_silence_ms, 0, 10_000),
            vad_eagerness=r.choice("VAD_EAGERNESS", EAGERNESS, cls.vad_eagerness),
            noise_reduction=r.choice("NOISE_REDUCTION", NOISE_REDUCTION, cls.noise_reduction),
            transcription_model=r.text("TRANSCRIPTION_MODEL"),
            host=r.text("HOST") or cls.host,
            port=r.number("PORT", int, cls.port, 0, 65535),
            public_url=public_url,
            twilio_auth_token=r.text("TWILIO_AUTH_TOKEN"),
            log_event_types=(
                frozenset(t.strip() for t in event_types.split(",") if t.strip())
                if event_types is not None
                else DEFAULT_LOG_EVENT_TYPES
            ),
            log_level=r.choice("LOG_LEVEL", LOG_LEVELS, cls.log_level, upper=True),
            log_format=r.choice("LOG_FORMAT", LOG_FORMATS, cls.log_format),
            openai_connect_timeout=r.number(
                "OPENAI_CONNECT_TIMEOUT", float, cls.openai_connect_timeout, 0.1, 120.0
            ),
            stream_start_timeout=r.number(
                "STREAM_START_TIMEOUT", float, cls.stream_start_timeout, 0.1, 120.0
            ),
            stream_idle_timeout=r.number(
                "STREAM_IDLE_TIMEOUT", float, cls.stream_idle_timeout, 1.0, 3600.0
            ),
            stream_token_ttl=r.number("STREAM_TOKEN_TTL", float, cls.stream_token_ttl, 5, 3600),
            max_calls=r.number("MAX_CALLS", int, cls.max_calls, 0, 1_000_000),
            shutdown_drain_seconds=r.number(
                "SHUTDOWN_DRAIN_SECONDS", float, cls.shutdown_drain_seconds, 0.0, 3600.0
            ),
            fallback_message=r.text("FALLBACK_MESSAGE") or cls.fallback_message,
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line."""
        return tuple(s for s in (self.openai_api_key, self.twilio_auth_token) if s)


N = TypeVar("N", int, float)


class _Reader:
    """Reads one variable at a time; blank counts as unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def choice(
        self, name: str, allowed: frozenset[str], default: str, *, upper: bool = False
    ) -> str:
        value = self.text(name)
        if value is None:
            return default
        value = value.upper() if upper else value.lower()
        if value not in allowed:
            raise ConfigError(name, f"{value!r} is not one of {', '.join(sorted(allowed))}")
        return value

    def number(self, name: str, kind: Callable[[str], N], default: N, low: N, high: N) -> N:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            word = "an integer" if kind is int else "a number"
            raise ConfigError(name, f"{raw!r} is not {word}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
            raise ConfigError(name, f"{raw} is outside {low}..{high}")
        return value


def _check_base_url(name: str, url: str, schemes: set[str]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.netloc:
        want = " or ".join(f"{s}://" for s in sorted(schemes))
        raise ConfigError(name, f"{url!r} is not a {want} URL")
    if parts.query or parts.fragment:
        raise ConfigError(name, "must not have a query string or fragment")
    return url.rstrip("/")
