"""The monitor's INIT notices (vmm/x86/ap_start.py ApInits), without KVM: which APs are watched again,
on whose thread, and what happens when an AP does not answer. The whole path, on a real /dev/kvm
with Linux taking a CPU offline and back, is test_monitor.py's
test_debians_kernel_runs_two_cpus_under_the_monitor."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

from worldswitch.vmm.x86.ap_start import AP_INIT_ALL, ApInits


class FakeThread:
    """An AP's runner: runs work at once (as its thread would), or never (a vCPU that is gone)."""

    def __init__(self, answers: bool = True, own: bool = False) -> None:
        self.answers, self.own = answers, own

    def call_on_thread(self, work: Callable[[], None], timeout: float) -> bool:
        if self.answers:
            work()
        return self.answers

    def on_own_thread(self) -> bool:
        return self.own


def inits(*threads: FakeThread) -> tuple[ApInits, list[int], list[str]]:
    watched: list[int] = []
    failures: list[str] = []
    starts = [SimpleNamespace(vcpu=SimpleNamespace(id=cpu), rewatch=lambda cpu=cpu: watched.append(cpu))
              for cpu in range(1, len(threads) + 1)]
    return ApInits(list(zip(starts, threads)), failures.append), watched, failures  # type: ignore[arg-type]


def test_an_init_to_one_ap_watches_that_ap_again() -> None:
    notices, watched, failures = inits(FakeThread(), FakeThread(), FakeThread())
    notices.write(0, 4, 2)
    assert watched == [2] and failures == []
    notices.write(0, 4, 0)  # the boot CPU, or no CPU of ours: nothing to watch
    notices.write(0, 4, 9)
    assert watched == [2]


def test_an_init_to_all_but_the_sender_spares_the_sender() -> None:
    notices, watched, failures = inits(FakeThread(), FakeThread(own=True), FakeThread())
    notices.write(0, 4, AP_INIT_ALL)
    assert watched == [1, 3] and failures == []


def test_an_ap_that_does_not_answer_ends_the_vm_with_its_name() -> None:
    notices, watched, failures = inits(FakeThread(), FakeThread(answers=False))
    notices.write(0, 4, 2)
    assert watched == [] and failures == ["--monitor: vCPU 2 did not answer within 5 s, before its INIT"]
