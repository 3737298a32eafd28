"""The clock: the one place background duties, schedules, back-off and grace periods read the
time from, so tests can move it.

- ``SystemClock``: the machine's UTC time (production).
- ``FileClock``: for tests that run real worker processes. The file holds an ISO-8601 instant
  (``2027-01-31T12:00:00+00:00``) that every process reading it takes as "now"; while the file
  is missing or empty, the system time. A test moves time by writing the file.
- ``ManualClock``: for tests in one process: ``set`` and ``advance``.

The ledger's own SQL takes ``now`` from its caller (``now=clock.now()``) where a duty runs it;
a request's ledger call uses the transaction's ``now()``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def set(self, instant: datetime) -> None:
        if instant.tzinfo is None:
            raise ValueError("the clock needs an aware datetime")
        self._now = instant

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
        return self._now


class FileClock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, datetime | None] | None = None

    def now(self) -> datetime:
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return datetime.now(UTC)
        if self._seen is None or self._seen[0] != stamp:
            text = self.path.read_text().strip()
            self._seen = (stamp, datetime.fromisoformat(text) if text else None)
        return self._seen[1] or datetime.now(UTC)

    def set(self, instant: datetime) -> None:
        """Moves the time of every process reading this file (written whole, then renamed)."""
        if instant.tzinfo is None:
            raise ValueError("the clock needs an aware datetime")
        partial = self.path.with_suffix(".partial")
        partial.write_text(instant.isoformat())
        os.replace(partial, self.path)


def clock_for(path: Path | None) -> Clock:
    """The clock a process uses: the file's when ``ORGWALLET_CLOCK_FILE`` is set."""
    return FileClock(path) if path is not None else SystemClock()
