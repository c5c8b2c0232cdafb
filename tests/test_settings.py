"""Settings from the environment: defaults, validation, one clear line per bad variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import DEFAULT_LOG_EVENT_TYPES, ConfigError, Settings

BASE = {"OPENAI_API_KEY": "sk-test-secret-value"}


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert s.openai_realtime_url == "wss://api.openai.com/v1/realtime"
    assert s.openai_model == "gpt-realtime"
    assert s.voice == "alloy"
    assert s.turn_detection == "server_vad"
    assert (s.host, s.port) == ("0.0.0.0", 5050)
    assert s.public_url is None and s.twilio_auth_token is None
    assert s.log_event_types == DEFAULT_LOG_EVENT_TYPES
    assert (s.log_level, s.log_format) == ("INFO", "text")


def test_values_are_read_and_normalised() -> None:
    s = Settings.from_env({
        **BASE,
        "OPENAI_REALTIME_URL": "ws://127.0.0.1:9/v1/realtime/",
        "VOICE": "Marin",
        "TURN_DETECTION": "semantic_vad",
        "VAD_THRESHOLD": "0.7",
        "VAD_SILENCE_MS": "800",
        "PORT": "8080",
        "PUBLIC_URL": "https://abc.ngrok.app/",
        "LOG_EVENT_TYPES": "error, response.done ,",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": "JSON",
    })
    assert s.openai_realtime_url == "ws://127.0.0.1:9/v1/realtime"
    assert s.voice == "marin"
    assert s.turn_detection == "semantic_vad"
    assert s.vad_threshold == 0.7 and s.vad_silence_ms == 800 and s.port == 8080
    assert s.public_url == "https://abc.ngrok.app"
    assert s.log_event_types == {"error", "response.done"}
    assert (s.log_level, s.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPENAI_API_KEY", ""),
        ("VOICE", "robot"),
        ("TURN_DETECTION", "none"),
        ("VAD_THRESHOLD", "1.5"),
        ("VAD_THRESHOLD", "nan"),
        ("PORT", "http"),
        ("PORT", "70000"),
        ("PUBLIC_URL", "abc.ngrok.app"),
        ("PUBLIC_URL", "https://abc.ngrok.app/?x=1"),
        ("OPENAI_REALTIME_URL", "https://api.openai.com/v1/realtime"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")


def test_secrets_are_not_in_repr() -> None:
    s = Settings.from_env({**BASE, "TWILIO_AUTH_TOKEN": "twilio-secret-token"})
    assert "sk-test-secret-value" not in repr(s)
    assert "twilio-secret-token" not in repr(s)
    assert set(s.secrets) == {"sk-test-secret-value", "twilio-secret-token"}


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-never-printed", "PORT": "nope"}
    proc = subprocess.run(
        [sys.executable, "-m", "server"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "configuration error: PORT: 'nope' is not an integer"
    assert "sk-never-printed" not in proc.stdout + proc.stderr
