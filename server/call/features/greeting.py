"""Greeting: the assistant speaks first.

When the call's plan has a greeting (GREETING by default; a line's or an outbound call's own),
as soon as the model session is ready the bridge asks, through the response gate, for a
response whose instructions are to say it, so the caller hears it without having to say
"hello?" first. Greetings may use the prompt placeholders ({{caller}}, {{called}},
{{call_sid}}, and the plan's variables). None: the caller speaks first. An outbound call is
greeted by the answering feature instead, once it knows a person answered.
"""

from __future__ import annotations

from collections.abc import Callable

from server.call.features.base import CallControl, Feature

FeatureFactory = Callable[[CallControl], Feature | None]


def factory() -> FeatureFactory:
    """The greeting feature for every call (it says nothing when the plan has no greeting)."""
    return GreetingFeature


def instructions(text: str) -> str:
    return (f'Greet the caller by saying exactly: "{text}" Then stop and wait for the '
            "caller to answer.")


class GreetingFeature(Feature):
    name = "greeting"

    async def on_session_ready(self, first: bool) -> None:
        if not first:  # a reconnected session continues the conversation: no second hello
            return
        if self.call.plan.direction == "outbound":  # after the answering-machine result
            return  # (server.call.features.answering greets once a person answered)
        text = self.call.greeting
        if text is not None:
            await self.call.request_response("greeting", instructions(text))
