"""Settings: one frozen, typed object, built from the environment in one place.

`load_dotenv()` runs only in `server.main`, so tests build `Settings(...)` directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

# Relative to the working directory, never to this file: an installed package (`pip install .`)
# has no config/ beside it. `make run` runs from the repository root.
DEFAULT_PROMPTS_DIR = Path("config") / "prompts"

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
        # GPT-Live's (a session's start and end, and each task it hands to its backend)
        "session.started",
        "session.closed",
        "session.delegation.created",
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
ON_OFF = frozenset({"on", "off"})
SHUTDOWN_MODES = frozenset({"drain", "handover"})
MODEL_APIS = frozenset({"realtime", "live"})  # OpenAI Realtime, or GPT-Live (full duplex)
DEFAULT_LIVE_URL = "wss://api.openai.com/v1/live/sessions"
# GPT-Live's backend (Responses delegation) runs the tools. OpenAI's model guide recommends
# gpt-5.4-mini when optimizing for latency and cost (it has function calling); a caller waits
# on every delegated step, so the faster mini model is the default.
DEFAULT_LIVE_BACKEND_MODEL = "gpt-5.4-mini"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Shipped inside the package (package data), so it is found wherever the server is installed.
DEFAULT_HOLD_AUDIO = Path(__file__).resolve().parent / "sounds" / "hold.wav"
# Like the prompts, relative to the working directory; loaded only if it exists.
DEFAULT_TOOLS_FILE = Path("config") / "tools.json"
DEFAULT_NUMBERS_FILE = Path("config") / "numbers.json"


class ConfigError(Exception):
    """A setting is missing or invalid; `str()` is one line that names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    """Every setting, typed and checked, with the defaults a fresh clone runs on. A call's own
    choices (prompt, greeting, voice, tools, model API) come from its plan; these are the
    plan's defaults."""

    # The model and the conversation's defaults: who answers, how it hears and speaks
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
    transcription_model: str | None = "gpt-4o-mini-transcribe"  # None: caller side untranscribed
    # GPT-Live: which API a call uses by default (a plan may choose), and GPT-Live's own models
    model_api: str = "realtime"  # realtime | live
    openai_live_url: str = DEFAULT_LIVE_URL
    openai_live_model: str = "gpt-live-1"
    live_backend_model: str = DEFAULT_LIVE_BACKEND_MODEL  # runs the tools (Responses delegation)
    # Twilio and the server: where it listens, how streams are admitted, logged and ended
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
    # What logs may show, and how a dead model connection is noticed
    log_pii: bool = False
    openai_heartbeat: float = 10.0
    # Records, recordings and metrics: what is kept about calls, and who may read it
    database_url: str = field(default="sqlite:///calls.db", repr=False)  # may hold a password
    retention_days: int | None = None  # None: keep records forever
    record_calls: bool = False
    recordings_dir: Path = Path("recordings")
    admin_token: str | None = field(default=None, repr=False)
    # named operators for the console and the operator routes: ((name, token), ...)
    operator_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    metrics_token: str | None = field(default=None, repr=False)
    call_webhook_url: str | None = None
    call_webhook_secret: str | None = field(default=None, repr=False)
    # What the assistant may do beyond talking: tools, keypad, greeting, transfer
    tools_module: str | None = None  # importable module name or .py path with @tool functions
    tools_file: Path | None = None  # HTTP tools (from_env: config/tools.json if it exists)
    tools_secret: str | None = field(default=None, repr=False)  # HMAC key for HTTP tools
    tool_timeout: float = 10.0
    hold_audio: Path | None = DEFAULT_HOLD_AUDIO  # None: no hold audio
    transfer_targets: tuple[tuple[str, str], ...] = ()  # (name, +E.164 or sip: URI)
    keypad: bool = True
    keypad_timeout: float = 2.0
    greeting: str | None = None
    # Several processes or machines sharing calls, and how a process leaves
    redis_url: str | None = field(default=None, repr=False)  # None: state in this process only
    workers: int = 1  # processes sharing HOST:PORT (SO_REUSEPORT)
    shutdown_mode: str = "drain"  # drain | handover
    fleet_lease_seconds: float = 5.0  # a silent (killed) instance keeps its slots this long
    # A call outlives its model session: a new one continues the conversation
    reconnect_attempts: int = 2
    reconnect_within: float = 3.0  # seconds for all attempts together
    reconnect_buffer_seconds: float = 10.0  # caller audio kept during the gap
    # Bounds that keep one process healthy under faults, and where things are kept
    max_call_seconds: float = 14400.0  # the assistant says goodbye and the call ends
    tool_threads: int = 8  # sync tools run on their own pool of this many threads
    records_pending_max: int = 10000  # final records kept in memory while the store is down
    # unsaved records at shutdown go here, and are loaded into the store at the next start
    records_spool: Path = Path("records-spool.jsonl")
    prices_file: Path = Path("config") / "prices.json"  # USD per 1M tokens, for cost_usd
    numbers_file: Path | None = None  # the lines this bridge answers -> their plans (JSON)
    shutdown_action_grace: float = 5.0  # after the last call ended, wait for Twilio's action
    # --- outbound calls and campaigns (issue 15) ---
    twilio_account_sid: str | None = None  # the REST API's user name (not a secret)
    twilio_from_number: str | None = None  # default caller ID of outbound calls (+E.164)
    twilio_api_url: str = "https://api.twilio.com"  # or a Twilio-compatible provider, a fake
    outbound_cps: float = 1.0  # calls placed per second, fleet-wide (Twilio's default limit)
    amd_wait_s: float = 4.0  # an outbound call waits this long for the machine-detection result
    do_not_call: Path = Path("do-not-call.txt")  # numbers never dialled, one per line
    # open the model session at the webhook, before the stream (server.call.prewarm)
    prewarm: bool = True

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
        live_url = _check_base_url(
            "OPENAI_LIVE_URL", r.text("OPENAI_LIVE_URL") or cls.openai_live_url, {"ws", "wss"})
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
            transcription_model=_off_text(
                r.text_or_off("TRANSCRIPTION_MODEL", cls.transcription_model)),
            model_api=r.choice("MODEL_API", MODEL_APIS, cls.model_api),
            openai_live_url=live_url,
            openai_live_model=r.model("OPENAI_LIVE_MODEL", cls.openai_live_model),
            live_backend_model=r.model("LIVE_BACKEND_MODEL", cls.live_backend_model),
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
            log_pii=r.flag("LOG_PII", cls.log_pii),
            openai_heartbeat=r.number(
                "OPENAI_HEARTBEAT", float, cls.openai_heartbeat, 0.0, 600.0
            ),
            database_url=_check_database_url(r.text("DATABASE_URL") or cls.database_url),
            retention_days=r.number("RETENTION_DAYS", int, 0, 0, 100_000) or None,
            record_calls=r.flag("RECORD_CALLS", cls.record_calls),
            recordings_dir=Path(r.text("RECORDINGS_DIR") or cls.recordings_dir),
            admin_token=r.text("ADMIN_TOKEN"),
            operator_tokens=parse_operator_tokens(r.text("OPERATOR_TOKENS") or "",
                                                  r.text("ADMIN_TOKEN")),
            metrics_token=r.text("METRICS_TOKEN"),
            call_webhook_url=_check_webhook_url(r.text("CALL_WEBHOOK_URL")),
            call_webhook_secret=r.text("CALL_WEBHOOK_SECRET"),
            tools_module=r.text("TOOLS_MODULE"),
            tools_file=_optional_file(r.text_or_off("TOOLS_FILE", ""), DEFAULT_TOOLS_FILE),
            tools_secret=r.text("TOOLS_SECRET"),
            tool_timeout=r.number("TOOL_TIMEOUT", float, cls.tool_timeout, 0.1, 600.0),
            hold_audio=_off_path(r.text_or_off("HOLD_AUDIO", str(cls.hold_audio))),
            transfer_targets=parse_transfer_targets(r.text("TRANSFER_TARGETS") or ""),
            keypad=r.choice("KEYPAD", ON_OFF, "on") == "on",
            keypad_timeout=r.number("KEYPAD_TIMEOUT", float, cls.keypad_timeout, 0.2, 30.0),
            greeting=r.text("GREETING"),
            redis_url=_check_redis_url(r.text("REDIS_URL")),
            workers=_check_workers(r.number("WORKERS", int, cls.workers, 1, 64),
                                   r.text("REDIS_URL")),
            shutdown_mode=r.choice("SHUTDOWN_MODE", SHUTDOWN_MODES, cls.shutdown_mode),
            fleet_lease_seconds=r.number(
                "FLEET_LEASE_SECONDS", float, cls.fleet_lease_seconds, 1.0, 60.0),
            reconnect_attempts=r.number(
                "RECONNECT_ATTEMPTS", int, cls.reconnect_attempts, 0, 10),
            reconnect_within=r.number(
                "RECONNECT_WITHIN", float, cls.reconnect_within, 0.1, 60.0),
            reconnect_buffer_seconds=r.number(
                "RECONNECT_BUFFER_SECONDS", float, cls.reconnect_buffer_seconds, 0.0, 60.0),
            max_call_seconds=r.number(
                "MAX_CALL_SECONDS", float, cls.max_call_seconds, 10.0, 7 * 86400.0),
            tool_threads=r.number("TOOL_THREADS", int, cls.tool_threads, 1, 256),
            records_pending_max=r.number(
                "RECORDS_PENDING_MAX", int, cls.records_pending_max, 1, 10_000_000),
            records_spool=Path(r.text("RECORDS_SPOOL") or cls.records_spool),
            prices_file=Path(r.text("PRICES_FILE") or cls.prices_file),
            numbers_file=_optional_file(r.text_or_off("NUMBERS_FILE", ""), DEFAULT_NUMBERS_FILE),
            shutdown_action_grace=r.number(
                "SHUTDOWN_ACTION_GRACE", float, cls.shutdown_action_grace, 0.0, 300.0),
            twilio_account_sid=r.text("TWILIO_ACCOUNT_SID"),
            twilio_from_number=_check_e164("TWILIO_FROM_NUMBER", r.text("TWILIO_FROM_NUMBER")),
            twilio_api_url=_check_base_url(
                "TWILIO_API_URL", r.text("TWILIO_API_URL") or cls.twilio_api_url,
                {"http", "https"}),
            outbound_cps=r.number("OUTBOUND_CPS", float, cls.outbound_cps, 0.01, 1000.0),
            amd_wait_s=r.number("AMD_WAIT_S", float, cls.amd_wait_s, 0.0, 60.0),
            do_not_call=Path(r.text("DO_NOT_CALL") or cls.do_not_call),
            prewarm=r.choice("PREWARM", ON_OFF, "on") == "on",
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line."""
        return tuple(s for s in (self.openai_api_key, self.twilio_auth_token, self.admin_token,
                                 self.metrics_token, self.call_webhook_secret, self.tools_secret,
                                 urlsplit(self.database_url).password,
                                 urlsplit(self.redis_url or "").password,
                                 *(token for _, token in self.operator_tokens)) if s)


N = TypeVar("N", int, float)


class _Reader:
    """Reads one variable at a time; blank counts as unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def text_or_off(self, name: str, default: str | None) -> str | None:
        """Unset: the default; set but blank (`NAME=`): None, the feature turned off."""
        if name not in self._env:
            return default
        return self.text(name)

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

    def model(self, name: str, default: str) -> str:
        """A model name: letters, digits, `.`, `-`, `_`, `:` (what OpenAI's names use)."""
        value = self.text(name)
        if value is None:
            return default
        if not _MODEL_NAME.fullmatch(value):
            raise ConfigError(name, f"{value!r} is not a model name (letters, digits, . - _ :)")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"{value!r} is not one of true, false (or on, off)")

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


