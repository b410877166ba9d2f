"""The test journal (tests/journal.py): a pytest run cut off mid-test resumes after the tests that had
passed; what had failed before the host died runs again, and that run decides. And the nested host's
policy for attempts (tests/hosts/nested.py): a host failure resumes, failed tests get one fresh host."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.hosts.nested import (EXIT_HOST_FAILED, EXIT_TESTS_FAILED, EXIT_TIMEOUT, JournalWatch, Relay, StallWatch,
                                next_attempt, unfinished)
from tests.journal_file import read

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


def test_a_run_that_timed_out_shows_why_its_earlier_failures_failed(tmp_path: Path) -> None:
    journal = _sample(tmp_path, "False")
    first = _pytest(tmp_path, journal)  # test_second fails; the "host" dies in test_third, before any summary
    assert "AssertionError" not in first.stdout
    lines = unfinished(EXIT_TIMEOUT, read(journal))
    assert lines[0].endswith("2 finished tests, 1 of them failed: test_sample.py::test_second"), lines
    assert "the slowest: test_sample.py::test_" in lines[1], lines
    assert all(entry.seconds > 0 for entry in read(journal).values())
    assert any("assert False" in line for line in lines[2:]), lines
    assert unfinished(EXIT_TESTS_FAILED, read(journal)) == []  # pytest's summary shows them then
    assert unfinished(0, read(journal)) == [] and unfinished(EXIT_HOST_FAILED, {}) == []


def test_a_relay_finishes_whether_or_not_qemu_opened_its_fifo(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        unopened = Relay(tmp_path / "unopened", write_end)  # QEMU failed before opening it
        unopened.finish()
        assert not unopened._thread.is_alive()
        used = Relay(tmp_path / "used", write_end)
        with open(used.fifo, "wb") as qemu:
            qemu.write(b"out\n")
        used._thread.join(5)
        assert os.read(read_end, 100) == b"out\n"
        # QEMU's end seen just after finish() looked: the copier alive then, no reader at the open
        release = threading.Event()
        used._thread = threading.Thread(target=release.wait, daemon=True)
        used._thread.start()
        finishing = threading.Thread(target=used.finish, args=(0.5,), daemon=True)
        finishing.start()
        finishing.join(5)
        assert not finishing.is_alive(), "finish() waits for a reader that is gone"
        release.set()
    finally:
        os.close(read_end)
        os.close(write_end)


# Linux's stall reports in its own formats (kernel/rcu/tree_stall.h, kernel/watchdog.c); the soft lockup
# is L1's own, from a run on 2026-11-30 (docs/hosts.md, issue 8)
RCU_STALL = (b"[ 3526.011203] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
             b"[ 3526.011302] rcu: \t0-...!: (1 GPs behind) idle=a5c/1/0x4000000000000000 softirq=1/1 fqs=0\n"
             b"[ 3547.026800] rcu: rcu_preempt kthread starved for 10502 jiffies! g7297 f0x0 RCU_GP_WAIT_FQS(5) "
             b"->state=0x0 ->cpu=0\n")
SOFT_LOCKUP = b"[   73.173561] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [khugepaged:36]\n"


def test_the_nested_host_calls_l1_stuck_after_its_kernel_reports_stalls_for_five_minutes() -> None:
    watch = StallWatch(limit=300, gap=180)
    watch.console(b"[    1.0] Run /init as init process\n", 0)
    assert not watch.stuck(1000)  # quiet for long: the heartbeat's and pytest's business, not this watch's
    for now in range(100, 400, 63):  # Linux repeats the report while the stall lasts
        watch.console(RCU_STALL, now)
        assert not watch.stuck(now)
    watch.console(RCU_STALL, 415)
    assert watch.stuck(415)


def test_a_stall_that_passes_or_a_test_that_finishes_ends_the_episode() -> None:
    watch = StallWatch(limit=300, gap=180)
    watch.console(SOFT_LOCKUP, 0)
    watch.console(SOFT_LOCKUP, 26)
    assert not watch.stuck(200)
    assert not watch.stuck(400)  # no report for more than the gap: L1 recovered
    watch.console(SOFT_LOCKUP, 500)  # a new episode starts here
    watch.console(SOFT_LOCKUP, 650)
    assert not watch.stuck(700)
    watch.console(SOFT_LOCKUP[:30], 790)  # a report the console has not finished is not one yet
    watch.console(SOFT_LOCKUP[30:], 800)
    assert watch.stuck(800)
    watch.progressed()  # a test finished: the CPUs are getting on
    assert not watch.stuck(801)


def test_the_nested_host_calls_l1_stuck_when_no_test_has_finished_for_the_limit() -> None:
    watch = JournalWatch(limit=720, size=0, now=0)
    assert not watch.stuck(5000)  # no journal (not pytest, or no test has finished yet): not watched
    assert watch.grown(120, 100)
    assert not watch.grown(120, 500)  # the same size: no test finished
    assert not watch.stuck(820)
    assert watch.stuck(821)  # CI at c33a17e: 2,852 s like this, heartbeat on, no stall report
    assert watch.grown(240, 900)  # a test finished after all: the CPUs are getting on
    assert not watch.stuck(1600)


def test_a_resumed_attempt_is_watched_from_its_start() -> None:
    watch = JournalWatch(limit=720, size=4096, now=50)  # the journal of the attempts before
    assert not watch.stuck(770)
    assert watch.stuck(771)
