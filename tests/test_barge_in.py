"""The barge-in arithmetic: marks -> what was heard -> truncation, clamped to what was sent."""

from __future__ import annotations

import base64

from server.call.playback import (
    MARK_BYTES,
    MARK_CHARS,
    Interruption,
    PlayState,
    decoded_length,
    split,
)


def send(state: PlayState, item: str, nbytes: int, marks: list[str]) -> None:
    """One piece to the caller, collecting any mark that goes before it."""
    mark = state.add(item, nbytes)
    if mark is not None:
        marks.append(mark)


def test_decoded_length_matches_base64() -> None:
    for n in range(0, 50):
        assert decoded_length(base64.b64encode(bytes(n)).decode()) == n


def test_a_mark_every_120_ms_and_at_the_end_of_an_item() -> None:
    state, marks = PlayState(), list[str]()
    for _ in range(13):  # 13 x 20 ms
        send(state, "item1", 160, marks)
    assert marks == ["1", "2"]  # before the 7th and the 13th piece: 120 ms each
    end = state.flush()
    assert end == "3" and state.flush() is None
    state.on_mark("3")
    assert not state.playing


def test_nothing_playing_means_nothing_to_cut() -> None:
    state, marks = PlayState(), list[str]()
    assert state.on_speech_started() is None
    send(state, "item1", 800, marks)
    mark = state.flush()
    assert mark is not None and marks == []
    state.on_mark(mark)
    assert not state.playing
    assert state.on_speech_started() is None


def test_truncates_at_last_echoed_mark() -> None:
    state, marks = PlayState(), list[str]()
    state.on_response_created("r1")
    for _ in range(5):  # 5 x 100 ms: a mark before each piece after the first
        send(state, "item1", 800, marks)
    assert len(marks) == 4
    state.on_mark(marks[1])  # 200 ms played
    assert state.on_speech_started() == Interruption("item1", 200)
    assert state.interruptions == 1 and not state.playing


def test_unmarked_audio_counts_as_playing() -> None:
    state, marks = PlayState(), list[str]()
    send(state, "item1", 800, marks)
    assert marks == [] and state.playing
    assert state.on_speech_started() == Interruption("item1", 0)


def test_late_audio_of_interrupted_response_is_dropped() -> None:
    state, marks = PlayState(), list[str]()
    state.on_response_created("r1")
    send(state, "item1", 160, marks)
    state.on_speech_started()
    assert state.dropped("r1")
    state.on_response_done("r1")
    state.on_response_created("r2")
    assert not state.dropped("r2") and not state.dropped(None)


def test_echoes_of_cleared_marks_are_ignored() -> None:
    state, old = PlayState(), list[str]()
    state.on_response_created("r1")
    for _ in range(3):
        send(state, "item1", 800, old)
    state.on_speech_started()
    state.on_response_done("r1")
    state.on_response_created("r2")
    new: list[str] = []
    send(state, "item2", 800, new)
    for name in old:  # Twilio echoes every cleared mark at once
        state.on_mark(name)
    assert state.playing  # the new item's audio is still unconfirmed
    assert state.on_speech_started() == Interruption("item2", 0)


def test_second_item_of_one_response() -> None:
    state, marks = PlayState(), list[str]()
    state.on_response_created("r1")
    send(state, "itemA", 400, marks)
    send(state, "itemB", 400, marks)  # a new item: itemA's audio gets its mark first
    send(state, "itemB", 400, marks)
    assert len(marks) == 1
    state.on_mark(marks[0])  # itemA fully heard, itemB not yet
    assert state.on_speech_started() == Interruption("itemB", 0)


def test_truncation_is_clamped_to_audio_sent() -> None:
    state, marks = PlayState(), list[str]()
    send(state, "item1", MARK_BYTES, marks)
    send(state, "item1", 80, marks)
    state.on_mark(marks[0])
    cut = state.on_speech_started()
    assert cut == Interruption("item1", MARK_BYTES // 8)


def test_foreign_mark_names_are_ignored() -> None:
    state, marks = PlayState(), list[str]()
    send(state, "item1", 80, marks)
    state.flush()
    state.on_mark("greeting-done")
    assert state.playing


def test_split_keeps_base64_valid_and_whole() -> None:
    audio = bytes(range(256)) * 20  # 5120 bytes: 640 ms
    pieces = split(base64.b64encode(audio).decode())
    assert all(len(p) <= MARK_CHARS for p in pieces)
    assert b"".join(base64.b64decode(p, validate=True) for p in pieces) == audio
    assert [decoded_length(p) for p in pieces] == [960] * 5 + [320]
