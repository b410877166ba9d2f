"""The run loop without KVM, as Firecracker tests its vCPU loop: a fake vCPU whose KVM_RUN writes
canned exits into a kvm_run page laid out as the kernel's, so that dispatch to the buses, the
inline fast paths, the statistics and the end of a run are checked exit by exit."""

from __future__ import annotations

import ctypes
import mmap
import threading
from types import SimpleNamespace
from typing import Callable

import pytest

from worldswitch.driver import structs as s
from worldswitch.driver.constants import KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, Cap, ExitReason, SystemEvent
from worldswitch.driver.kvm import PAGE_SIZE, PIO_DATA_OFFSET, CoalescedRing
from worldswitch.vmm import runloop
from worldswitch.vmm.platform.bus import MmioBus, PioBus
from worldswitch.vmm.platform.coalesced import CoalescedDrain
from worldswitch.vmm.result import MachineResult, StopReason

PORT = 0x80
MMIO_BASE = 0xD000_0000


class FakeVcpu:
    """What VcpuRunner uses of driver.kvm.Vcpu: an id, an fd, the kvm_run mapping."""

    RING_PAGE = 2  # where KVM_CAP_COALESCED_MMIO says the coalesced ring is (as on x86 hosts)

    def __init__(self) -> None:
        self.id = 0
        self.fd = -1
        self.run_request = 0
        self.run_mmap = mmap.mmap(-1, 3 * PAGE_SIZE)
        self.kvm_run = s.kvm_run.from_buffer(self.run_mmap)
        # no binary statistics; the coalesced ring in the third page
        self.vm = SimpleNamespace(check_extension=lambda capability: self.RING_PAGE if capability == Cap.COALESCED_MMIO else 0)

    rip, cs_base = 0x1234, 0  # where get_regs and get_sregs say the vCPU is

    def get_regs(self) -> s.kvm_regs:
        return s.kvm_regs(rip=self.rip, rsp=0x8000)

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        sregs.cs.base = self.cs_base
        return sregs


def io(run: s.kvm_run, page: mmap.mmap, direction: int, port: int, size: int, value: int = 0) -> None:
    run.exit_reason = ExitReason.IO
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = direction, size, port, 1, PIO_DATA_OFFSET
    page[PIO_DATA_OFFSET:PIO_DATA_OFFSET + size] = value.to_bytes(size, "little")


def mmio(run: s.kvm_run, address: int, size: int, write: bool, value: int = 0) -> None:
    run.exit_reason = ExitReason.MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = address, size, int(write)
    run.mmio.data[:8] = list(value.to_bytes(8, "little"))


def power_off(run: s.kvm_run) -> None:
    run.exit_reason = ExitReason.SYSTEM_EVENT
    run.system_event.type = SystemEvent.SHUTDOWN


def run_fake(monkeypatch: pytest.MonkeyPatch, exits: list[Callable[[s.kvm_run, mmap.mmap], None]],
             pio: PioBus, mmio_bus: MmioBus, vcpu: FakeVcpu | None = None,
             coalesced: CoalescedDrain | None = None) -> tuple[runloop.VcpuRunner, list[MachineResult], list[bytes]]:
    """Run the loop over `exits`; returns the runner, what it asked the machine, and the port I/O
    data page as the loop left it before each next entry (what a guest's IN would read)."""
    vcpu = vcpu or FakeVcpu()
    pending = list(exits)
    seen: list[bytes] = []

    def kvm_run(fd: int, request: int, argument: object) -> int:
        seen.append(bytes(vcpu.run_mmap[PIO_DATA_OFFSET:PIO_DATA_OFFSET + 8]))
        pending.pop(0)(vcpu.kvm_run, vcpu.run_mmap)
        return 0

    monkeypatch.setattr(runloop, "kvm_run_call", kvm_run)
    results: list[MachineResult] = []
    runner = runloop.VcpuRunner(vcpu, pio, mmio_bus, results.append, coalesced=coalesced)  # type: ignore[arg-type]
    runner.start()
    assert runner.finished.wait(10), "the loop did not end"
    runner.release()
    return runner, results, seen