def _check_database_url(url: str) -> str:
    """sqlite:///relative.db, sqlite:////absolute.db or postgresql://user:pass@host:port/db.

    The message never repeats the URL: it may hold a password."""
    if url == "off":  # keep no records at all
        return url
    scheme, sep, rest = url.partition("://")
    if scheme == "sqlite" and sep and rest.startswith("/") and rest.strip("/"):
        return url
    if scheme in ("postgresql", "postgres") and sep and urlsplit(url).hostname:
        return url
    raise ConfigError(
        "DATABASE_URL",
        "is not sqlite:///relative/path.db, sqlite:////absolute/path.db, "
        "postgresql://user:password@host:5432/database or off",
    )


def _check_redis_url(url: str | None) -> str | None:
    """redis://[user:password@]host[:port][/db] or rediss:// (TLS); never echoed (password)."""
    if url is not None:
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("redis", "rediss") and bool(parts.hostname) and (
                parts.port is None or parts.port > 0)
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError("REDIS_URL",
                              "is not redis://[:password@]host[:port][/db] or rediss://…")
    return url


def _check_workers(workers: int, redis_url: str | None) -> int:
    """Processes must share tokens, MAX_CALLS and call decisions: in one process only memory."""
    if workers > 1 and not redis_url:
        raise ConfigError("WORKERS", f"{workers} processes need REDIS_URL (they share stream "
                                     "tokens, MAX_CALLS and call decisions through it)")
    return workers


