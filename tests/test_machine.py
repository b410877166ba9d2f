"""The VMM on the real /dev/kvm with the built-in guests: the run loop, exit accounting, devices,
interrupts, errors, and the hosted interrupt path (kicks, pause, stop)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from worldswitch.vmm.host import detect_host_kind
from worldswitch.vmm.result import MachineResult, StopReason

from .helpers import run_guest, start_guest

pytestmark = pytest.mark.kvm


def test_hello_prints_its_banner_from_ring_3_and_exits_through_the_debug_port() -> None:
    run = run_guest("hello")
    assert "Hello from a worldswitch guest: 64-bit long mode, ring 3, 128 MiB of RAM, 1 vCPU." in run.text
    assert run.result.reason is StopReason.GUEST_EXIT
    assert run.result.exit_status == 0


def test_hello_exit_status_and_arguments_reach_the_vmx() -> None:
    run = run_guest("hello", "7 please", memory=64 << 20)
    assert "My arguments: 7 please" in run.text
    assert "64 MiB of RAM" in run.text
    assert run.result.exit_status == 7


def test_a_console_byte_costs_one_world_switch_not_two() -> None:
    """The guest's console polls LSR (an exit: it needs the answer) and writes THR (queued by KVM
    without one, vmm/platform/coalesced.py): every byte arrives, in order, and the writes are counted
    beside the exits."""
    run = run_guest("hello")
    banner = "Every character of this banner reached you through a world switch and the VMX's UART."
    assert banner in run.text and run.text.index(banner) > run.text.index("Hello from a worldswitch guest")
    printed = run.stats.devices["serial"]["bytes_out"]
    assert printed == len(run.output) > 150
    assert run.stats.coalesced["writes"] == printed
    assert run.stats.exits == {"io": printed + 1}  # one LSR read a byte, and the debug port's exit


def test_a_byte_left_queued_by_a_guest_that_makes_no_exit_still_arrives() -> None:
    """The echo guest prints its prompt and then spins in ring 3 until input arrives, without an
    exit: the prompt's last byte, written after its last LSR read, reaches the console only by the
    drain's own thread (within DRAIN_PERIOD_S)."""
    machine, output, _ = start_guest("echo")
    with machine:
        assert output.wait_for(b"('quit' ends)\r\n", 5)
        switches = machine.stats().world_switches
        assert machine.stats().coalesced["writes"] == len(output.data)
        time.sleep(0.05)
        assert machine.stats().world_switches == switches  # nothing exited to bring it
        machine.stop()


def test_every_exit_is_counted_exactly_once() -> None:
    n = 3000
    run = run_guest("exits", str(n))
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    assert run.result.value == n
    for name in ("testdev_pio", "testdev_mmio"):
        state = run.machine.devices[name].state()
        assert (state.writes, state.last, state.errors) == (n, n, 0)
    # n writes + 1 read-back + 1 ucall port write; n MMIO writes + 1 read-back
    assert run.stats.exits == {"io": n + 2, "mmio": n + 1}
    vcpu = run.stats.vcpus[0]
    assert vcpu.world_switches == 2 * n + 3
    assert 0 < vcpu.guest_ns + vcpu.vmx_ns <= run.stats.wall_ns


@pytest.mark.parametrize("mode", ["io", "mmio"])
def test_exits_guest_can_do_one_kind_only(mode: str) -> None:
    run = run_guest("exits", f"500 {mode}")
    assert run.result.reason is StopReason.GUEST_DONE
    other = "mmio" if mode == "io" else "io"
    assert run.machine.devices[f"testdev_{mode if mode == 'mmio' else 'pio'}"].state().writes == 500
    assert run.machine.devices[f"testdev_{other if other == 'mmio' else 'pio'}"].state().writes == 0


@pytest.mark.parametrize("source", ["lapic", "pit"])
def test_timer_interrupts_reach_the_guest_idt_while_it_runs_in_ring_3(source: str) -> None:
    run = run_guest("timer", f"50 {source}")
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    ticks, user_ticks, used_pit, _ = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert ticks == 50
    assert user_ticks > 0  # interrupts arrived while the guest was in ring 3
    assert used_pit == (source == "pit")
    # Timer interrupts are delivered inside KVM: the VMX sees only the final ucall.
    assert run.stats.exits == {"io": 1}
    assert run.stats.wall_ns >= 40e6  # 50 ticks at 1 kHz take about 50 ms


