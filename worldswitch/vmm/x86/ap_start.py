"""An application processor of a Linux or a program run under the in-guest monitor (`--monitor --cpus N`;
docs/monitor.md, "More than one vCPU"): how it gets onto its own copy of the monitor.

The boot vCPU's Linux starts each AP as on hardware: INIT and a startup IPI through its x2APIC's ICR
(a WRMSR the monitor makes for it), which KVM's in-kernel LAPIC delivers. The AP then runs Linux's
real-mode trampoline as it is (emulated here: a few hundred instructions), from real mode to 64-bit
ring 0 on the trampoline's own page tables and GDT, and jumps to `secondary_startup_64` in the kernel's
text (in a firmware boot too: SeaBIOS's own start of the APs, before the kernel, is not watched).
A hardware breakpoint there (KVM_SET_GUEST_DEBUG, as the firmware handoff uses) stops the AP at
that instruction; the VMM hands its copy of the monitor the AP's state, and the AP enters the monitor
instead, which runs the kernel from that instruction in ring 3 as it does the boot vCPU's. A program's
APs come the same way through its own trampoline, to its own function of that name (boot/program.py).

A CPU the guest takes offline and brings back is started again the same way, INIT and startup IPI,
and the INIT resets it: its copy of the monitor is gone, and its next entry into the kernel must be
taken over again. The monitor names the CPU on AP_INIT_PORT before its kernel's ICR write of an INIT
(monitor.h); ApInits watches that CPU's entry again, on the CPU's own thread, before the boot vCPU
goes on to send the INIT. An INIT through the xAPIC is a store to its page, which the monitor does
not see: there a Linux's AP names itself as it parks (a HLT with interrupts off: play_dead).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from ...boot.monitor import ApState, MonitorPlacement, ap_entry_of, start_ap, stop_ap
from ...driver import structs as s
from ...driver.constants import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP
from ...driver.kvm import Vcpu
from ...errors import GuestImageError
from ...memory.guest import GuestMemory
from .longmode import EFER_LMA, EFER_NXE, RFLAGS_RESERVED

DR7_L0 = 1  # DR0 enabled; R/W0 and LEN0 zero: an instruction fetch
AP_INIT_PORT = 0x1008  # monitor.h: the CPU its kernel is about to send INIT to
AP_INIT_ALL = 0xFFFF_FFFF  # an INIT to all but the sender
ANSWER_S = 5.0  # how long an AP's thread may take to come to the watch (a kick brings it at once)


class ApStart:
    """One AP's watch for its entry into Linux, and its switch to its copy of the monitor. Runs on
    the AP's thread, from its debug exits."""

    def __init__(self, vcpu: Vcpu, memory: GuestMemory, placement: MonitorPlacement, monitor_image: bytes) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.placement = placement
        self.monitor_image = monitor_image

    def arm(self) -> None:
        """The breakpoint at the AP's entry into Linux, unless its copy of the monitor runs already (a
        restored machine) or the boot vCPU's copy names none."""
        cpu = self.vcpu.id
        address = ap_entry_of(self.memory, self.placement, cpu)
        if self.placement.entered(self.memory, cpu) or not address:
            return
        self.vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [address, 0, 0, 0, 0, 0, 0, DR7_L0])

    def rewatch(self) -> None:
        """The AP's copy of the monitor stops (an INIT is coming), and its next entry into the kernel
        is watched. On the AP's own thread."""
        stop_ap(self.memory, self.placement, self.vcpu.id)
        self.arm()

    def on_debug(self) -> bool:
        """A KVM_EXIT_DEBUG: True when it was this breakpoint, the AP now entering the monitor. Raises
        GuestImageError when the AP came there in a state the monitor cannot take over."""
        cpu = self.vcpu.id
        if self.placement.entered(self.memory, cpu):
            return False
        regs = self.vcpu.get_regs()
        if regs.rip != ap_entry_of(self.memory, self.placement, cpu):
            return False
        sregs = self.vcpu.get_sregs()
        if not sregs.efer & EFER_LMA or not sregs.cs.l:
            raise GuestImageError(f"vCPU {cpu} reached the kernel's AP entry {regs.rip:#x} outside 64-bit mode")
        if not sregs.efer & EFER_NXE:  # the monitor's own tables have NX pages, as the boot vCPU's entry allows
            raise GuestImageError(f"vCPU {cpu} reached the kernel's AP entry {regs.rip:#x} with EFER.NXE clear, "
                                  "which the monitor needs")
        self.vcpu.set_guest_debug(0)
        state = ApState(regs.rip, regs.rsp, sregs.cr3, sregs.gdt.base, sregs.gdt.limit, sregs.tr.selector,
                        sregs.cs.selector, sregs.ss.selector)
        start = start_ap(self.memory, self.monitor_image, self.placement, cpu, state)
        sregs.cr3 = start.cr3
        sregs.interrupt_bitmap[:] = [0] * len(sregs.interrupt_bitmap)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(s.kvm_regs(rip=start.rip, rflags=RFLAGS_RESERVED))
        return True


class ApThread(Protocol):
    """What ApInits needs of an AP's runner (vmm/runloop.py VcpuRunner)."""

    def call_on_thread(self, work: Callable[[], None], timeout: float) -> bool: ...

    def on_own_thread(self) -> bool: ...


class ApInits:
    """AP_INIT_PORT: the monitor's notice, before its kernel sends an INIT, of the CPU it goes to. Each
    AP named is watched again (ApStart.rewatch) on its own thread, the sender waiting: its INIT
    follows the notice. An INIT to all but the sender (the notice's all ones) spares the sender. A
    Linux's AP that names itself is halting with interrupts off, parked until an INIT, which may come
    through the xAPIC's page, a store the monitor never sees (`nox2apic`): watched again at once."""

    def __init__(self, aps: Sequence[tuple[ApStart, ApThread]], fail: Callable[[str], None]) -> None:
        """`aps`: each AP's watch, and what runs work on its vCPU's thread; `fail` ends the VM with a message."""
        self.starts = {start.vcpu.id: (start, thread) for start, thread in aps}
        self.fail = fail

    def read(self, _offset: int, _size: int) -> int:
        return 0

    def write(self, _offset: int, _size: int, value: int) -> None:
        named = list(self.starts) if value == AP_INIT_ALL else [value] if value in self.starts else []
        for cpu in named:
            start, thread = self.starts[cpu]
            if thread.on_own_thread():
                if value != AP_INIT_ALL:  # an AP that names itself: parked until an INIT, maybe an xAPIC's
                    start.rewatch()
                continue  # else the sender of an INIT to all but itself
            if not thread.call_on_thread(start.rewatch, ANSWER_S):
                self.fail(f"--monitor: vCPU {cpu} did not answer within {ANSWER_S:g} s, before its INIT")
