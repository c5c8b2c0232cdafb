"""Greeting: the assistant speaks first.

With GREETING set, as soon as the model session is ready (`session.updated` confirmed mu-law),
the bridge asks for a response whose instructions are to say the greeting, so the caller hears it
without having to say "hello?" first. GREETING may use the prompt placeholders ({{caller}},
{{called}}, {{call_sid}}); unknown ones stop startup. Unset: the caller speaks first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from server.call.features.base import CallControl, Feature
from server.prompts import Prompt, template
from server.settings import Settings

FeatureFactory = Callable[[CallControl], Feature | None]


def load_greeting(settings: Settings) -> Prompt | None:
    """GREETING as a template, checked once; ConfigError on an unknown placeholder."""
    if not settings.greeting:
        return None
    return template("greeting", None, "GREETING", settings.greeting, "GREETING")


def factory(settings: Settings) -> FeatureFactory | None:
    """The greeting feature for every call; None when GREETING is unset."""
    template = load_greeting(settings)
    if template is None:
        return None
    return functools.partial(GreetingFeature, template=template)


def instructions(text: str) -> str:
    return (f'Greet the caller by saying exactly: "{text}" Then stop and wait for the '
            "caller to answer.")


class GreetingFeature(Feature):
    name = "greeting"

    def __init__(self, call: CallControl, template: Prompt) -> None:
        super().__init__(call)
        self._template = template

    async def on_session_ready(self, first: bool) -> None:
        if not first:  # a reconnected session continues the conversation: no second hello
            return
        call = self.call
        text = self._template.render({"caller": call.caller or "unknown",
                                      "called": call.called or "unknown",
                                      "call_sid": call.call_sid})
        await call.request_response("greeting", instructions(text))
