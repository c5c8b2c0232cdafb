"""Call records that could not be saved before exit, kept in a local file until the next start.

RECORDS_SPOOL names the file (`records-spool.jsonl`: one record as JSON per line). With WORKERS=N
each process writes its own (`records-spool.w2.jsonl`), and a spool is written whole under a
temporary name, then linked into place, so a reader never sees half of one and never appends to
another process's file. At start every process loads every spool of that name in the directory
(whatever the worker count was), each file taken by one process only: it locks the file (flock),
then claims it by an atomic rename (`records-spool.claimed-<id>.jsonl`), and deletes it once its
records are saved. The lock is held until then, so a process that died (kill -9) leaves a claimed
file that the next start takes over, while a live one's claimed file is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("server.records")


def own_spool(base: Path, worker: int | None) -> Path:
    """This process's spool: RECORDS_SPOOL itself, or with WORKERS=N worker i's
    (records-spool.jsonl -> records-spool.w<i>.jsonl)."""
    return _named(base, "" if worker is None else f".w{worker}")


def _named(base: Path, tag: str) -> Path:
    """records-spool.jsonl + ".w2" -> records-spool.w2.jsonl (a name without a suffix: + tag)."""
    return base.with_name(f"{base.stem}{tag}{base.suffix}")


def spool_files(base: Path) -> list[Path]:
    """Every spool of RECORDS_SPOOL's name in its directory: its own, any worker's, or one that
    a process claimed (and may have died with), sorted by name."""
    pattern = re.compile(re.escape(base.stem) + r"(\.[A-Za-z0-9-]+)?" + re.escape(base.suffix))
    try:
        names = sorted(entry.name for entry in os.scandir(base.parent)
                       if pattern.fullmatch(entry.name) and entry.is_file())
    except (FileNotFoundError, NotADirectoryError):  # nothing spooled (the start warns)
        return []
    except OSError as e:
        log.error("cannot look for spooled call records in %s: %s", base.parent, e)
        return []
    return [base.parent / name for name in names]


def unwritable(path: Path) -> str | None:
    """Why a spool could not be written at `path` (a short phrase), or None if it could. A
    directory that does not exist yet is made when spooling: then its parent must be writable.
    Only looks (os.access, which also knows a read-only file system): writes nothing."""
    directory = path.parent.absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable by this user"
    return None


def write(base: Path, worker: int | None, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write `records` to this process's spool (or, if an earlier one nobody loaded yet is there,
    a fresh name beside it) and return where they went. Blocking: run it in a thread. OSError
    when the file cannot be made."""
    path = own_spool(base, worker)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("wb") as out:
            for record in records:
                out.write(orjson.dumps(record) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        tag = f".w{worker}" if worker is not None else ".s"
        target = path
        while True:
            try:
                os.link(temporary, target)  # unlike rename, never replaces an existing file
                break
            except FileExistsError:  # an earlier spool that nobody loaded yet: keep it too
                target = _named(base, f"{tag}-{secrets.token_hex(4)}")
            except OSError:  # no hard links on this file system: a name nobody else uses
                target = _named(base, f"{tag}-{secrets.token_hex(8)}")
                os.rename(temporary, target)
                break
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _sync_directory(path.parent)
    return target


def _sync_directory(directory: Path) -> None:
    """Make a new name in `directory` survive a power cut (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Claim:
    """A spool file this process took: its records, and the lock that keeps it ours."""

    def __init__(self, path: Path, fd: int, records: list[dict[str, Any]], bad_lines: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self.records = records
        self.bad_lines = bad_lines

    def release(self, *, delete: bool) -> None:
        """Done with the file: delete it (its records are saved, or spooled again) or leave it
        for the next start; then unlock it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if delete:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            os.close(fd)


def claim_all(base: Path) -> list[Claim]:
    """Claim every spool of RECORDS_SPOOL's name that no live process holds (blocking: run it
    in a thread); a file that cannot be read is logged and left."""
    claims = []
    for path in spool_files(base):
        try:
            taken = claim(path, base)
        except OSError as e:
            log.error("cannot load spooled call records from %s: %s", path, e)
            continue
        if taken is not None:
            claims.append(taken)
    return claims


def claim(path: Path, base: Path) -> Claim | None:
    """Take the spool file `path` for this process; None when another live process has it or
    it is gone. Blocking: run it in a thread. OSError when it cannot be read or renamed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # a live process is loading it
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # claimed (renamed) and maybe deleted since we opened it
            os.close(fd)
            return None
        claimed = _named(base, f".claimed-{secrets.token_hex(6)}")
        os.rename(path, claimed)
        with os.fdopen(os.dup(fd), "rb") as data:
            records, bad = _parse(data.read())
        return Claim(claimed, fd, records, bad)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def _parse(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The records in a spool file, and how many lines were not records (a torn last line)."""
    records: list[dict[str, Any]] = []
    bad = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("call_sid"), str) \
                and record["call_sid"]:
            records.append(record)
        else:
            bad += 1
    return records, bad