@pytest.mark.parametrize("reset", [False, True])
def test_a_triple_fault_names_where_only_if_kvm_kept_it(monkeypatch: pytest.MonkeyPatch, reset: bool) -> None:
    """AMD's KVM puts a vCPU through INIT at a shutdown (svm.c, shutdown_interception), so its
    registers then show the reset state: the message must not name 0xfff0 as where the guest was."""
    vcpu = FakeVcpu()
    if reset:
        vcpu.rip, vcpu.cs_base = runloop.RESET_RIP, runloop.RESET_CS_BASE

    def shutdown(run: s.kvm_run, page: mmap.mmap) -> None:
        run.exit_reason = ExitReason.SHUTDOWN

    _, results, _ = run_fake(monkeypatch, [shutdown], PioBus(), MmioBus(), vcpu)
    (result,) = results
    assert result.reason is StopReason.TRIPLE_FAULT
    if reset:
        assert "where: not known, this host's KVM reset the vCPU" in result.message and "0xfff0" not in result.message
    else:
        assert "(rip 0x1234, rsp 0x8000)" in result.message


def test_exits_reach_their_devices_and_a_power_off_ends_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[str, int, int, int]] = []
    pio, mmio_bus = PioBus(), MmioBus()
    pio.register("port", PORT, 1, lambda offset, size: 0x5A, lambda offset, size, value: writes.append(("pio", offset, size, value)))
    mmio_bus.register("window", MMIO_BASE, 0x1000, lambda offset, size: 0x1122334455667788 & ((1 << 8 * size) - 1),
                      lambda offset, size, value: writes.append(("mmio", offset, size, value)), max_size=8)
    exits = [
        lambda run, page: io(run, page, KVM_EXIT_IO_OUT, PORT, 1, 0x41),
        lambda run, page: io(run, page, KVM_EXIT_IO_IN, PORT, 1),
        lambda run, page: io(run, page, KVM_EXIT_IO_OUT, 0x3FF, 2, 0xFFFF),  # nobody's port: dropped
        lambda run, page: mmio(run, MMIO_BASE + 8, 4, True, 0xDEADBEEF),
        lambda run, page: mmio(run, MMIO_BASE + 16, 8, False),
        lambda run, page: power_off(run),
    ]
    runner, results, seen = run_fake(monkeypatch, exits, pio, mmio_bus)
    assert runner.error is None, runner.error
    assert writes == [("pio", 0, 1, 0x41), ("mmio", 8, 4, 0xDEADBEEF)]
    assert seen[2][0] == 0x5A  # the IN's answer was in the data page when the guest re-entered
    assert [r.reason for r in results] == [StopReason.POWER_OFF]
    assert runner.counts[ExitReason.IO] == 3 and runner.counts[ExitReason.MMIO] == 2
    assert runner.counts[ExitReason.SYSTEM_EVENT] == 1
    assert pio.unmapped.count == 1


def test_a_bug_in_a_device_ends_the_vm_with_the_vcpu_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pio = PioBus()

    def broken(offset: int, size: int, value: int) -> None:
        raise RuntimeError("a bug in the device")

    pio.register("port", PORT, 1, lambda offset, size: 0, broken)
    runner, results, _ = run_fake(monkeypatch, [lambda run, page: io(run, page, KVM_EXIT_IO_OUT, PORT, 1, 1)],
                                  pio, MmioBus())
    assert isinstance(runner.error, RuntimeError)
    assert [r.reason for r in results] == [StopReason.VMX_ERROR]
    assert "vCPU 0: RuntimeError: a bug in the device" in results[0].message


