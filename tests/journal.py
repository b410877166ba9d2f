"""A pytest run that resumes where an earlier attempt of it ended, on a fresh host.

The nested test host (tests/hosts/nested.py) runs the suite again when L1 itself crashes (docs/hosts.md,
TCG issue 6), and runs the tests that failed once more in a fresh L1 (TCG issue 5: L1 can go bad without
crashing, and every Linux boot in it then fails). Without a journal each new attempt starts from the
first test, and a crash late in the run costs the whole run again. With `WORLDSWITCH_TEST_JOURNAL=FILE`
set, every finished test's outcome is appended to FILE as it ends (tests/journal_file.py: flushed and
synced, so it survives the host that ran it), and a run that finds the file deselects the tests that
passed (or were skipped) there. The test that was running when the host died has no entry, so it runs
again; so does every test that failed in an earlier attempt. The faults that crash L1 corrupt L2 first:
we have seen an L2 vCPU triple-fault in the middle of Linux's boot, and a restored VM stop, minutes
before L1 panicked. A real failure fails again in the next attempt, which decides the run; the
summary shows the earlier attempt's report of each one beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.journal_file import RANK, Entry, append, failed, read

ENVIRONMENT = "WORLDSWITCH_TEST_JOURNAL"
_REPORT_CHARS = 4000  # the end of a failure's report, kept so that a later attempt can show it


class Journal:
    """Registered as a pytest plugin when ENVIRONMENT names a file (this module is one: tests/conftest.py
    loads it; `-p tests.journal` does elsewhere)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.earlier = read(path)
        self.current: dict[str, Entry] = {}  # this run's tests, their worst phase so far

    def _done(self, test: str) -> bool:
        entry = self.earlier.get(test)
        return entry is not None and entry.outcome != "failed"

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        done = [item for item in items if self._done(item.nodeid)]
        if done:
            items[:] = [item for item in items if not self._done(item.nodeid)]
            config.hook.pytest_deselected(items=done)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = report.outcome if report.outcome in RANK else "failed"
        entry = self.current.setdefault(report.nodeid, Entry("passed"))
        entry.seconds += report.duration
        if RANK[outcome] > RANK[entry.outcome]:
            entry.outcome = outcome
        if outcome == "failed":
            entry.report = (entry.report + f"({report.when}) " + report.longreprtext)[-_REPORT_CHARS:]
        if report.when == "teardown":
            append(self.path, report.nodeid, entry)

    def pytest_terminal_summary(self, terminalreporter) -> None:  # type: ignore[no-untyped-def]
        if not self.earlier:
            return
        failures = failed(self.earlier)
        terminalreporter.write_line(f"resumed: {len(self.earlier)} tests had finished in earlier attempts; "
                                    f"{len(failures)} of them had failed there and ran again")
        for test in failures:
            terminalreporter.write_sep("_", f"failed in an earlier attempt, ran again: {test}")
            terminalreporter.write_line(self.earlier[test].report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.earlier and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
            session.exitstatus = pytest.ExitCode.OK  # everything had passed in earlier attempts


def pytest_configure(config: pytest.Config) -> None:
    name = os.environ.get(ENVIRONMENT)
    if name:
        config.pluginmanager.register(Journal(Path(name)), "worldswitch-journal")
