"""Read TwiML the way Twilio does: the one parser for the simulator, the bench and the tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Twiml:
    """What a voice webhook told Twilio to do, in the parts this project uses."""

    stream_url: str | None = None  # <Connect><Stream url=...>, None when there is no stream
    parameters: dict[str, str] = field(default_factory=dict)  # the stream's <Parameter>s
    action: str | None = None  # <Connect action=...>: asked what next when the stream ends
    says: tuple[str, ...] = ()  # every <Say> text, in order
    hangs_up: bool = False  # a <Hangup/> verb
    dials: tuple[str, ...] = ()  # every <Dial> target (<Number>, <Sip>, or bare text), in order
    dial_caller_id: str | None = None  # the first <Dial callerId=...>: None keeps the caller's
    verbs: tuple[str, ...] = ()  # the top-level verbs, in the order Twilio runs them

    @property
    def say(self) -> str:
        """All the spoken text, as one string."""
        return " ".join(self.says)


def parse_twiml(body: str) -> Twiml:
    """Parse a webhook answer; ValueError (saying why) when it is not a TwiML `<Response>`."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise ValueError(f"the answer is not XML ({e}): {body.strip()[:200]!r}") from None
    if root.tag != "Response":
        raise ValueError(f"TwiML must be a <Response>, not <{root.tag}>")
    stream = root.find("./Connect/Stream")
    connect = root.find("./Connect")
    return Twiml(
        stream_url=stream.get("url", "") if stream is not None else None,
        parameters={p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        if stream is not None else {},
        action=connect.get("action") if connect is not None else None,
        says=tuple((el.text or "").strip() for el in root.iter("Say")),
        hangs_up=root.find("./Hangup") is not None,
        dials=tuple(_dial_targets(root)),
        dial_caller_id=next((d.get("callerId") for d in root.iter("Dial")), None),
        verbs=tuple(child.tag for child in root),
    )


def _dial_targets(root: ET.Element) -> list[str]:
    """The targets of `<Dial><Number>…</Number></Dial>`, `<Dial><Sip>…</Sip></Dial>` or
    `<Dial>+1…</Dial>`."""
    targets: list[str] = []
    for dial in root.iter("Dial"):
        nouns = [(el.text or "").strip() for el in dial if el.tag in ("Number", "Sip", "Client")]
        targets.extend(nouns or [(dial.text or "").strip()])
    return [t for t in targets if t]
