"""E.164 numbers and the do-not-call list: normalised, durable, re-read when the file changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.outbound.numbers import (
    DoNotCall,
    DoNotCallError,
    InvalidNumber,
    is_e164,
    normalise,
    parse_list,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ("+15550001111", "+15550001111"),
    (" +1 (555) 000-1111 ", "+15550001111"),
    ("+44 20 7946 0958", "+442079460958"),
    ("+33.1.23.45.67.89", "+33123456789"),
    ("+2901234", "+2901234"),  # 7 digits: the shortest in use
])
def test_numbers_are_normalised(raw: str, expected: str) -> None:
    assert normalise(raw) == expected
    assert is_e164(raw)


@pytest.mark.parametrize(("raw", "reason"), [
    ("5550001111", "must start with + and the country code"),
    ("0044 20 7946 0958", "must start with +"),
    ("+1555000111x2", "only digits"),
    ("+1-555-CALL-NOW", "only digits"),
    ("+0123456789", "never starts with 0"),
    ("+123456", "has 6 digits"),
    ("+1234567890123456", "has 16 digits"),
    ("", "is empty"),
    ("+", "only digits"),
    ("+١٢٣٤٥٦٧٨", "only digits"),  # Arabic-Indic digits are digits to str.isdigit
    (15550001111, "must be a string"),
])
def test_bad_numbers_say_why_without_repeating_the_number(raw: object, reason: str) -> None:
    with pytest.raises(InvalidNumber) as caught:
        normalise(raw)
    assert reason in str(caught.value)
    if isinstance(raw, str) and len(raw) > 3:
        assert raw.strip() not in str(caught.value)
    assert not is_e164(raw)


def test_parse_list_skips_comments_and_reports_bad_lines() -> None:
    numbers, errors = parse_list("# blocked\n+1 555 000 1111  # asked twice\n\n5550002222\n"
                                 "+442079460958\n")
    assert numbers == {"+15550001111", "+442079460958"}
    assert errors == [(4, "must start with + and the country code (E.164: +<country><number>)")]


async def test_load_lookup_and_durable_add(tmp_path: Path) -> None:
    path = tmp_path / "lists" / "dnc.txt"
    dnc = DoNotCall(path)
    await dnc.load()  # a missing file is an empty list
    assert len(dnc) == 0 and "+15550001111" not in dnc
    added = await dnc.add(["+1 (555) 000-1111", "+15550001111", "+442079460958"])
    assert added == ["+15550001111", "+442079460958"]
    assert "+1 555 000 1111" in dnc and "+442079460958" in dnc
    assert "not a number" not in dnc and 15550001111 not in dnc
    assert await dnc.add(["+15550001111"]) == []  # already listed: nothing appended
    assert path.read_text() == "+15550001111\n+442079460958\n"
    # durable: a fresh list (a restart) reads what was added
    again = DoNotCall(path)
    await again.load()
    assert "+15550001111" in again and len(again) == 2


async def test_add_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "dnc.txt"
    dnc = DoNotCall(path)
    with pytest.raises(InvalidNumber) as caught:
        await dnc.add(["+15550001111", "555-0002"])
    assert str(caught.value).startswith("numbers[1] ")
    assert not path.exists() and "+15550001111" not in dnc


async def test_add_after_a_hand_edit_without_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "dnc.txt"
    path.write_text("# by hand\n+15550001111")
    dnc = DoNotCall(path)
    await dnc.load()
    await dnc.add(["+15550002222"])
    numbers, errors = parse_list(path.read_text())
    assert numbers == {"+15550001111", "+15550002222"} and errors == []


async def test_a_bad_line_stops_load_but_refresh_skips_it(tmp_path: Path) -> None:
    path = tmp_path / "dnc.txt"
    path.write_text("+15550001111\n555 000 2222\n")
    dnc = DoNotCall(path)
    with pytest.raises(DoNotCallError) as caught:
        await dnc.load()
    assert "line 2" in str(caught.value) and "555 000 2222" not in str(caught.value)
    assert await dnc.refresh() is True  # later edits: the bad line is logged and skipped
    assert "+15550001111" in dnc


async def test_refresh_picks_up_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "dnc.txt"
    ours, theirs = DoNotCall(path), DoNotCall(path)
    await ours.load()
    await theirs.load()
    await theirs.add(["+15550003333"])  # another instance, same (shared) file
    assert "+15550003333" not in ours
    assert await ours.refresh() is True
    assert "+15550003333" in ours
    assert await ours.refresh() is False  # unchanged: no re-read
    # a number removed by hand is no longer blocked after the refresh
    path.write_text("+15550004444\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert await ours.refresh() is True
    assert "+15550003333" not in ours and "+15550004444" in ours
