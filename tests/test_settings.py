"""Settings from the environment: defaults, validation, one clear line per bad variable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import DEFAULT_LOG_EVENT_TYPES, ConfigError, Settings
from tests.conftest import ROOT, setting_names, subprocess_env

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


def test_every_setting_is_in_env_example_and_the_readme() -> None:
    """A setting the code reads but nobody can find is a setting nobody can use."""
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    names = setting_names()
    assert len(names) > 50  # the reader found them
    missing_example = sorted(n for n in names if not re.search(rf"^#?{n}=", example, re.M))
    missing_readme = sorted(n for n in names if f"`{n}`" not in readme)
    assert missing_example == [] and missing_readme == []


def test_env_example_leaves_public_url_unset() -> None:
    """A placeholder PUBLIC_URL breaks the first run (signatures, stream URLs)."""
    example = (ROOT / ".env.example").read_text()
    assert not re.search(r"^PUBLIC_URL=", example, re.M)
    values = dict(line.split("=", 1) for line in example.splitlines()
                  if line and not line.startswith("#"))
    Settings.from_env({**values, "OPENAI_API_KEY": "sk-x"})  # what is set is valid


def test_dotenv_is_read_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-from-dotenv\nVOICE=robot\n")
    env = subprocess_env(PORT="0")
    result = subprocess.run([sys.executable, "-m", "server"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "configuration error: VOICE: 'robot'" in result.stderr
    assert "sk-from-dotenv" not in result.stderr