def _check_webhook_url(url: str | None) -> str | None:
    """An http(s) URL kept exactly as given (its path and query are the receiver's)."""
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError("CALL_WEBHOOK_URL", "is not an http:// or https:// URL")
    return url


def _optional_file(value: str | None, default: Path) -> Path | None:
    """Unset (""): `default` if it exists; blank (None) or `off`: none; else that file."""
    if value is None:
        return None
    if value == "":
        return default if default.is_file() else None
    return None if value.lower() == "off" else Path(value)


def _off_text(value: str | None) -> str | None:
    """A value where `off` (any case) or blank turns the feature off."""
    return None if value is None or value.lower() == "off" else value


def _off_path(value: str | None) -> Path | None:
    return None if value is None or value.lower() == "off" else Path(value)


_TARGET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_SIP = re.compile(r"sip:[^\s@<>\"]+@[^\s@<>\"]+")


def _check_e164(name: str, number: str | None) -> str | None:
    """A +E.164 number as given (spaces and dashes are not removed here: a setting is exact)."""
    if number is not None and not _E164.fullmatch(number):
        raise ConfigError(name, f"{number!r} is not a +E.164 number (+15550001111)")
    return number


def parse_transfer_targets(raw: str) -> tuple[tuple[str, str], ...]:
    """`sales=+15550001111,support=sip:desk@example.com` -> (("sales", "+1555..."), ...)."""
    targets: dict[str, str] = {}
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        name, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not _TARGET_NAME.fullmatch(name):
            raise ConfigError("TRANSFER_TARGETS",
                              f"{entry!r} is not name=target (name: letters, digits, _ or -)")
        if not (_E164.fullmatch(target) or _SIP.fullmatch(target)):
            raise ConfigError("TRANSFER_TARGETS",
                              f"target of {name!r} is not a +E.164 number (+15550001111) or a "
                              "sip:user@host URI")
        if name in targets:
            raise ConfigError("TRANSFER_TARGETS", f"{name!r} is listed twice")
        targets[name] = target
    return tuple(targets.items())


