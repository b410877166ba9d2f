"""The test journal (tests/journal.py): a pytest run cut off mid-test resumes after the tests that had
passed; what had failed before the host died runs again, and that run decides. And the nested host's
policy for attempts (tests/hosts/nested.py): a host failure resumes, failed tests get one fresh host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.hosts.nested import EXIT_HOST_FAILED, EXIT_TESTS_FAILED, next_attempt

REPO = Path(__file__).resolve().parents[1]

SAMPLE = '''
import os
from pathlib import Path

def test_first():
    pass

def test_second():
    assert {second}

def test_third():
    mark = Path(os.environ["SAMPLE_MARK"])
    if not mark.exists():
        mark.touch()
        os._exit(125)  # the host dies here, in the middle of a test

def test_fourth():
    pass
'''


def _pytest(directory: Path, journal: Path) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, PYTHONPATH=str(REPO), WORLDSWITCH_TEST_JOURNAL=str(journal),
                       SAMPLE_MARK=str(directory / "mark"))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.journal", "-p", "no:cacheprovider",
                           "-q", "-rf", "test_sample.py"],
                          cwd=directory, env=environment, capture_output=True, text=True, timeout=120)


def _sample(tmp_path: Path, second: str) -> Path:
    """`second`: test_second's assertion, a Python expression."""
    (tmp_path / "test_sample.py").write_text(SAMPLE.format(second=second))
    return tmp_path / "journal.jsonl"


def test_a_run_cut_off_resumes_after_what_passed_and_a_real_failure_fails_again(tmp_path: Path) -> None:
    journal = _sample(tmp_path, "False")
    first = _pytest(tmp_path, journal)
    assert first.returncode == 125, first.stdout
    assert journal.read_text().count("\n") == 2  # first and second finished; third was cut off

    second = _pytest(tmp_path, journal)  # second runs again (and fails again), then third and fourth
    assert "1 failed, 2 passed, 1 deselected" in second.stdout, second.stdout
    assert "failed in an earlier attempt, ran again: test_sample.py::test_second" in second.stdout
    assert "assert False" in second.stdout  # the earlier attempt's report of it
    assert second.returncode == 1, second.stdout


def test_a_failure_that_came_with_the_dying_host_passes_when_run_again(tmp_path: Path) -> None:
    journal = _sample(tmp_path, 'Path(os.environ["SAMPLE_MARK"]).exists()')  # fails until the crash
    assert _pytest(tmp_path, journal).returncode == 125
    second = _pytest(tmp_path, journal)
    assert second.returncode == 0 and "3 passed, 1 deselected" in second.stdout, second.stdout
    third = _pytest(tmp_path, journal)  # nothing left to run, and nothing failed
    assert third.returncode == 0 and "4 deselected" in third.stdout, third.stdout


def test_a_line_cut_short_by_the_crash_is_ignored(tmp_path: Path) -> None:
    journal = _sample(tmp_path, "True")
    journal.write_text('{"test": "test_sample.py::test_first", "outcome": "passed"}\n{"test": "test_sa')
    (tmp_path / "mark").touch()
    result = _pytest(tmp_path, journal)
    assert result.returncode == 0 and "3 passed, 1 deselected" in result.stdout, result.stdout
    again = _pytest(tmp_path, journal)  # the cut line was ended, so this run's entries were read back
    assert again.returncode == 0 and "4 deselected" in again.stdout, again.stdout


def test_the_nested_host_resumes_after_its_failures_and_gives_failed_tests_one_fresh_host(tmp_path: Path) -> None:
    journal = _sample(tmp_path, "False")
    first = _pytest(tmp_path, journal)  # the "host" dies in test_third, after test_second failed
    assert next_attempt(first.returncode, journal, reran=False) is not None
    assert next_attempt(first.returncode, journal, reran=True) is not None  # a host failure always resumes
    second = _pytest(tmp_path, journal)  # test_second fails again: a real failure
    assert second.returncode == EXIT_TESTS_FAILED
    assert "once more" in str(next_attempt(second.returncode, journal, reran=False))
    third = _pytest(tmp_path, journal)  # its one run in a fresh host
    assert "1 failed, 3 deselected" in third.stdout, third.stdout
    assert next_attempt(third.returncode, journal, reran=True) is None  # and that run decided


def test_the_nested_host_does_not_rerun_a_command_that_failed_without_failed_tests(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"  # no pytest wrote it: the command was something else
    assert next_attempt(EXIT_TESTS_FAILED, journal, reran=False) is None
    assert next_attempt(0, journal, reran=False) is None
    assert next_attempt(EXIT_HOST_FAILED, journal, reran=False) is not None
