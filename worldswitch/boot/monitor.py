"""Loading the in-guest monitor (`--monitor`; docs/monitor.md): worldswitch's own VMM, which runs a
guest's kernel code (a bare-metal program's ring 0, or a paravirtual Linux) deprivileged, natively
in ring 3, on hosts that emulate guest ring 0 (PVM). Its image is guests/bin/monitor.elf, linked at
MONITOR_BASE, in a PML4 slot Linux leaves unused (where VMware's VMM took the top 4 MB); its pages
are the top 4 MiB of the RAM below the PCI hole, mapped there as pages ring 3 may use (the monitor's
body runs in ring 3) and taken out of the guest's identity map. The VMM enters the monitor instead of the program (or Linux), with
the guest's entry in the handoff page (guests/src/monitor.h is the other half of this file's
constants)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import ConfigError, GuestImageError
from ..memory.guest import GuestMemory
from ..memory.layout import GIB, RAM_ABOVE_4G, MemoryMap
from ..record import record
from .elf import Segment, parse_elf, read_sections
from .longmode import PTE_HUGE, PTE_NX, PTE_PRESENT, PTE_USER, PTE_WRITE, LongModeLayout

MONITOR_BASE = 0xFFFF_FE80_0000_0000  # PML4 slot 509, which its map of guest RAM shares (monitor.h)
MONITOR_SIZE = 4 << 20
# The function where the VMM takes an application processor over (vmm/x86/ap_start.py): where Linux's
# real-mode trampoline (arch/x86/realmode/rm/trampoline_64.S) enters the kernel on an AP, in 64-bit
# ring 0 on its own tables (trampoline_header->start since 2.6); a program names its own so (program.py).
AP_ENTRY = "secondary_startup_64"
HUGE_PAGE = 2 << 20
HANDOFF_MAGIC = 0x31524F54494E4F4D  # "MONITOR1"
# The monitor's trap counts, in its handoff page after the fixed fields (monitor.h COUNT_*).
COUNTERS = ("events", "exceptions", "interrupts", "deferred", "cli", "sti", "hlt", "iretq", "mov_cr", "rdmsr",
            "wrmsr", "descriptor", "invlpg", "wbinvd", "shadow_fill", "shadow_flush", "syscall", "sysret", "swapgs",
            "ring0", "segment", "shadow_check", "xsetbv", "mov_dr", "int_n", "own_fill",
            "port_map", "msr_gate", "wrmsr_ring0", "iretq_at_swapgs", "iretq_gate",
            "held_gate", "cr3_gate", "sysret_gate", "gs_gate", "gs_native", "msr_native", "pv_eoi",
            "swapgs_native", "key0", "pushf", "popf", "invlpg_gate")
# The pv page (monitor.h PV_*): the monitor's functions for a paravirtual Linux's pv_ops.irq,
# pv_ops.cpu.write_msr and load_gs_index, pv_ops.mmu.read_cr2 and write_cr3, its IRETQ to itself
# ("iret"; "iret_pop_rdi" for a kernel without early_xen_iret_patch) and its return from a system
# call ("sysret"), and for a translated INVLPG ("invlpg", translator.py), at PV_BASE in its kernel's address space (boot/paravirt.py points the kernel there).
PV_BASE = 0xFFFF_FFFF_FFE0_0000
PV_FUNCTIONS = {"save_fl": 0x00, "irq_disable": 0x20, "irq_enable": 0x40, "read_cr2": 0x60, "write_cr3": 0x70,
                "safe_halt": 0x80, "sysret": 0x90, "halt": 0xA0, "write_msr": 0xC0, "load_gs_index": 0x100,
                "write_msr_u64": 0x140, "iret": 0x160, "invlpg": 0x260, "iret_pop_rdi": 0x280}
# The code cache: the pages after the pv page, where the VMM puts a kernel's translated sites
# (translator.py), in every copy (monitor.h PV_CODE_CACHE_SIZE)
CODE_CACHE = PV_BASE + 0x1000
CODE_CACHE_SIZE = 0x10000
# magic, five entry registers, guest_limit, physical_base, GDT base and limit, TR, CR3, CS, SS, IRETQ
# site, the end of RAM above 4 GiB and the page directories that map it for the monitor, the SWAPGS
# before its SYSRETQ, the end of every vCPU's copy's pages, whether its PUSHFs and POPFs trap
_HANDOFF = struct.Struct("<20Q")
_GUEST_RIP_AT = 8  # the handoff's guest_rip: before an AP's copy is entered, where that AP is to be taken over
# The monitor's map of guest RAM is the upper half of its PML4 slot (monitor.h DIRECT_BASE): guest
# RAM must end below 256 GiB. Its page directories for the RAM above 4 GiB are the VMM's, one a GiB,
# below the boot tables (the monitor would fill them in emulated ring 0).
DIRECT_MAP_LIMIT = 256 << 30
_TABLE_PAGES = 3  # the monitor's boot PML4, and the PDPT and PD that map it, in the last pages of its range


class GuestEntry(NamedTuple):
    """The registers the monitor enters the guest with (its kernel's, in 64-bit mode on the tables
    the VMM built): a program's entry and arguments, or Linux's startup_64 and its zero page."""
    rip: int
    rsp: int
    rdi: int
    rsi: int
    rdx: int
    iret_site: int = 0  # a paravirtual Linux's IRETQ to user mode, made a UD2 (paravirt.py); 0 for a program
    sysret_site: int = 0  # its SWAPGS before SYSRETQ, made a jump to the monitor (paravirt.py); 0 if untouched
    flag_traps: bool = False  # a Linux without PARAVIRT_XXL: its PUSHFs and POPFs made to trap (flag_sites.py)
    code_cache: bytes = b""  # its translated sites (translator.py), for CODE_CACHE in every copy


def pv_functions() -> dict[str, int]:
    """Where the monitor's functions for a paravirtual Linux are, by name: the pv_ops members
    (kernel_symbols.PV_OPS), paravirt.KERNEL_RETURN and paravirt.SYSCALL_RETURN."""
    return {name: PV_BASE + offset for name, offset in PV_FUNCTIONS.items()}


class MonitorStart(NamedTuple):
    """Where the vCPU starts instead of the program: the monitor's entry, on its own boot tables."""
    rip: int
    cr3: int


