"""The facts an in-guest monitor stands on (issue 13, docs/monitor.md), checked on this host with the
`gates` guest: an exception or interrupt from ring 3 reaches a handler in ring 3 itself, and on a host
that emulates kernel code (PVM) that handler runs natively, where a ring-0 one is emulated.

KVM's own count of emulated instructions is read between the guest's SYNC (the rounds begin) and its
DONE (they are over), so the ring-0 set-up before them does not count.

Also, without a guest program: which ring-3 code such a host runs natively (64-bit code only, so that
the firmware's and GRUB's 32-bit code cannot be run that way)."""

from __future__ import annotations

import pytest

from bench.gates import run_gates
from worldswitch.boot.longmode import PROGRAM_GDT, LongModeLayout
from worldswitch.driver import structs as s
from worldswitch.driver.binary_stats import BinaryStats
from worldswitch.driver.exits import ExitReason, IoOut, decode_exit
from worldswitch.driver.kvm import Vcpu
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.host import detect_host_kind
from worldswitch.vmm.x86.longmode import RFLAGS_RESERVED, setup_long_mode

pytestmark = pytest.mark.kvm

ROUNDS = {"int3": 1000, "gp": 1000, "timer": 100}


@pytest.mark.parametrize("event", sorted(ROUNDS))
def test_a_gate_to_the_user_code_segment_runs_its_handler_natively_in_ring_3(event: str) -> None:
    rounds = ROUNDS[event]
    run = run_gates(f"{event} {rounds}")
    assert (run.handled, run.ring) == (rounds, 3)
    if run.emulated is not None:  # KVM may decode the faulting `hlt` (or the EOI store) once per round; no handler code
        assert run.emulated <= 2 * rounds, f"{run.emulated} instructions emulated in {rounds} rounds"


@pytest.mark.parametrize("event", sorted(ROUNDS))
def test_a_handler_in_ring_0_is_what_a_kernel_code_emulating_host_emulates(event: str) -> None:
    rounds = ROUNDS[event]
    run = run_gates(f"{event} {rounds} kernel")
    assert (run.handled, run.ring) == (rounds, 0)
    if run.emulated is None or not run.kernel_code_emulated:
        pytest.skip("this host runs ring-0 code natively: nothing is emulated either way")
    assert run.emulated >= 20 * rounds, f"only {run.emulated} instructions emulated in {rounds} rounds"


LOOP_AT = 0x100000  # in the flat32 fixture's 2 MiB
LOOPS = 10_000
RFLAGS_IOPL3 = 0x3000  # the closing `out` from ring 3: VT-x and AMD-V would #GP it (no IDT: a triple fault)


@pytest.mark.parametrize("bits", [64, 32])
def test_ring_3_runs_natively_in_64_bit_code_only(flat32: tuple[Vcpu, GuestMemory], bits: int) -> None:
    """A countdown loop in ring 3, in a 64-bit code segment and in a 32-bit one (compatibility mode,
    where a firmware's or GRUB's code would have to run to be deprivileged): on a host that emulates
    kernel code (PVM) the 64-bit loop runs natively and the 32-bit one is emulated as ring 0 is, two
    instructions an iteration; a host with VT-x or AMD-V runs both."""
    vcpu, memory = flat32
    sregs = vcpu.get_sregs()
    setup_long_mode(memory, sregs, LongModeLayout(selectors=PROGRAM_GDT))  # the low GiB mapped for ring 3 too
    memory.write(LOOP_AT, bytes([0xB9, *LOOPS.to_bytes(4, "little")]) + bytes.fromhex("ffc975fce610"))
    # mov $LOOPS, %ecx; 1: dec %ecx; jnz 1b; out %al, $0x10 (the same bytes in either mode)
    code64 = bits == 64
    sregs.cs = s.kvm_segment(base=0, limit=0xFFFFFFFF, selector=PROGRAM_GDT.user_cs | 3, type=0xB, present=1,
                             dpl=3, db=0 if code64 else 1, s=1, l=1 if code64 else 0, g=1)
    sregs.ds = sregs.es = sregs.ss = s.kvm_segment(base=0, limit=0xFFFFFFFF, selector=PROGRAM_GDT.user_ds | 3,
                                                   type=0x3, present=1, dpl=3, db=1, s=1, g=1)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(s.kvm_regs(rip=LOOP_AT, rsp=0x180000, rflags=RFLAGS_RESERVED | RFLAGS_IOPL3))
    stats = BinaryStats(vcpu.get_stats_fd())
    try:
        before = stats.read()["insn_emulation"]
        assert vcpu.run() == ExitReason.IO
        emulated = stats.read()["insn_emulation"]
        out = decode_exit(ExitReason.IO, vcpu.kvm_run, vcpu.run_mmap)
    finally:
        stats.close()
    assert isinstance(before, int) and isinstance(emulated, int)
    emulated -= before
    assert out == IoOut(0x10, 1, 1, b"\x00") and vcpu.get_regs().rcx & 0xFFFFFFFF == 0  # the loop ran out
    if bits == 32 and detect_host_kind().kernel_code_emulated:
        assert emulated >= 2 * LOOPS, f"only {emulated} instructions emulated in {LOOPS} iterations"
    else:
        assert emulated <= 10, f"{emulated} instructions emulated in {LOOPS} iterations"
