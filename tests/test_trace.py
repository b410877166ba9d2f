"""The exit trace and KVM's own counters, on the real /dev/kvm."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from worldswitch.driver.binary_stats import BinaryStats
from worldswitch.errors import WorldswitchError
from worldswitch.vmm.trace import FLAG_KICKED, FLAG_WRITE, TraceRequest, read_trace
from worldswitch.vmx.stats_report import table
from worldswitch.vmx.trace_report import summarise

from .helpers import start_guest

pytestmark = pytest.mark.kvm


def test_every_world_switch_is_recorded_with_its_details(tmp_path: Path) -> None:
    from worldswitch.vmm.builder import build_for_boot
    from worldswitch.vmm.config import MachineConfig

    path = tmp_path / "run.trace"
    machine = build_for_boot(MachineConfig(guest="exits", args="500"), lambda _b: None, trace=TraceRequest(str(path)))
    with machine:
        machine.start()
        assert machine.wait(30) is not None
        stats = machine.stats()
    trace = read_trace(path)
    assert len(trace.records) == stats.world_switches == 1003
    writes = [r for r in trace.records if r.reason == 2 and r.address == 0x1010 and r.flags & FLAG_WRITE]
    assert [r.value for r in writes] == list(range(1, 501))  # the sequence the guest wrote, in order
    mmio = [r for r in trace.records if r.reason == 6 and r.flags & FLAG_WRITE]
    assert {r.address for r in mmio} == {0xFEB00000} and len(mmio) == 500
    times = [r.t_exit_ns for r in trace.records]
    assert times == sorted(times)
    assert all(r.guest_ns > 0 for r in trace.records)
    text = summarise(trace)
    assert "testdev (port)" in text and "testdev (MMIO)" in text and "round trip p50/p90/p99" in text


def test_the_interrupt_path_timeline(tmp_path: Path) -> None:
    from worldswitch.vmm.builder import build_for_boot
    from worldswitch.vmm.config import MachineConfig

    path = tmp_path / "kicks.trace"
    machine = build_for_boot(MachineConfig(guest="fault", args="spin"), lambda _b: None, trace=TraceRequest(str(path)))
    with machine:
        machine.start()
        for _ in range(5):
            time.sleep(0.05)
            machine.pause()
            time.sleep(0.01)
            machine.resume()
        time.sleep(0.05)  # let the guest run again, so that the stop is a sixth kick
        machine.stop()
    trace = read_trace(path)
    kicks = [r for r in trace.records if r.flags & FLAG_KICKED]
    assert len(kicks) == 6  # five pauses and the stop
    assert all(0 < r.address < 1e9 for r in kicks)  # host event -> back in the VMX, in ns
    assert all(r.vmx_ns >= 5e6 for r in kicks[:5])  # parked for the pause before re-entering
    assert "hosted interrupt path: 6 host events" in summarise(trace)


def test_trace_limit_bounds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "small.trace"
    result = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--guest", "exits", "--args", "2000",
                             "--trace", str(path), "--trace-limit", "100", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    trace = read_trace(path)
    assert len(trace.records) == 100
    assert sum(trace.trailer["dropped"].values()) == 4003 - 100  # type: ignore[union-attr]
    summary = subprocess.run([sys.executable, "-m", "worldswitch", "trace", str(path)], capture_output=True, text=True)
    assert summary.returncode == 0 and "trace limit reached: 3903" in summary.stdout


def test_unreadable_or_foreign_traces_are_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"not a trace at all, but long enough to have a header of sixty-four bytes....")
    for path, message in ((tmp_path / "missing", "cannot read trace file"), (bogus, "is not a worldswitch trace")):
        with pytest.raises(WorldswitchError, match=message):
            read_trace(path)
        result = subprocess.run([sys.executable, "-m", "worldswitch", "trace", str(path)], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_truncated_trace_still_summarises(tmp_path: Path) -> None:
    path = tmp_path / "cut.trace"
    subprocess.run([sys.executable, "-m", "worldswitch", "run", "--guest", "exits", "--args", "100", "--trace", str(path),
                    "-q"], check=True)
    data = path.read_bytes()
    path.write_bytes(data[: 64 + 32 * 50 + 7])
    trace = read_trace(path)
    assert len(trace.records) == 50 and trace.trailer.get("truncated")
    assert "ends early" in summarise(trace)


def test_kvm_binary_stats_count_exits_the_kernel_handled() -> None:
    machine, _, _ = start_guest("timer", "30")
    with machine:
        assert machine.wait(30) is not None
        stats = machine.stats()
        vm_stats = BinaryStats(machine.vm.get_stats_fd())
        assert vm_stats.id.startswith("kvm-") and vm_stats.descriptors
        vm_stats.close()
    vcpu = stats.vcpus[0]
    assert vcpu.world_switches == 1  # the DONE ucall
    assert vcpu.kvm["irq_injections"] >= 30  # every timer tick, injected by KVM
    assert vcpu.kvm["exits"] > vcpu.world_switches
    assert "handled in the kernel" in table(stats)