@record(frozen=True)
class MonitorPlacement:
    """Where the monitor's pages are in guest-physical memory: a copy of its 4 MiB for each vCPU, side
    by side at the top of the RAM below the PCI hole (so that a 32-bit port write can name its
    reports), from a 2 MiB boundary; and where the guest's RAM above 4 GiB ends (0 if it has none),
    which the monitor maps too. Each vCPU runs on its own copy, mapped at the same MONITOR_BASE in
    its own shadows: the monitor's state (the guest's virtual CPU, the shadows, the event stacks) is
    per CPU as a CPU's registers and TLB are, and its code needs no locks (docs/monitor.md, SMP)."""
    physical_base: int  # the first copy's, the boot vCPU's
    high_ram_end: int = 0
    cpus: int = 1

    @classmethod
    def for_map(cls, memory_map: MemoryMap, cpus: int = 1) -> "MonitorPlacement":
        size = cpus * MONITOR_SIZE
        physical_base = (memory_map.top_of_low_ram - size) & ~(HUGE_PAGE - 1)
        if physical_base < (16 << 20):
            raise ConfigError(f"--monitor needs at least {(16 << 20) + size >> 20} MiB of guest RAM: {size >> 20} MiB "
                              f"of it is the monitor's")
        top = memory_map.top_of_ram
        if top > DIRECT_MAP_LIMIT:  # as much less RAM as its addresses go beyond
            raise ConfigError(f"--monitor maps guest RAM up to {DIRECT_MAP_LIMIT // GIB} GiB of guest-physical "
                              f"addresses: give the machine at most {(memory_map.memory - top + DIRECT_MAP_LIMIT) >> 20} MiB")
        return cls(physical_base, top if top > RAM_ABOVE_4G else 0, cpus)

    @property
    def end(self) -> int:
        """Where the last copy's pages end."""
        return self.physical_base + self.cpus * MONITOR_SIZE

    def copy_base(self, cpu: int) -> int:
        """Where vCPU `cpu`'s copy of the monitor is."""
        return self.physical_base + cpu * MONITOR_SIZE

    def high_ram_gib(self) -> range:
        """The GiBs of guest-physical addresses above 4 GiB that hold RAM, each a page directory."""
        return range(RAM_ABOVE_4G // GIB, -(-self.high_ram_end // GIB)) if self.high_ram_end else range(0)

    def counters(self, memory: GuestMemory) -> dict[str, int]:
        """The monitor's trap counts, read from its handoff pages and summed over the vCPUs (guest
        memory: the program could overwrite them only by mapping the monitor's pages itself)."""
        totals = [0] * len(COUNTERS)
        for cpu in range(self.cpus):
            raw = memory.read(self.copy_base(cpu) + _HANDOFF.size, 8 * len(COUNTERS))
            totals = [total + count for total, count in zip(totals, struct.unpack(f"<{len(COUNTERS)}Q", raw))]
        return dict(zip(COUNTERS, totals))

    def failed_event(self, memory: GuestMemory) -> str:
        """What the monitor last could not deliver through the guest's IDT (the start of the chain a
        triple fault ends), in words; empty if nothing failed. Guest memory, so only a hint."""
        for cpu in range(self.cpus):
            at = self.copy_base(cpu) + _FAILED_AT
            vector, fault, rip, cr2 = _FAILED.unpack(memory.read(at, _FAILED.size))
            if fault not in _FAULTS or vector > 255:  # nothing recorded (0), or not the monitor's words
                continue
            return (f"the monitor could not deliver {_vector_name(vector)} at guest rip {rip:#x} through the "
                    f"guest's IDT{f' of vCPU {cpu}' if self.cpus > 1 else ''}: {_FAULTS[fault]}"
                    + (f" (at {cr2:#x})" if fault == 14 else ""))
        return ""

    def entered(self, memory: GuestMemory, cpu: int) -> bool:
        """Whether vCPU `cpu` runs on its copy: its handoff holds the magic (guest memory, so that a
        restored machine knows too)."""
        return memory.read_int(self.copy_base(cpu), 8) == HANDOFF_MAGIC


_FAILED = struct.Struct("<4Q")  # monitor.h struct handoff: failed_vector, failed_fault, failed_rip, failed_cr2
_FAILED_AT = _HANDOFF.size + 8 * len(COUNTERS)
_FAULTS = {10: "#TS, no TSS to take its stack from", 11: "#NP, its gate not present",
           13: "#GP, its gate or code segment not usable", 14: "#PF, its IDT, TSS or stack not mapped"}
_EXCEPTIONS = ("#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "vector 9", "#TS", "#NP", "#SS",
               "#GP", "#PF", "vector 15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP")


def _vector_name(vector: int) -> str:
    return _EXCEPTIONS[vector] if vector < len(_EXCEPTIONS) else f"interrupt {vector}"


def load_monitor(memory: GuestMemory, image: bytes, placement: MonitorPlacement, layout: LongModeLayout,
                 guest: GuestEntry, ap_entry: int = 0) -> MonitorStart:
    """Copy the monitor to `placement`, once for each vCPU, give each copy boot tables that map it at
    MONITOR_BASE, hide its pages from the guest's identity map (the tables `layout` describes,
    already written), and hand the boot vCPU's copy the guest's entry and tables. The other vCPUs'
    copies wait for their vCPU (start_ap), which is to be taken over at `ap_entry`."""
    entry, segments = parse_elf(image, "the monitor")
    high_pds = len(placement.high_ram_gib())
    table_space = MONITOR_BASE + MONITOR_SIZE - (_TABLE_PAGES + high_pds) * 0x1000
    for segment in segments:
        if segment.vaddr < MONITOR_BASE or segment.vaddr + segment.memsz > table_space:
            raise GuestImageError(f"the monitor's segment at {segment.vaddr:#x} is outside its 4 MiB, less "
                                  f"its tables for {high_pds} GiB of RAM above 4 GiB")
    if not MONITOR_BASE <= entry < table_space:
        raise GuestImageError(f"the monitor's entry {entry:#x} is outside its 4 MiB")
    if len(guest.code_cache) > CODE_CACHE_SIZE:
        raise GuestImageError(f"the translated code is {len(guest.code_cache)} bytes; the monitor's cache holds "
                              f"{CODE_CACHE_SIZE}")
    for cpu in range(placement.cpus):
        _copy_monitor(memory, image, segments, placement, placement.copy_base(cpu))
    # the boot vCPU's copy: start_ap copies it into each other copy before that copy runs
    memory.write(placement.physical_base + _code_cache_offset(image), guest.code_cache)
    # and the identity map's view of the same pages: not present
    for address in range(placement.physical_base, placement.end, HUGE_PAGE):
        if address >> 30 < layout.identity_gib:
            memory.write(layout.pd + (address >> 30) * 0x1000 + ((address >> 21) & 511) * 8, bytes(8))
    for cpu in range(1, placement.cpus):  # no magic yet: where the AP is to be taken over
        memory.write(placement.copy_base(cpu) + _GUEST_RIP_AT, struct.pack("<Q", ap_entry))

    boot_pml4 = _boot_pml4(placement.physical_base)
    # slot 0 as the program's: the monitor reads the handoff's tables through it until it runs on its shadows
    memory.write(boot_pml4, memory.read(layout.pml4, 8))
    gdt_limit = (layout.selectors.entries * 8) - 1
    memory.write(placement.physical_base, _HANDOFF.pack(
        HANDOFF_MAGIC, guest.rip, guest.rsp, guest.rdi, guest.rsi, guest.rdx, placement.physical_base,
        placement.physical_base, layout.gdt, gdt_limit, layout.selectors.tss, layout.pml4, layout.selectors.kernel_cs,
        layout.selectors.kernel_ds, guest.iret_site, placement.high_ram_end,
        _high_pd_base(placement, placement.physical_base), guest.sysret_site, placement.end, int(guest.flag_traps)))
    return MonitorStart(entry, boot_pml4)


class ApState(NamedTuple):
    """An application processor where Linux's trampoline enters its kernel (secondary_startup_64):
    64-bit ring 0 on the trampoline's page tables and GDT, which its copy of the monitor takes as the
    guest's."""
    rip: int
    rsp: int
    cr3: int
    gdt_base: int
    gdt_limit: int
    tr: int
    cs: int
    ss: int


def start_ap(memory: GuestMemory, image: bytes, placement: MonitorPlacement, cpu: int, state: ApState) -> MonitorStart:
    """Hand vCPU `cpu`'s copy of the monitor the guest's state there, with what the boot vCPU's copy
    was given of the guest as a whole (its RAM, its patched return sites). The copy starts afresh
    (a CPU the guest brings back online left its last run's state there), its counts kept."""
    entry, segments = parse_elf(image, "the monitor")
    base = placement.copy_base(cpu)
    counts = memory.read(base + _HANDOFF.size, 8 * len(COUNTERS))
    _copy_monitor(memory, image, segments, placement, base)
    memory.write(base + _HANDOFF.size, counts)
    cache = _code_cache_offset(image)  # the boot vCPU's, which guest memory (and so a snapshot) keeps
    memory.write(base + cache, memory.read(placement.physical_base + cache, CODE_CACHE_SIZE))
    boot = _HANDOFF.unpack(memory.read(placement.physical_base, _HANDOFF.size))
    guest_limit, iret_site, high_ram_end, sysret_site, flag_traps = boot[6], boot[14], boot[15], boot[17], boot[19]
    boot_pml4 = _boot_pml4(base)
    memory.write(boot_pml4, memory.read(state.cr3 & ~0xFFF, 8))  # slot 0 as the trampoline's tables have it
    memory.write(base, _HANDOFF.pack(
        HANDOFF_MAGIC, state.rip, state.rsp, 0, 0, 0, guest_limit, base, state.gdt_base, state.gdt_limit, state.tr,
        state.cr3, state.cs, state.ss, iret_site, high_ram_end, _high_pd_base(placement, base), sysret_site,
        placement.end, flag_traps))
    return MonitorStart(entry, boot_pml4)


def stop_ap(memory: GuestMemory, placement: MonitorPlacement, cpu: int) -> None:
    """vCPU `cpu`'s copy of the monitor no longer runs (an INIT is on its way to the vCPU): its
    handoff's magic goes, its AP entry stays."""
    memory.write(placement.copy_base(cpu), bytes(8))


def ap_entry_of(memory: GuestMemory, placement: MonitorPlacement, cpu: int) -> int:
    """Where vCPU `cpu` is to be taken over (load_monitor's `ap_entry`), 0 for nowhere."""
    return memory.read_int(placement.copy_base(cpu) + _GUEST_RIP_AT, 8)


def _code_cache_offset(image: bytes) -> int:
    """Where CODE_CACHE is in a copy: the pages after the pv page, in its .pv section (monitor.S)."""
    pv = read_sections(image).get(".pv")
    if pv is None or pv.size != 0x1000 + CODE_CACHE_SIZE:
        raise GuestImageError(f"the monitor has no .pv section of its pv page and a {CODE_CACHE_SIZE}-byte code cache")
    return pv.address + 0x1000 - MONITOR_BASE


def _boot_pml4(base: int) -> int:
    return base + MONITOR_SIZE - _TABLE_PAGES * 0x1000


def _high_pd_base(placement: MonitorPlacement, base: int) -> int:
    """A copy's page directories for the RAM above 4 GiB, below its boot tables (0 if none)."""
    high_pds = len(placement.high_ram_gib())
    return base + MONITOR_SIZE - (_TABLE_PAGES + high_pds) * 0x1000 if high_pds else 0


def _copy_monitor(memory: GuestMemory, image: bytes, segments: list[Segment], placement: MonitorPlacement,
                  base: int) -> None:
    """One copy of the monitor at `base`: its image, its boot PML4 (slot 0 left to its handoff) -> a
    PDPT -> a PD -> two 2 MiB pages that ring 3 may use (the monitor's body runs there), and its
    map of the RAM above 4 GiB. The program's own tables never map it."""
    for segment in segments:
        at = base + segment.vaddr - MONITOR_BASE
        memory.write(at, image[segment.offset: segment.offset + segment.filesz])
        if segment.memsz > segment.filesz:
            memory.fill(at + segment.filesz, segment.memsz - segment.filesz)
    boot_pml4 = _boot_pml4(base)
    pdpt = boot_pml4 + 0x1000
    pd = boot_pml4 + 2 * 0x1000
    table = PTE_PRESENT | PTE_WRITE | PTE_USER
    memory.fill(boot_pml4, _TABLE_PAGES * 0x1000)
    memory.write(boot_pml4 + ((MONITOR_BASE >> 39) & 511) * 8, struct.pack("<Q", pdpt | table))
    memory.write(pdpt + ((MONITOR_BASE >> 30) & 511) * 8, struct.pack("<Q", pd | table))
    pages = [base + i * HUGE_PAGE | table | PTE_HUGE for i in range(MONITOR_SIZE // HUGE_PAGE)]
    memory.write(pd + ((MONITOR_BASE >> 21) & 511) * 8, struct.pack(f"<{len(pages)}Q", *pages))
    # the monitor's map of the RAM above 4 GiB: 2 MiB pages only ring 3's body uses, never executed
    high_pd_base = _high_pd_base(placement, base)
    for n, gib in enumerate(placement.high_ram_gib()):
        starts = (gib * GIB + i * HUGE_PAGE for i in range(512))
        entries = [start | table | PTE_HUGE | PTE_NX if start < placement.high_ram_end else 0 for start in starts]
        memory.write(high_pd_base + n * 0x1000, struct.pack("<512Q", *entries))
