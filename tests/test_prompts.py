"""Prompt id + version kept in config/, and the pass-through of hosted OpenAI prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.prompts import load_prompt, versions
from server.settings import ConfigError, Settings
from tests.conftest import PROMPTS


def settings(tmp: Path | None = None, **kw: object) -> Settings:
    """The repository's shipped prompts unless `tmp` says otherwise."""
    return Settings(openai_api_key="k", prompts_dir=tmp or PROMPTS, **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    d = tmp_path / "support"
    d.mkdir()
    (d / "1.md").write_text("v1 for {{caller}}")
    (d / "2.md").write_text("v2 for {{ caller }} calling {{called}} on {{call_sid}}")
    (d / "10.md").write_text("v10 hello {{caller}}")
    return tmp_path


def test_highest_version_is_default(store: Path) -> None:
    assert versions(store, "support") == ["1", "2", "10"]
    p = load_prompt(settings(store, prompt_id="support"))
    assert p.version == "10"
    assert p.session_fields({"caller": "+1555"}) == {"instructions": "v10 hello +1555"}


def test_pinned_version_renders_call_values(store: Path) -> None:
    p = load_prompt(settings(store, prompt_id="support", prompt_version="2"))
    values = {"caller": "+1555", "called": "+1666", "call_sid": "CA1"}
    assert p.render(values) == "v2 for +1555 calling +1666 on CA1"


@pytest.mark.parametrize(
    ("kw", "variable"),
    [
        ({"prompt_id": "nope"}, "PROMPT_ID"),
        ({"prompt_id": "../etc"}, "PROMPT_ID"),
        ({"prompt_id": "support", "prompt_version": "7"}, "PROMPT_VERSION"),
        ({"prompt_version": "2"}, "PROMPT_VERSION"),
        ({"instructions": "hi {{nickname}}"}, "INSTRUCTIONS"),
    ],
)
def test_unknown_prompt_stops_startup(store: Path, kw: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_prompt(settings(store, **kw))
    assert caught.value.variable == variable


def test_unknown_placeholder_in_file(store: Path) -> None:
    (store / "support" / "11.md").write_text("hello {{name}}")
    with pytest.raises(ConfigError, match=r"\{\{name\}\}"):
        load_prompt(settings(store, prompt_id="support"))


def test_hosted_prompt_is_passed_through() -> None:
    p = load_prompt(settings(prompt_id="pmpt_abc123", prompt_version="3"))
    assert p.hosted
    assert p.session_fields({"caller": "x"}) == {"prompt": {"id": "pmpt_abc123", "version": "3"}}


def test_instructions_then_shipped_default(tmp_path: Path) -> None:
    p = load_prompt(settings(instructions="Be brief with {{caller}}."))
    assert p.render({"caller": "Ann"}) == "Be brief with Ann."
    shipped = load_prompt(settings())
    assert shipped.id == "default" and shipped.version == "1"
    assert "{{" not in shipped.render({"caller": "a", "called": "b", "call_sid": "c"})
    builtin = load_prompt(settings(tmp_path))
    assert builtin.source.startswith("built-in: no default/ prompt in ") and builtin.render({})
