"""Linux booted through firmware, run under the in-guest monitor (`--monitor` with a disk, a CD or
`--firmware bios --kernel`): the firmware and the boot loader run as they are (emulated, on the hosts
the monitor is for: SeaBIOS and GRUB's menu take seconds to a minute), and the VMM takes the machine
over where the boot loader enters the kernel, which would otherwise take a quarter of an hour more.

Boot loaders enter a bzImage at its 32-bit entry (boot.rst, "32-bit Boot Protocol": protected mode,
paging off, ESI the zero page): GRUB's `linux` at code32_start, where it put the protected-mode
kernel (the kernel's pref_address, 16 MiB on x86-64 builds, else 1 or 2 MiB); SeaBIOS's linuxboot
through the kernel's own real-mode setup code, which jumps to 1 MiB. Hardware breakpoints there
(KVM_SET_GUEST_DEBUG; KVM's emulator honours them, as user_syscall.py found) stop the vCPU at that
instruction. The VMM then does what its own loader does for `--kernel --monitor`
(boot/linux.py, take_over_linux: the payload decompressed on the host, the vmlinux paravirtualized
and placed, the loader's zero page and command line kept), stops the PIT and masks the PICs the
firmware programmed, and enters the monitor in long mode as a direct boot does.

Why the PIT and the PICs: under the monitor the CPU's real IF is set while the guest's kernel runs
(only its virtual IF is the kernel's), and the BIOS left the PIT ticking and the PIC's vectors at 8:
a tick would arrive as a double fault. They are left as a reset leaves them, as a direct boot finds
them; Linux programs them itself.
"""

from __future__ import annotations

from typing import Sequence

import lz4.block
import zstandard

from ...boot import paravirt
from ...boot.linux import CpuFeature, LinuxBoot, enters_linux, take_over_linux
from ...boot.longmode import LINUX_GDT, LongModeLayout
from ...boot.monitor import HANDOFF_MAGIC, GuestEntry, MonitorPlacement, load_monitor, pv_functions
from ...driver import structs as s
from ...driver.constants import (KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
                                 KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE)
from ...driver.kvm import Vcpu, Vm
from ...memory.guest import GuestMemory
from ...memory.layout import MemoryMap
from .longmode import CR0_PE, CR0_PG, RFLAGS_RESERVED, setup_long_mode

# What bzimage.py (the decompressors) and linux.py (the paravirtual patcher) import when first used:
# here on the main thread, which imports this module as it builds the machine. The handoff runs on the
# vCPU's thread, which the sandbox allows no file access, so no module may load there.
PRELOADED = (lz4.block, zstandard, paravirt)

# Where boot loaders enter a 64-bit bzImage: 1 MiB (the protocol's load address: SeaBIOS's linuxboot,
# a loader that ignores pref_address), 2 MiB and 16 MiB (CONFIG_PHYSICAL_START's usual values, where
# GRUB loads a relocatable kernel). One debug register each; DR7 enables them for execution.
ENTRIES = (0x100000, 0x200000, 0x1000000)
DR7_EXECUTE = sum(1 << (2 * index) for index in range(len(ENTRIES)))  # L0, L1, L2; R/W and LEN 0
PIC_ALL_MASKED = 0xFF
PIT_NO_MODE = 0xFF  # what KVM's PIT reset leaves in a channel: it counts nothing until programmed


class FirmwareHandoff:
    """The boot vCPU's watch for the kernel's entry, and the switch to the monitor. Runs on the
    vCPU's thread, from its debug exits."""

    def __init__(self, vcpu: Vcpu, vm: Vm, memory: GuestMemory, memory_map: MemoryMap, placement: MonitorPlacement,
                 monitor_image: bytes, refused: Sequence[CpuFeature]) -> None:
        self.vcpu = vcpu
        self.vm = vm
        self.memory = memory
        self.memory_map = memory_map
        self.placement = placement
        self.monitor_image = monitor_image
        self.refused = refused  # the CPU features its kernel is told not to use
        self.stepping = False  # over a boot loader's own code at a watched address
        self.boot: LinuxBoot | None = None  # what was taken over, once it has been

    @property
    def handed_over(self) -> bool:
        """Whether the monitor runs: its handoff page holds the magic load_monitor writes (guest
        memory, so that a restored machine knows too)."""
        return self.memory.read_int(self.placement.physical_base, 8) == HANDOFF_MAGIC

    def arm(self) -> None:
        """The breakpoints, unless the monitor runs already (a restored machine)."""
        if not self.handed_over:
            debugreg = [*ENTRIES, 0, 0, 0, 0, DR7_EXECUTE]  # DR0-DR2 the entries, DR3-DR6 unused, DR7
            self.vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, debugreg)
        self.stepping = False

    def on_debug(self) -> bool:
        """A KVM_EXIT_DEBUG: True when it was one of these breakpoints (or the step over one), now
        dealt with. Raises WorldswitchError when the Linux its boot loader started cannot run under
        the monitor."""
        if self.stepping:
            self.arm()
            return True
        regs = self.vcpu.get_regs()
        if regs.rip not in ENTRIES:
            return False
        sregs = self.vcpu.get_sregs()
        protected_flat = sregs.cr0 & CR0_PE and not sregs.cr0 & CR0_PG and sregs.cs.db and not sregs.cs.base
        if not (protected_flat and enters_linux(self.memory, regs.rsi & 0xFFFFFFFF, regs.rip)):
            # a boot loader's own code (GRUB's core runs at 1 MiB): one instruction, then watch again
            self.vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
            self.stepping = True
            return True
        self.vcpu.set_guest_debug(0)  # once: the boot loader has chosen
        boot = take_over_linux(self.memory, self.memory_map, regs.rsi & 0xFFFFFFFF, regs.rip, pv_functions(),
                               self.refused)
        self._silence_legacy_interrupts()
        layout = LongModeLayout(selectors=LINUX_GDT)
        setup_long_mode(self.memory, sregs, layout)
        guest = GuestEntry(boot.entry, layout.stack_top, 0, boot.zero_page, 0, boot.iret_site, boot.sysret_site)
        start = load_monitor(self.memory, self.monitor_image, self.placement, layout, guest)
        sregs.cr3 = start.cr3
        sregs.interrupt_bitmap[:] = [0] * len(sregs.interrupt_bitmap)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(s.kvm_regs(rip=start.rip, rflags=RFLAGS_RESERVED))
        self.boot = boot
        return True

    def _silence_legacy_interrupts(self) -> None:
        """The PIT stopped and the PICs masked, as after a reset. Masks alone are not enough: Linux's
        init_8259A starts with ICW1, which clears the mask, and a tick between it and ICW2 came at
        the BIOS's vector 8 (a #DF under the monitor, a general protection fault and a panic in
        Linux; seen under load, where that window is wide)."""
        pit = self.vm.get_pit2()
        pit.channels[0].mode = PIT_NO_MODE
        pit.channels[0].count = 0
        self.vm.set_pit2(pit)
        for chip_id in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE):
            chip = self.vm.get_irqchip(chip_id)
            chip.chip.pic.imr = PIC_ALL_MASKED
            chip.chip.pic.irr = 0
            self.vm.set_irqchip(chip)
