"""A pytest run that resumes where an earlier attempt of it was cut off.

The nested test host (tests/hosts/nested.py) runs the suite again when L1 itself crashes (docs/hosts.md,
TCG issue 6). Without a journal the new attempt starts from the first test, and a crash late in the run
costs the whole run again. With `WORLDSWITCH_TEST_JOURNAL=FILE` set, every finished test's outcome is
appended to FILE as it ends (flushed and synced, so it survives the host that ran it), and a run that
finds the file deselects the tests that passed (or were skipped) there. The test that was running when
the host died has no entry, so it runs again; so does every test that failed in an earlier attempt.
An attempt is only ever cut off by its host's failure, and the faults that crash L1 corrupt L2 first:
we have seen an L2 vCPU triple-fault in the middle of Linux's boot, and a restored VM stop, minutes
before L1 panicked. A real failure fails again in the next attempt, which decides the run; the
summary shows the earlier attempt's report of each one beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

ENVIRONMENT = "WORLDSWITCH_TEST_JOURNAL"
_RANK = {"passed": 0, "skipped": 1, "failed": 2}
_REPORT_CHARS = 4000  # the end of a failure's report, kept so that a later attempt can show it


@dataclass
class Entry:
    outcome: str  # passed, skipped or failed: a test's worst phase
    report: str = ""  # for a failure, the end of pytest's report of it


class Journal:
    """Registered as a pytest plugin when ENVIRONMENT names a file (this module is one: tests/conftest.py
    loads it; `-p tests.journal` does elsewhere)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.earlier = self._read(path)
        self.current: dict[str, Entry] = {}  # this run's tests, their worst phase so far

    @staticmethod
    def _read(path: Path) -> dict[str, Entry]:
        earlier: dict[str, Entry] = {}
        if not path.exists():
            return earlier
        text = path.read_text(errors="replace")
        if text and not text.endswith("\n"):
            with path.open("a") as journal:  # end the line the crash cut short, so that ours start clean
                journal.write("\n")
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                earlier[str(entry["test"])] = Entry(str(entry["outcome"]), str(entry.get("report", "")))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut short when the host died: that test runs again
        return earlier

    @property
    def earlier_failures(self) -> list[str]:
        return sorted(test for test, entry in self.earlier.items() if entry.outcome == "failed")

    def _done(self, test: str) -> bool:
        entry = self.earlier.get(test)
        return entry is not None and entry.outcome != "failed"

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        done = [item for item in items if self._done(item.nodeid)]
        if done:
            items[:] = [item for item in items if not self._done(item.nodeid)]
            config.hook.pytest_deselected(items=done)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = report.outcome if report.outcome in _RANK else "failed"
        entry = self.current.setdefault(report.nodeid, Entry("passed"))
        if _RANK[outcome] > _RANK[entry.outcome]:
            entry.outcome = outcome
        if outcome == "failed":
            entry.report = (entry.report + f"({report.when}) " + report.longreprtext)[-_REPORT_CHARS:]
        if report.when == "teardown":
            line = json.dumps({"test": report.nodeid, "outcome": entry.outcome, "report": entry.report}) + "\n"
            with self.path.open("a") as journal:
                journal.write(line)
                journal.flush()
                os.fsync(journal.fileno())

    def pytest_terminal_summary(self, terminalreporter) -> None:  # type: ignore[no-untyped-def]
        if not self.earlier:
            return
        failures = self.earlier_failures
        terminalreporter.write_line(f"resumed: {len(self.earlier)} tests had finished in an attempt its host's failure "
                                    f"cut off; {len(failures)} of them had failed there and ran again")
        for test in failures:
            terminalreporter.write_sep("_", f"failed in the attempt cut off, ran again: {test}")
            terminalreporter.write_line(self.earlier[test].report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.earlier and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
            session.exitstatus = pytest.ExitCode.OK  # everything had passed before the host died


def pytest_configure(config: pytest.Config) -> None:
    name = os.environ.get(ENVIRONMENT)
    if name:
        config.pluginmanager.register(Journal(Path(name)), "worldswitch-journal")
