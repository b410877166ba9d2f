"""The test journal's file (tests/journal.py is the pytest plugin that writes and reads it): one JSON
object per line, one line per finished test, appended as the test ends. Kept free of pytest, so that
the nested test host (tests/hosts/nested.py), which runs outside any test environment, can read it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

RANK = {"passed": 0, "skipped": 1, "failed": 2}


@dataclass
class Entry:
    outcome: str  # passed, skipped or failed: a test's worst phase
    report: str = ""  # for a failure, the end of pytest's report of it
    seconds: float = 0.0  # its set-up, call and teardown together


def read(path: Path) -> dict[str, Entry]:
    """The tests the file records, by node id; the last entry of a test wins. A line that the host's
    death cut short is ended (so that lines appended later start clean) and ignored: that test runs
    again."""
    entries: dict[str, Entry] = {}
    if not path.exists():
        return entries
    text = path.read_text(errors="replace")
    if text and not text.endswith("\n"):
        with path.open("a") as journal:
            journal.write("\n")
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            entries[str(entry["test"])] = Entry(str(entry["outcome"]), str(entry.get("report", "")),
                                                float(entry.get("seconds", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return entries


def failed(entries: dict[str, Entry]) -> list[str]:
    """The tests whose last entry is a failure."""
    return sorted(test for test, entry in entries.items() if entry.outcome == "failed")


def append(path: Path, test: str, entry: Entry) -> None:
    """Record `test`'s outcome, flushed and synced: it must survive the host that ran it."""
    line = json.dumps({"test": test, "outcome": entry.outcome, "report": entry.report,
                       "seconds": round(entry.seconds, 6)}) + "\n"
    with path.open("a") as journal:
        journal.write(line)
        journal.flush()
        os.fsync(journal.fileno())
