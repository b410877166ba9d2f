"""SYSCALL from guest user mode on PVM hosts, completed by the VMM (trap-and-emulate).

On this kind of host KVM runs guest ring 3 natively and executes a ring-3 SYSCALL itself: it saves
the return RIP in RCX and RFLAGS in R11 and jumps to LSTAR, but leaves the CPU in ring 3 (CS 0x33;
docs/pvm.md, section 6; the `probe syscall` guest shows it). A stock Linux keeps LSTAR in
supervisor-only kernel text, so the very next fetch faults: the guest's page fault handler runs
(in ring 0, which PVM executes through KVM's instruction emulator) with a user-mode instruction
fetch fault at RIP = LSTAR on its stack, and the kernel kills the process.

The emulator honours KVM's hardware breakpoints (KVM_SET_GUEST_DEBUG), so the VMX puts one on the
guest's page fault handler. When it fires for exactly that fault, the VMX finishes what SYSCALL
should have done, as the CPU would (Intel SDM vol. 2, SYSCALL; AMD APM vol. 3): ring 0 at LSTAR,
the caller's stack pointer untouched, RFLAGS = R11 masked by SFMASK; RCX and R11 are already right.
The kernel's own entry code then runs as on hardware, and returns with SYSRET or IRET, which KVM
executes. Any other page fault goes on: the breakpoint is lifted for one single-stepped
instruction (RF does not suppress it under the emulator) and set again.

The breakpoint is set when the guest writes LSTAR (an MSR filter hands that WRMSR to the VMX,
which completes it), the moment the kernel's IDT is in place, and again after a restore. It costs
two or three extra exits per guest page fault, against the thousands of emulated instructions the
fault itself costs here. Only on hosts whose guest kernel code is emulated; a guest whose LSTAR
is in a user page (which no kernel does) runs its handler in ring 3 as the host leaves it. While
the breakpoint is set, KVM uses the VMM's debug registers, not the guest's: a guest kernel's own
hardware breakpoints (perf, kgdb) do not fire on such a host.
"""

from __future__ import annotations

import struct

from ...driver.constants import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP
from ...driver.kvm import Vcpu
from ...errors import KvmError
from .emulate import EmulationRefused, TrapEmulator

MSR_LSTAR = 0xC0000082
MSR_SFMASK = 0xC0000084
PAGE_FAULT = 14
DR7_L0 = 1  # breakpoint 0 enabled, on execution (R/W0 = 00, LEN0 = 00)
RFLAGS_FIXED = 1 << 1
RFLAGS_RF = 1 << 16
PF_USER_FETCH = 0x4 | 0x10  # error code: user mode, instruction fetch
EXCEPTION_FRAME = struct.Struct("<QQQQQQ")  # error code, RIP, CS, RFLAGS, RSP, SS (64-bit, with error code)


class UserSyscall:
    """One vCPU's SYSCALL completion. Runs on the vCPU's thread, from its exit handlers."""

    def __init__(self, vcpu: Vcpu, emulator: TrapEmulator) -> None:
        self.vcpu = vcpu
        self.emulator = emulator  # for guest-virtual reads through KVM_TRANSLATE
        self.lstar = 0
        self.handler = 0  # the guest's page fault handler, where the breakpoint is
        self.stepping = False
        self.passed = 0  # other page faults the breakpoint let through

    # --- arming ---------------------------------------------------------------------------------

    def on_wrmsr(self, index: int, value: int) -> bool:
        """A guest WRMSR the filter sent here; True when it was LSTAR and is now done."""
        if index != MSR_LSTAR:
            return False
        try:
            self.vcpu.set_msrs({MSR_LSTAR: value})
        except KvmError:
            return False  # a non-canonical address: the guest gets the #GP the CPU would give
        self.lstar = value
        self.arm()
        return True

    def arm(self) -> None:
        """Breakpoint on the page fault handler the IDT names now; nothing while there is no IDT."""
        if not self.lstar:
            self.lstar = self.vcpu.get_msrs([MSR_LSTAR]).get(MSR_LSTAR, 0)
        if not self.lstar:
            return
        try:
            gate = self.emulator.read_gate(self.vcpu, self.vcpu.get_sregs(), PAGE_FAULT)
        except EmulationRefused:
            return
        if gate.present:
            self.handler = gate.target
            self._breakpoint()

    def _breakpoint(self) -> None:
        self.vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [self.handler, 0, 0, 0, 0, 0, 0, DR7_L0])
        self.stepping = False

    # --- the breakpoint ---------------------------------------------------------------------------

    def on_debug(self) -> bool:
        """A KVM_EXIT_DEBUG; True when it was this breakpoint (or its single step) and is handled."""
        if self.stepping:
            self._breakpoint()
            return True
        if not self.handler:
            return False
        regs = self.vcpu.get_regs()
        if regs.rip != self.handler:
            return False
        try:
            error, rip, cs, _rflags, rsp, _ss = EXCEPTION_FRAME.unpack(
                self.emulator.read_virtual(self.vcpu, regs.rsp, EXCEPTION_FRAME.size))
        except EmulationRefused:
            error = rip = cs = rsp = 0
        if cs & 3 == 3 and rip == self.lstar and error & PF_USER_FETCH == PF_USER_FETCH:
            # The frame the fault pushed on the kernel stack is abandoned: the kernel's SYSCALL
            # entry finds its stack itself, as after a real SYSCALL.
            sfmask = self.vcpu.get_msrs([MSR_SFMASK]).get(MSR_SFMASK, 0)
            regs.rip, regs.rsp = self.lstar, rsp
            regs.rflags = (regs.r11 & ~sfmask & ~RFLAGS_RF) | RFLAGS_FIXED
            self.vcpu.set_regs(regs)
            self.emulator.emulated["syscall"] = self.emulator.emulated.get("syscall", 0) + 1  # in --stats
            return True
        # An ordinary page fault: let its first instruction run, then put the breakpoint back.
        self.vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
        self.stepping = True
        self.passed += 1
        return True
