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

While the firmware runs, the runner samples where the boot vCPU is, a few times a second
(on_sample): a byte-copy loop caught running (GRUB's memmove, copyloop.py), and the memmove's loop
of the other direction beside it, get the debug registers the entries leave free, and each call of
one then costs one debug exit instead of four or five emulated instructions a byte; a long REP MOVS caught running (GRUB's relocator) is finished there. GRUB's
core image is watched where diskboot.img enters it, and then the call of its LZMA decoder, whose
output the VMM writes instead (grub_core.py). GRUB copies its kernel's setup header through those
loops; once a served copy has held it, only 1 MiB and that kernel's entry are watched, and GRUB's
two loops both have a debug register (and before that too, for 2 MiB, the rarest entry).

The four debug registers are shared out by the boot's stage. On a disk or CD boot no kernel can be
entered before the BIOS enters the boot sector (0x7c00), so until then that address is watched
instead of the entries, and SeaBIOS's fill loop has a register during POST (2.2 s of a 30 s boot).

Why the PIT and the PICs: under the monitor the CPU's real IF is set while the guest's kernel runs
(only its virtual IF is the kernel's), and the BIOS left the PIT ticking and the PIC's vectors at 8:
a tick would arrive as a double fault. They are left as a reset leaves them, as a direct boot finds
them; Linux programs them itself.
"""

from __future__ import annotations

from typing import Sequence

import capstone
import lz4.block
import zstandard

from ...boot import paravirt
from ...boot.linux import HDRS_AT, SETUP_HEADER_SIZE, CpuFeature, LinuxBoot, enters_linux, loader_entry, take_over_linux
from ...boot.longmode import LINUX_GDT, LongModeLayout
from ...boot.monitor import GuestEntry, MonitorPlacement, load_monitor, pv_functions
from ...driver import structs as s
from ...driver.constants import (KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
                                 KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE)
from ...driver.kvm import Vcpu, Vm
from ...errors import GuestImageError
from ...memory.guest import GuestMemory
from ...memory.layout import MemoryMap
from .copyloop import MASK32, CopyLoop, find_around, find_sibling, flat_protected, serve, serve_rep_movs
from .grub_core import CORE_START, CoreDecoder, find_core_decoder, serve_core_decoder
from .longmode import CR0_PE, CR0_PG, RFLAGS_RESERVED, setup_long_mode

# What bzimage.py (the decompressors), linux.py (the paravirtual patcher) and flag_sites.py (the
# decoder, for a kernel without PARAVIRT_XXL) import when first used: here on the main thread, which
# imports this module as it builds the machine. The handoff runs on the vCPU's thread, which the
# sandbox allows no file access, so no module may load there.
PRELOADED = (capstone, lz4.block, zstandard, paravirt)

# Where boot loaders enter a 64-bit bzImage: 1 MiB (the protocol's load address: SeaBIOS's linuxboot,
# a loader that ignores pref_address), 2 MiB and 16 MiB (CONFIG_PHYSICAL_START's usual values, where
# GRUB loads a relocatable kernel). One debug register each, for execution, until the boot loader is
# seen reading its kernel's header through a copy loop: then 1 MiB and that kernel's entry.
ENTRIES = (0x100000, 0x200000, 0x1000000)
# The entry given up for GRUB's second copy loop until its kernel's header is seen: the rarest of the
# three (x86's Kconfig default for CONFIG_PHYSICAL_START is 16 MiB).
SPARED_ENTRY = 0x200000
# Where the BIOS enters a disk's boot sector or a CD's boot image (El Torito's default load segment,
# 0x7c0). Until a disk or CD boot gets there, no kernel can be entered: the firmware's POST runs, and
# its fill loop gets the debug registers the entries will take.
BOOT_SECTOR = 0x7C00
DEBUG_REGISTERS = 4  # DR0-DR3
HEADER_SEARCH = 64 << 10  # how much of a copy is searched for a kernel's setup header
PIC_ALL_MASKED = 0xFF
PIT_NO_MODE = 0xFF  # what KVM's PIT reset leaves in a channel: it counts nothing until programmed


class FirmwareHandoff:
    """The boot vCPU's watch for the kernel's entry, and the switch to the monitor. Runs on the
    vCPU's thread, from its debug exits."""

    def __init__(self, vcpu: Vcpu, vm: Vm, memory: GuestMemory, memory_map: MemoryMap, placement: MonitorPlacement,
                 monitor_image: bytes, refused: Sequence[CpuFeature], boot_loader: bool,
                 firmware_loops: Sequence[CopyLoop]) -> None:
        """`boot_loader`: the firmware boots a disk or CD, whose boot loader (GRUB's core) is watched
        for; not for a kernel the firmware loads itself (`--firmware bios --kernel`). `firmware_loops`:
        the copy loops in the firmware's own image (copyloop.find_in_image), watched from its first
        instruction: SeaBIOS's fill runs for about a second of POST, where a sampling every quarter
        second could miss it (1 boot in 5 did, a loaded host, 2026-12-05)."""
        self.vcpu = vcpu
        self.vm = vm
        self.memory = memory
        self.memory_map = memory_map
        self.placement = placement
        self.monitor_image = monitor_image
        self.refused = refused  # the CPU features its kernel is told not to use
        self.stepping = False  # over a boot loader's own code at a watched address
        self.boot: LinuxBoot | None = None  # what was taken over, once it has been
        self.watching = True  # until the monitor runs: read by the runner's sampling thread
        self.kernel_entry: int | None = None  # where the kernel whose header the loader read will be entered
        self.copy_loops: list[CopyLoop] = list(firmware_loops[:DEBUG_REGISTERS - 1])  # and caught running, the latest first
        self.loader_running = not boot_loader  # the firmware has entered a boot loader (or loads the kernel itself)
        self.entries: list[int] = []  # what the debug registers watch: these addresses,
        self.armed_loops: list[CopyLoop] = []  # and these loops' heads
        # GRUB's core image: where diskboot.img enters it, then the call of its decoder, watched until
        # reached (or until GRUB's memmove runs: the core has been unpacked by then)
        self.core_watch: int | None = CORE_START if boot_loader else None
        self.core_decoder: CoreDecoder | None = None
        self.copies = 0  # calls of them, REP MOVS and GRUB's core decoder, the VMM ran
        self.copied_bytes = 0  # and the bytes those copied
        self.firmware_copies = 0  # of those calls, the ones before a boot loader ran (SeaBIOS's fill)

    @property
    def handed_over(self) -> bool:
        """Whether the monitor runs: its handoff page holds the magic load_monitor writes (guest
        memory, so that a restored machine knows too)."""
        return self.placement.entered(self.memory, 0)

    def arm(self) -> None:
        """The breakpoints, unless the monitor runs already (a restored machine): the entries (the
        boot sector before a boot loader runs), GRUB's core, and in the debug registers they leave
        free the copy loops caught last."""
        self.watching = not self.handed_over
        if self.watching:
            self.entries = self._entries()
            watched = [*self.entries, *([] if self.loader_running else [BOOT_SECTOR]),
                       *([self.core_watch] if self.core_watch is not None else [])]
            self.armed_loops = self.copy_loops[: DEBUG_REGISTERS - len(watched)]
            addresses = watched + [loop.head for loop in self.armed_loops]
            dr7 = sum(1 << (2 * index) for index in range(len(addresses)))  # L0-L3; R/W and LEN 0: execution
            debugreg = [*addresses, *[0] * (DEBUG_REGISTERS - len(addresses)), 0, 0, 0, dr7]  # DR0-DR3, -, -, DR6, DR7
            self.vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, debugreg)
            # Each debug exit reads both register sets and most write one: in the kvm_run page
            # rather than by three ioctls (21 of about 96 µs an exit on PVM).
            self.vcpu.share_registers(True)
        self.stepping = False

    def _entries(self) -> list[int]:
        """The kernel entries to watch: none before a boot loader runs; once a served copy has held
        a kernel's header, 1 MiB and that kernel's entry; else all three, but for 2 MiB while GRUB's
        two memmove loops have been caught running: they then have a debug register each, so the
        header comes through one of them, and without them each of those copies costs four or five
        emulated instructions a byte (a CD's GRUB reached its menu in 23.3 s with one, 20.7 s with both)."""
        if not self.loader_running:
            return []
        if self.kernel_entry is not None:
            return sorted({ENTRIES[0], self.kernel_entry})
        if sum(loop.kind != "fill" for loop in self.copy_loops) >= 2:
            return [entry for entry in ENTRIES if entry != SPARED_ENTRY]
        return list(ENTRIES)

    def resume(self) -> None:
        """A restored machine's breakpoints. How far its firmware had got is not in the snapshot, so a
        boot loader is taken to be running: the entries are watched, as they must be once one is."""
        self.loader_running = True
        self.arm()

    def on_sample(self) -> None:
        """A look at where the boot vCPU runs (the runner asks a few times a second while the
        firmware does): a byte-copy loop found running there, and so emulated, gets a debug register;
        a REP MOVS is run to its end."""
        if not self.watching or self.stepping:
            return
        sregs = self.vcpu.get_sregs()
        if not flat_protected(sregs):
            return
        regs = self.vcpu.get_regs()
        loop = find_around(self.memory, regs.rip & MASK32)
        if loop is not None and loop not in self.armed_loops:
            sibling = find_sibling(self.memory, loop)
            caught = [loop, *([sibling] if sibling is not None else [])]
            self.copy_loops = [*caught, *(known for known in self.copy_loops if known not in caught)][:DEBUG_REGISTERS - 1]
            if loop.kind != "fill":  # a memmove runs: GRUB's core is unpacked (SeaBIOS's fill runs before it)
                self.core_watch = None
                self.loader_running = True  # entered elsewhere than the boot sector
            self.arm()
        elif loop is None:  # a long REP MOVS, where the sampling catches it: the rest of it here
            copied = serve_rep_movs(self.memory, regs, sregs)
            if copied is not None:
                self._served(regs, copied.length)

    def on_debug(self) -> bool:
        """A KVM_EXIT_DEBUG: True when it was one of these breakpoints (or the step over one), now
        dealt with. Raises WorldswitchError when the Linux its boot loader started cannot run under
        the monitor."""
        if self.stepping:
            self.arm()
            return True
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        linear = (sregs.cs.base + regs.rip) & MASK32  # what a debug register compares
        if not self.loader_running and linear == BOOT_SECTOR:
            self.loader_running = True
            self.copy_loops = []  # POST's: the sampling finds the boot loader's
            self.arm()  # no step: nothing watches the boot sector now (see _enter_core)
            return True
        if self.core_watch is not None and linear == self.core_watch:
            self._enter_core(regs, sregs)
            return True
        for loop in self.armed_loops:
            if linear == loop.head:
                self._run_copy_loop(loop, regs, sregs)
                return True
        if linear not in self.entries:
            return False
        protected_flat = sregs.cr0 & CR0_PE and not sregs.cr0 & CR0_PG and sregs.cs.db and not sregs.cs.base
        if not (protected_flat and enters_linux(self.memory, regs.rsi & 0xFFFFFFFF, regs.rip)):
            self._step()  # a boot loader's own code (GRUB's core runs at 1 MiB)
            return True
        self.vcpu.set_guest_debug(0)  # once: the boot loader has chosen
        self.vcpu.share_registers(False)  # the monitor's exits seldom need them
        self.watching = False
        boot = take_over_linux(self.memory, self.memory_map, regs.rsi & 0xFFFFFFFF, regs.rip, pv_functions(),
                               self.refused, self.placement.cpus)
        self._silence_legacy_interrupts()
        layout = LongModeLayout(selectors=LINUX_GDT)
        setup_long_mode(self.memory, sregs, layout)
        guest = GuestEntry(boot.entry, layout.stack_top, 0, boot.zero_page, 0, boot.iret_site, boot.sysret_site,
                           boot.flag_traps, boot.code_cache)
        if self.placement.cpus > 1 and not boot.ap_entry:
            raise GuestImageError("--cpus above 1: the kernel's symbols have no secondary_startup_64, where the "
                                  "monitor takes over its other CPUs")
        start = load_monitor(self.memory, self.monitor_image, self.placement, layout, guest, boot.ap_entry)
        sregs.cr3 = start.cr3
        sregs.interrupt_bitmap[:] = [0] * len(sregs.interrupt_bitmap)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(s.kvm_regs(rip=start.rip, rflags=RFLAGS_RESERVED))
        self.boot = boot
        return True

    def _step(self) -> None:
        """One instruction at a watched address, then watch again."""
        self.vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
        self.stepping = True

    def _served(self, regs: s.kvm_regs, length: int) -> None:
        """The vCPU where the code the VMM ran for it would have left it, and the copy counted."""
        self.vcpu.set_regs(regs)
        self.copies += 1
        self.copied_bytes += length
        if not self.loader_running:
            self.firmware_copies += 1

    def _enter_core(self, regs: s.kvm_regs, sregs: s.kvm_sregs) -> None:
        """GRUB's core image entered, all of it loaded: its decoder's call watched next, if this module
        knows the decoder; at that call, the output written here, or the decoder left to run."""
        decoder = self.core_decoder
        if decoder is None:  # diskboot.img's jump into the core
            self.core_decoder = find_core_decoder(self.memory)
            self.core_watch = self.core_decoder.call if self.core_decoder is not None else None
        else:
            self.core_watch = self.core_decoder = None  # once: the debug register goes to the loops
            size = serve_core_decoder(decoder, self.memory, regs, sregs)
            if size is not None:
                self._served(regs, size)
        # No single step over the instruction: nothing watches it now. (A step in real mode, where
        # the BIOS's timer interrupts come, takes the interrupt with TF in the FLAGS it pushes, and
        # the IRET brings TF back to the guest: GRUB triple-faulted on its way to protected mode.)
        self.arm()

    def _run_copy_loop(self, loop: CopyLoop, regs: s.kvm_regs, sregs: s.kvm_sregs) -> None:
        """The loop's head reached: run it here, or let KVM run this call where it cannot be (its
        bytes gone, another mode, DF set, an end outside RAM). A copy that is the start of a bzImage
        (the boot loader reading its kernel's header) says where the kernel will be entered."""
        copied = serve(loop, self.memory, regs, sregs)
        if copied is None:  # no longer watched, so KVM runs it (no single step: see _enter_core); sampling looks again
            self.copy_loops.remove(loop)
            self.arm()
            return
        self._served(regs, copied.length)
        if copied.length >= SETUP_HEADER_SIZE:  # GRUB's copies of a header: the 123 bytes, or a cache block
            self._learn_kernel_entry(self.memory.read(copied.target, min(copied.length, HEADER_SEARCH)))

    def _learn_kernel_entry(self, data: bytes) -> None:
        """Where the kernel whose setup header `data` holds will be entered, if it holds one: GRUB
        copies a kernel's first block into its disk cache, and then the header alone (0x1f1 on)."""
        found = data.find(b"HdrS", HDRS_AT)
        while found >= 0:
            start = found - HDRS_AT
            entry = loader_entry(data[start : start + SETUP_HEADER_SIZE])
            if entry is not None and ENTRIES[0] <= entry < 1 << 32 and self.memory.contains(entry):
                if entry != self.kernel_entry:
                    self.kernel_entry = entry
                    self.arm()
                return
            found = data.find(b"HdrS", found + 1)

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