def test_serial_input_arrives_through_the_uart_interrupt() -> None:
    machine, output, _ = start_guest("echo")
    with machine:
        assert output.wait_for(b"type a line")
        machine.devices["serial"].receive(b"hello world\r")  # type: ignore[attr-defined]
        assert output.wait_for(b"HELLO WORLD")
        machine.devices["serial"].receive(b"second\rquit\r")  # type: ignore[attr-defined]
        result = machine.wait(10)
    assert result is not None and result.reason is StopReason.GUEST_DONE
    assert result.value == 2


@pytest.mark.parametrize(
    "mode,reason,text",
    [
        ("ud", StopReason.GUEST_ABORT, "unhandled #UD (invalid opcode), vector 6, at rip 0x"),
        ("gp", StopReason.GUEST_ABORT, "unhandled #GP (general protection)"),
        ("abort", StopReason.GUEST_ABORT, "guest assertion failed at fault.c:"),
        ("triple", StopReason.TRIPLE_FAULT, "guest triple-faulted on vCPU 0"),
    ],
)
def test_faulting_guests_end_with_a_clear_reason(mode: str, reason: StopReason, text: str) -> None:
    run = run_guest("fault", mode)
    assert run.result.reason is reason
    assert text in run.result.message
    assert run.result.exit_status != 0


def test_unmapped_mmio_is_a_rate_limited_warning_and_the_guest_keeps_running() -> None:
    run = run_guest("fault", "unmapped 2000")
    assert run.result.reason is StopReason.GUEST_DONE
    assert run.result.details["ucall"].args[1] == 0xFFFFFFFF  # type: ignore[union-attr]  # reads float high
    assert run.stats.unmapped_mmio == 2001
    assert 1 <= len(run.warnings) <= 10
    assert "unmapped MMIO address 0xd0000000" in run.warnings[0]


@pytest.mark.parametrize("mode", ["spin", "halt"])
def test_a_vcpu_that_never_exits_is_stopped_promptly(mode: str) -> None:
    machine, output, _ = start_guest("fault", mode)
    with machine:
        if mode == "spin":  # its line on the serial port costs exits of its own, before the loop
            assert output.wait_for(b"spinning in ring 3", timeout=30)
        time.sleep(0.3)
        assert machine.running
        exits_before = Counter(machine.stats().vcpus[0].exits)
        started = time.monotonic()
        result = machine.stop()
        elapsed = time.monotonic() - started
        stats = machine.stats()
    assert result.reason is StopReason.STOPPED
    assert elapsed < 1.0
    vcpu = stats.vcpus[0]
    assert Counter(vcpu.exits) - exits_before == {"intr": 1}  # the kick is the only way out of the loop
    assert vcpu.kicks == 1
    assert vcpu.kick_latency_ns_max < 500e6


def test_pause_parks_every_vcpu_and_resume_reenters_the_guest() -> None:
    machine, _, _ = start_guest("exits", "200000 io")
    with machine:
        time.sleep(0.2)
        machine.pause()
        register = machine.devices["testdev_pio"]
        before = register.state().writes  # type: ignore[attr-defined]
        time.sleep(0.2)
        assert register.state().writes == before  # type: ignore[attr-defined]  # parked: no guest progress
        assert machine.runners[0].parked.is_set()
        machine.resume()
        time.sleep(0.1)
        assert register.state().writes > before  # type: ignore[attr-defined]
        machine.stop()


def test_no_exit_is_lost_or_handled_twice_under_a_storm_of_kicks() -> None:
    n = 15000
    machine, _, _ = start_guest("exits", f"{n}")
    pauses = 0
    with machine:
        while machine.wait(0.003) is None:
            machine.pause()
            machine.resume()
            pauses += 1
        result = machine.result
        stats = machine.stats()
        states = [machine.devices[name].state() for name in ("testdev_pio", "testdev_mmio")]
    assert result is not None and result.reason is StopReason.GUEST_DONE, result
    assert pauses > 50
    for state in states:
        assert (state.writes, state.last, state.errors) == (n, n, 0)  # type: ignore[attr-defined]
    assert stats.exits["io"] == n + 2 and stats.exits["mmio"] == n + 1
    assert stats.vcpus[0].kicks >= pauses * 0.9


def test_the_first_end_wins() -> None:
    machine, _, _ = start_guest("fault", "spin")
    with machine:
        machine.request_exit(MachineResult.of(StopReason.POWER_OFF, "first"))
        machine.request_exit(MachineResult.of(StopReason.TRIPLE_FAULT, "second"))
        result = machine.wait(5)
    assert result is not None and result.message == "first"


