"""Phone numbers for outbound calls: E.164 validation and the do-not-call list.

Every number is normalised (`+1 (555) 000-1111` -> `+15550001111`) before it is compared,
stored or dialled, so a list written by hand still matches. The do-not-call list is a plain text
file (DO_NOT_CALL): one number per line, `#` starts a comment. Lookups are a set membership test;
additions are appended and fsynced before they are acknowledged, and `refresh()` picks up what
another process (or a person with an editor) wrote to the same file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("server.outbound")

MIN_DIGITS = 7  # the shortest numbers in use (+290 XXXX: country code and four digits)
MAX_DIGITS = 15  # E.164's limit, country code included
_SEPARATORS = str.maketrans("", "", " -.()\t\u00a0")


class InvalidNumber(ValueError):
    """Not an E.164 number; `str()` says why, without repeating the number (it is personal
    data, and this text may reach a log line)."""


def normalise(raw: object) -> str:
    """The number as +E.164 (`+15550001111`); InvalidNumber saying why when it is not one.

    Spaces, dashes, dots and brackets are dropped. A national number (no `+`) is refused rather
    than guessed: `0044…` and `011…` mean different things in different countries."""
    if not isinstance(raw, str):
        raise InvalidNumber(f"must be a string, not {type(raw).__name__}")
    text = raw.strip().translate(_SEPARATORS)
    if not text:
        raise InvalidNumber("is empty")
    if not text.startswith("+"):
        raise InvalidNumber("must start with + and the country code (E.164: +<country><number>)")
    digits = text[1:]
    if not digits.isascii() or not digits.isdigit():
        raise InvalidNumber("may hold only digits after the + (no letters or extensions)")
    if digits[0] == "0":
        raise InvalidNumber("a country code never starts with 0")
    if not MIN_DIGITS <= len(digits) <= MAX_DIGITS:
        raise InvalidNumber(f"has {len(digits)} digits; E.164 numbers have {MIN_DIGITS} to "
                            f"{MAX_DIGITS}, country code included")
    return "+" + digits


def is_e164(raw: object) -> bool:
    try:
        normalise(raw)
    except InvalidNumber:
        return False
    return True


class DoNotCallError(Exception):
    """The do-not-call file cannot be read or has lines that are not numbers (safe to log)."""


def parse_list(text: str) -> tuple[set[str], list[tuple[int, str]]]:
    """The numbers in a do-not-call file, and (line number, reason) for each bad line."""
    numbers: set[str] = set()
    errors: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            numbers.add(normalise(entry))
        except InvalidNumber as e:
            errors.append((n, str(e)))
    return numbers, errors


def _describe(path: Path, errors: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"line {n}: {reason}" for n, reason in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"{path}: {shown}{more}"


class DoNotCall:
    """The numbers never to dial, backed by one text file.

    `load()` at start (a bad line stops it: a number the operator meant to block and that we
    cannot read must not be dialled by accident); `refresh()` before each round of dialling
    (cheap: one stat, a re-read only when the file changed; a bad line is then logged and
    skipped); `add()` to append. A missing file is an empty list, created on the first add."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._numbers: frozenset[str] = frozenset()
        self._stat: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last read
        self._lock = asyncio.Lock()

    def __contains__(self, number: object) -> bool:
        try:
            return normalise(number) in self._numbers
        except InvalidNumber:
            return False

    def __len__(self) -> int:
        return len(self._numbers)

    async def load(self) -> None:
        """Read the file; DoNotCallError when it cannot be read or has a bad line."""
        async with self._lock:
            stat, text = await asyncio.to_thread(self._read)
            numbers, errors = parse_list(text)
            if errors:
                raise DoNotCallError(_describe(self.path, errors))
            self._numbers, self._stat = frozenset(numbers), stat
        log.info("do-not-call list %s: %d numbers", self.path, len(self._numbers))

    async def refresh(self) -> bool:
        """Re-read the file if it changed since it was last read; True when it was re-read.
        A file that cannot be read now keeps the list as it was (logged)."""
        async with self._lock:
            try:
                stat = await asyncio.to_thread(self._stat_of)
                if stat == self._stat:
                    return False
                stat, text = await asyncio.to_thread(self._read)
            except DoNotCallError as e:
                log.warning("do-not-call list kept as it was: %s", e)
                return False
            numbers, errors = parse_list(text)
            if errors:
                log.warning("do-not-call list: lines skipped: %s", _describe(self.path, errors))
            self._numbers, self._stat = frozenset(numbers), stat
            return True

    async def add(self, numbers: Iterable[object]) -> list[str]:
        """Append these numbers (normalised) and return those that were not listed yet.

        All or nothing: InvalidNumber naming the first bad entry's position, before anything is
        written. Returns once the new lines are on disk (fsync)."""
        wanted: list[str] = []
        for i, raw in enumerate(numbers):
            try:
                number = normalise(raw)
            except InvalidNumber as e:
                raise InvalidNumber(f"numbers[{i}] {e}") from None
            if number not in wanted:
                wanted.append(number)
        async with self._lock:
            new = [n for n in wanted if n not in self._numbers]
            if new:
                await asyncio.to_thread(self._append, new)
                self._numbers = self._numbers | frozenset(new)
        return new

    # --- file access (run on a worker thread) ---

    def _stat_of(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DoNotCallError(f"cannot read {self.path}: {e.strerror}") from None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[tuple[int, int, int] | None, str]:
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None, ""
        except OSError as e:
            raise DoNotCallError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DoNotCallError(f"{self.path} is not UTF-8 text") from None
        return (st.st_ino, st.st_size, st.st_mtime_ns), text

    def _append(self, numbers: list[str]) -> None:
        created = not self.path.exists()
        if created and self.path.parent != Path():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as f:
            f.seek(0, os.SEEK_END)
            prefix = b""
            if f.tell() > 0:  # a file edited by hand may lack its final newline
                f.seek(-1, os.SEEK_END)
                prefix = b"" if f.read(1) == b"\n" else b"\n"
            f.write(prefix + "".join(f"{n}\n" for n in numbers).encode())
            f.flush()
            os.fsync(f.fileno())
        if created:  # the new directory entry must survive a crash too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