_OPERATOR_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
MIN_OPERATOR_TOKEN = 16


def parse_operator_tokens(raw: str, admin_token: str | None) -> tuple[tuple[str, str], ...]:
    """`ann=<token>,bob=<token>` -> (("ann", "<token>"), ...). Messages name the operator, never
    the token. `admin` is ADMIN_TOKEN's operator; a token shared by two operators (or with
    ADMIN_TOKEN) would make them one person in the records, so both are refused."""
    operators: dict[str, str] = {}
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        name, sep, token = (part.strip() for part in entry.partition("="))
        if not sep or not _OPERATOR_NAME.fullmatch(name):
            raise ConfigError("OPERATOR_TOKENS", "an entry is not name=token (name: 1-32 "
                                                 "letters, digits, _ or -)")
        if name == "admin":
            raise ConfigError("OPERATOR_TOKENS", "'admin' is ADMIN_TOKEN's operator: "
                                                 "choose another name")
        if len(token) < MIN_OPERATOR_TOKEN:
            raise ConfigError("OPERATOR_TOKENS", f"the token of {name!r} is shorter than "
                                                 f"{MIN_OPERATOR_TOKEN} characters")
        if name in operators:
            raise ConfigError("OPERATOR_TOKENS", f"{name!r} is listed twice")
        if token in operators.values() or token == admin_token:
            raise ConfigError("OPERATOR_TOKENS", f"the token of {name!r} is also another "
                                                 "operator's (or ADMIN_TOKEN)")
        operators[name] = token
    return tuple(operators.items())
