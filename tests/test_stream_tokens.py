"""Stream tokens: bound to the call, short-lived, single-use, checkable on any machine."""

from __future__ import annotations

from server.fleet.tokens import StreamTokens


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_good_token_is_accepted_once() -> None:
    tokens = StreamTokens("auth", ttl=60, clock=Clock())
    token = tokens.mint("CA1")
    assert tokens.check(token, "CA1") is None
    assert tokens.check(token, "CA1") == "stream token already used"


def test_token_from_another_machine_with_same_auth_token() -> None:
    clock = Clock()
    assert StreamTokens("auth", 60, clock).check(StreamTokens("auth", 60, clock).mint("CA1"),
                                                 "CA1") is None
    assert StreamTokens("other", 60, clock).check(StreamTokens("auth", 60, clock).mint("CA1"),
                                                  "CA1") == "stream token does not match this call"


def test_rejections() -> None:
    clock = Clock()
    tokens = StreamTokens("auth", ttl=60, clock=clock)
    assert tokens.check(None, "CA1") == "no stream token"
    assert tokens.check("garbage", "CA1") == "malformed stream token"
    assert tokens.check(tokens.mint("CA1"), "CA2") == "stream token does not match this call"
    expiry, _, mac = tokens.mint("CA1").partition(".")
    assert tokens.check(f"{int(expiry) + 999}.{mac}", "CA1") == (
        "stream token does not match this call"
    )
    assert tokens.mint("CA1") != tokens.mint("CA1")  # same call, same second: still distinct
    late = tokens.mint("CA1")
    clock.now += 61
    assert tokens.check(late, "CA1") == "stream token expired"