def test_machines_can_be_built_and_closed_repeatedly() -> None:
    for _ in range(5):
        run = run_guest("hello")
        assert run.result.exit_status == 0


def test_two_vcpus_the_second_waits_for_sipi() -> None:
    run = run_guest("hello", cpus=2)
    assert "2 vCPUs" in run.text
    assert run.result.exit_status == 0
    assert run.stats.vcpus[1].world_switches == 1  # only the kick that ended it


def test_ring0_int3_reaches_the_guest_handler_on_any_host() -> None:
    """On PVM, KVM's emulator cannot deliver INT3 in long mode and the VMX does it (vmm/x86/emulate.py);
    with VT-x/AMD-V the CPU does. Either way the guest's #BP handler runs and IRETQ returns."""
    run = run_guest("fault", "int3 5")
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    assert run.result.value == 5
    emulated = run.stats.vcpus[0].vmx_emulated
    assert emulated == ({"int3": 5} if detect_host_kind().kernel_code_emulated else {})


def test_syscall_from_ring_3_lands_where_this_host_puts_it() -> None:
    """The probe `worldswitch info` runs: on hardware a SYSCALL from ring 3 enters ring 0 with
    STAR's kernel CS; PVM keeps it in ring 3 with its own user CS (0x33), which is why a stock
    Linux's first user process dies there (docs/pvm.md)."""
    run = run_guest("probe", "syscall")
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    ring, cs, rcx_is_the_return_address, r11 = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert rcx_is_the_return_address == 1
    if detect_host_kind().driver == "pvm":
        assert (ring, cs) == (3, 0x33)
        assert r11 & 0x3202 == 0x0202  # PVM runs guest user mode with IF set and IOPL 0, whatever the guest asked
    else:
        assert (ring, cs) == (0, 0x08)
        assert r11 & 0x3202 == 0x3002  # the caller's RFLAGS exactly: bit 1, IOPL 3 and IF clear, as it entered ring 3


def test_a_syscall_into_kernel_pages_reaches_ring_0() -> None:
    """LSTAR in a supervisor-only page, as every kernel has it. On hardware the SYSCALL enters ring 0
    by itself; on PVM the handler's fetch faults in ring 3 and the VMX completes the SYSCALL
    (vmm/x86/user_syscall.py), which the statistics count."""
    run = run_guest("probe", "syscall kernel")
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    assert run.result.details["ucall"].args[:3] == (0, 0x08, 1)  # type: ignore[union-attr]  # ring 0, STAR's CS, RCX
    completed = run.stats.vcpus[0].vmx_emulated.get("syscall", 0)
    assert completed == (1 if detect_host_kind().kernel_code_emulated else 0)


@pytest.mark.xfail(detect_host_kind().cpu_emulated, strict=True,
                   reason="QEMU's TCG takes a non-canonical LSTAR without #GP (docs/hosts.md)")
def test_a_non_canonical_lstar_gets_the_guest_a_general_protection_fault() -> None:
    """Hostile input to the VMM's LSTAR filter (PVM) or to the CPU (elsewhere): #GP in the guest,
    not an error in the VMX."""
    run = run_guest("probe", "badlstar")
    assert run.result.reason is StopReason.GUEST_ABORT, run.result.message
    assert "#GP" in run.result.message


def test_a_completed_syscall_returns_to_ring_3_with_sysret() -> None:
    """The handler returns with SYSRETQ, as a kernel does, and user mode goes on (on PVM, KVM
    executes the SYSRET itself and puts its own user CS, 0x33)."""
    run = run_guest("probe", "syscall kernel sysret")
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    ring, cs, rcx_is_the_return_address, user_cs = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert (ring, cs, rcx_is_the_return_address) == (0, 0x08, 1)
    assert user_cs & 3 == 3


@pytest.mark.skipif(not detect_host_kind().kernel_code_emulated,
                    reason="only hosts that leave a guest's SYSCALL in ring 3 need the VMX to complete it")
def test_without_the_vmx_completing_it_the_syscall_faults_in_ring_3(monkeypatch) -> None:
    from worldswitch.vmm.x86.user_syscall import UserSyscall

    monkeypatch.setattr(UserSyscall, "arm", lambda self: None)  # LSTAR is written, no breakpoint is set
    run = run_guest("probe", "syscall kernel")
    assert run.result.reason is not StopReason.GUEST_DONE
    assert "#PF" in run.output.decode(errors="replace") + run.result.message
