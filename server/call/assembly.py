"""The one place that decides which features every call gets, from the settings and the app's
shared pieces (tools, prices, the recorder)."""

from __future__ import annotations

from collections.abc import Callable

from server.call.features import answering, greeting, keypad, time_limit
from server.call.features import tools as tools_feature
from server.call.features.base import CallControl, Feature
from server.call.features.operator import OperatorFeature
from server.call.features.recording import Recorder
from server.call.features.transcript import TranscriptFeature
from server.records.pricing import PriceTable
from server.settings import Settings
from server.toolbox import Toolbox

FeatureFactory = Callable[[CallControl], Feature | None]


def assemble(settings: Settings, toolbox: Toolbox, prices: PriceTable | None,
             recorder: Recorder | None,
             hang_up: answering.HangUp | None = None) -> tuple[FeatureFactory, ...]:
    """Every call's features, in the order they hear events. Loads HOLD_AUDIO now: ConfigError
    if it is bad. The conversation (transcript) is always kept, whatever the records say.
    `hang_up(call_sid)`: the REST API's hang-up, for outbound calls' answering machines. The
    operator's powers come with the console (an operator token is set), before the transcript:
    it tells the transcript which input turns were the operator's."""
    factories: list[FeatureFactory | None] = [
        answering.factory(settings, hang_up),  # outbound calls only; before the greeting
        greeting.factory(),
        keypad.factory(settings),
        tools_feature.factory(settings, toolbox),
        time_limit.factory(settings),
        OperatorFeature.factory() if settings.admin_token or settings.operator_tokens else None,
        TranscriptFeature.factory(prices),
        recorder.feature() if recorder is not None else None,
    ]
    return tuple(f for f in factories if f is not None)