def queue(page: mmap.mmap, port: int, value: int) -> None:
    """A one-byte port write as KVM queues it in the coalesced ring (struct kvm_coalesced_mmio at
    `last`, then `last` moved on)."""
    base = FakeVcpu.RING_PAGE * PAGE_SIZE
    header = s.kvm_coalesced_mmio_ring.from_buffer(page, base)
    capacity = (PAGE_SIZE - ctypes.sizeof(header)) // ctypes.sizeof(s.kvm_coalesced_mmio)
    at = base + ctypes.sizeof(header) + header.last * ctypes.sizeof(s.kvm_coalesced_mmio)
    entry = s.kvm_coalesced_mmio(phys_addr=port, len=1, pio=1)
    entry.data[0] = value
    page[at:at + ctypes.sizeof(entry)] = bytes(entry)
    header.last = (header.last + 1) % capacity
    del header


def test_port_writes_kvm_queued_reach_their_device_before_the_exit_that_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coalesced ring is applied in order, across its end, before the exit KVM reports next is
    handled: the device sees the writes as the guest made them."""
    writes: list[int] = []
    pio = PioBus()
    pio.register("port", PORT, 1, lambda offset, size: 0, lambda offset, size, value: writes.append(value))
    vcpu = FakeVcpu()
    ring = CoalescedRing(vcpu)  # type: ignore[arg-type]
    assert ring.capacity == 170  # (4096 - 8) / 24, as the kernel's KVM_COALESCED_MMIO_MAX
    ring.first.value = ring.last.value = ring.capacity - 1  # the next two wrap around the ring's end
    drain = CoalescedDrain(ring, pio, MmioBus(), SimpleNamespace(active=True),  # type: ignore[arg-type]
                           lambda message: None)

    def queue_two_then_exit(run: s.kvm_run, page: mmap.mmap) -> None:
        queue(page, PORT, ord("a"))
        queue(page, PORT, ord("b"))
        io(run, page, KVM_EXIT_IO_OUT, PORT, 1, ord("c"))

    def queue_one_then_power_off(run: s.kvm_run, page: mmap.mmap) -> None:
        queue(page, PORT, ord("d"))
        power_off(run)

    exits = [queue_two_then_exit, queue_one_then_power_off]
    runner, results, _ = run_fake(monkeypatch, exits, pio, MmioBus(), vcpu, drain)
    assert runner.error is None, runner.error
    assert bytes(writes) == b"abcd"
    assert drain.counters() == {"writes": 3, "drains": 2}
    assert ring.first.value == ring.last.value == 2
    assert [r.reason for r in results] == [StopReason.POWER_OFF]
    ring.release()


def test_work_handed_to_a_vcpu_runs_on_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """call_on_thread (how the monitor's INIT notices rearm an AP's watch, vmm/x86/ap_start.py): the
    work waits for the exit a kick brings, runs on the vCPU's thread, and the caller learns it ran."""
    vcpu = FakeVcpu()
    kicked = threading.Event()
    entries = []

    def kvm_run(fd: int, request: int, argument: object) -> int:
        entries.append(len(entries))
        if len(entries) == 1:  # in the guest until the kick
            assert kicked.wait(10)
            vcpu.kvm_run.exit_reason = ExitReason.INTR
        else:
            power_off(vcpu.kvm_run)
        return 0

    monkeypatch.setattr(runloop, "kvm_run_call", kvm_run)
    monkeypatch.setattr(runloop, "kick_thread", lambda ident: kicked.set())
    results: list[MachineResult] = []
    runner = runloop.VcpuRunner(vcpu, PioBus(), MmioBus(), results.append)  # type: ignore[arg-type]
    ran_on: list[str] = []
    runner.start()
    assert runner.call_on_thread(lambda: ran_on.append(threading.current_thread().name), 10)
    assert runner.finished.wait(10), "the loop did not end"
    assert ran_on == ["vcpu0"] and len(entries) == 2
    assert runner.error is None and [r.reason for r in results] == [StopReason.POWER_OFF]
    # a vCPU whose thread has ended never comes to it: the caller is told so at once
    assert not runner.call_on_thread(lambda: ran_on.append("late"), 10) and ran_on == ["vcpu0"]
    runner.release()
