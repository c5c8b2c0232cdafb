"""The barge-in arithmetic: marks -> what was heard -> truncation, clamped to what was sent."""

from __future__ import annotations

import base64

from server.barge_in import MARK_CHARS, BargeIn, Interruption, decoded_length, split


def test_decoded_length_matches_base64() -> None:
    for n in range(0, 50):
        assert decoded_length(base64.b64encode(bytes(n)).decode()) == n


def test_nothing_playing_means_nothing_to_cut() -> None:
    b = BargeIn()
    assert b.on_speech_started() is None
    mark = b.on_audio("r1", "item1", 800)
    assert mark is not None
    b.on_mark(mark)
    assert not b.playing
    assert b.on_speech_started() is None


def test_truncates_at_last_echoed_mark() -> None:
    b = BargeIn()
    b.on_response_created("r1")
    marks = [b.on_audio("r1", "item1", 800) for _ in range(5)]  # 5 x 100 ms
    assert all(marks)
    b.on_mark(str(marks[1]))  # 200 ms played
    assert b.on_speech_started() == Interruption("item1", 200)
    assert b.interruptions == 1 and not b.playing


def test_no_echo_yet_means_zero_heard() -> None:
    b = BargeIn()
    b.on_audio("r1", "item1", 800)
    assert b.on_speech_started() == Interruption("item1", 0)


def test_late_audio_of_interrupted_response_is_dropped() -> None:
    b = BargeIn()
    b.on_response_created("r1")
    b.on_audio("r1", "item1", 160)
    b.on_speech_started()
    assert b.on_audio("r1", "item1", 160) is None
    b.on_response_done("r1")
    b.on_response_created("r2")
    assert b.on_audio("r2", "item2", 160) is not None


def test_echoes_of_cleared_marks_are_ignored() -> None:
    b = BargeIn()
    b.on_response_created("r1")
    old = [b.on_audio("r1", "item1", 800) for _ in range(3)]
    b.on_speech_started()
    b.on_response_done("r1")
    b.on_response_created("r2")
    new = b.on_audio("r2", "item2", 800)
    for name in old:  # Twilio echoes every cleared mark at once
        b.on_mark(str(name))
    assert b.playing  # the new item's audio is still unconfirmed
    assert b.on_speech_started() == Interruption("item2", 0)
    assert new is not None


def test_second_item_of_one_response() -> None:
    b = BargeIn()
    b.on_response_created("r1")
    first = b.on_audio("r1", "itemA", 400)
    b.on_audio("r1", "itemB", 400)
    second = b.on_audio("r1", "itemB", 400)
    b.on_mark(str(first))  # itemA fully heard, itemB not yet
    assert b.on_speech_started() == Interruption("itemB", 0)
    assert second is not None


def test_foreign_mark_names_are_ignored() -> None:
    b = BargeIn()
    b.on_audio(None, "item1", 80)
    b.on_mark("greeting-done")
    assert b.playing


def test_split_keeps_base64_valid_and_whole() -> None:
    audio = bytes(range(256)) * 20  # 5120 bytes: 640 ms
    pieces = split(base64.b64encode(audio).decode())
    assert all(len(p) <= MARK_CHARS for p in pieces)
    assert b"".join(base64.b64decode(p, validate=True) for p in pieces) == audio
    assert [decoded_length(p) for p in pieces] == [960] * 5 + [320]
