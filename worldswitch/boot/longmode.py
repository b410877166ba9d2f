"""The tables a vCPU needs in guest memory to start in 64-bit long mode, skipping real and protected
mode (as Firecracker does): a flat GDT, a TSS with an I/O permission bitmap, identity-mapped page
tables, and where they all go (LongModeLayout). Writing them is the loader's part; describing them
to the CPU (kvm_sregs) is the VMM's (vmm/x86/longmode.py). The same layout serves the built-in guests,
`--elf` programs and Linux.
"""

from __future__ import annotations

import struct

from ..memory.guest import GuestMemory
from ..record import record

# Page-table entry bits
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_HUGE = 1 << 7
PTE_NX = 1 << 63  # with EFER.NXE

KERNEL_CODE64 = (0x9A, 0xA)  # access byte (present, DPL0, exec/read), flags (G, L)
KERNEL_DATA = (0x92, 0xC)  # present, DPL0, read/write; G, D/B
USER_DATA = (0xF2, 0xC)  # DPL3
USER_CODE64 = (0xFA, 0xA)  # DPL3, L


@record(frozen=True)
class GdtLayout:
    """Which selector holds which flat segment. The TSS takes two slots from `tss`."""

    kernel_cs: int
    kernel_ds: int
    tss: int
    user_ds: int | None = None  # without the RPL bits
    user_cs: int | None = None

    @property
    def entries(self) -> int:
        return self.tss // 8 + 2


# worldswitch's bare-metal programs: ring-0 and ring-3 segments, user segments in SYSRET order.
PROGRAM_GDT = GdtLayout(kernel_cs=0x08, kernel_ds=0x10, user_ds=0x18, user_cs=0x20, tss=0x28)
# The Linux 64-bit boot protocol: __BOOT_CS = 0x10, __BOOT_DS = 0x18 (boot.rst).
LINUX_GDT = GdtLayout(kernel_cs=0x10, kernel_ds=0x18, tss=0x20)

SEL_KERNEL_CS = PROGRAM_GDT.kernel_cs
SEL_KERNEL_DS = PROGRAM_GDT.kernel_ds
SEL_USER_DS = 0x18 | 3
SEL_USER_CS = 0x20 | 3
SEL_TSS = PROGRAM_GDT.tss
TSS_HEADER = 0x68  # the 64-bit TSS proper; the I/O permission bitmap follows it
IO_BITMAP_BYTES = 65536 // 8
TSS_SIZE = TSS_HEADER + IO_BITMAP_BYTES + 1  # the bitmap ends with an all-ones byte (SDM 19.5.2)

FLAT_LIMIT = 0xFFFFFFFF


@record(frozen=True)
class LongModeLayout:
    """Where the long-mode scaffolding lives in guest-physical memory (all below 640 KiB)."""

    gdt: int = 0x1000
    tss: int = 0x2000  # TSS_SIZE bytes: up to 0x4069
    pml4: int = 0x9000
    pdpt: int = 0xA000
    pd: int = 0xB000  # identity_gib consecutive page directories
    identity_gib: int = 4  # identity-map this many GiB with 2 MiB pages
    stack_top: int = 0x8F000  # the initial RSP, and RSP0 in the TSS (ring 3 -> 0 interrupts)
    selectors: GdtLayout = PROGRAM_GDT

    @property
    def reserved(self) -> list[tuple[int, int]]:
        """(start, end) ranges this layout occupies, for loaders to avoid."""
        return [
            (self.gdt, self.tss + TSS_SIZE),
            (self.pml4, self.pd + self.identity_gib * 0x1000),
            (self.stack_top - 0x10000, self.stack_top),
        ]


def gdt_entry(base: int, limit: int, access: int, flags: int) -> int:
    """A code/data descriptor: access byte (P, DPL, S, type) and flags nibble (G, D/B, L, AVL)."""
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xFF) << 56)
    )


def tss_descriptor(base: int, limit: int) -> tuple[int, int]:
    """The two 8-byte halves of a 64-bit available-TSS descriptor (type 9, present)."""
    low = gdt_entry(base, limit, 0x89, 0x0)
    high = base >> 32
    return low, high


def build_gdt(tss_base: int, selectors: GdtLayout = PROGRAM_GDT) -> bytes:
    entries = [0] * selectors.entries
    entries[selectors.kernel_cs // 8] = gdt_entry(0, 0xFFFFF, *KERNEL_CODE64)
    entries[selectors.kernel_ds // 8] = gdt_entry(0, 0xFFFFF, *KERNEL_DATA)
    if selectors.user_ds is not None:
        entries[selectors.user_ds // 8] = gdt_entry(0, 0xFFFFF, *USER_DATA)
    if selectors.user_cs is not None:
        entries[selectors.user_cs // 8] = gdt_entry(0, 0xFFFFF, *USER_CODE64)
    entries[selectors.tss // 8 : selectors.tss // 8 + 2] = tss_descriptor(tss_base, TSS_SIZE - 1)
    return struct.pack(f"<{len(entries)}Q", *entries)


def build_tss(rsp0: int) -> bytes:
    """A 64-bit TSS whose RSP0 is where the CPU switches stacks on an interrupt from ring 3, with
    an I/O permission bitmap that allows every port to ring 3.

    Our guests drop to ring 3 with RFLAGS.IOPL=3, which grants every port on VT-x and AMD-V without
    looking at the bitmap (SDM vol. 1, 19.5.1). The bitmap serves PVM hosts, which run guest user mode
    with the hardware IOPL forced to 0: a ring-3 `out` faults into KVM's instruction emulator, which
    grants it through this bitmap. TR stays type 11 (busy), as VM entry requires (SDM vol. 3C, checks
    on guest segment registers); docs/hosts.md has why QEMU's TCG needs the IOPL."""
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, rsp0)
    struct.pack_into("<H", tss, 0x66, TSS_HEADER)  # I/O map base: right after the header
    tss[-1] = 0xFF
    return bytes(tss)


def write_identity_page_tables(memory: GuestMemory, layout: LongModeLayout) -> None:
    """Identity-map the first identity_gib GiB with 2 MiB pages, user-accessible so that guest code
    can drop to ring 3 without building its own tables. MMIO windows are mapped too: an access
    there reaches KVM as an MMIO exit."""
    memory.write(layout.pml4, struct.pack("<Q", layout.pdpt | PTE_PRESENT | PTE_WRITE | PTE_USER) + bytes(4088))
    pdpt = [layout.pd + i * 0x1000 | PTE_PRESENT | PTE_WRITE | PTE_USER for i in range(layout.identity_gib)]
    memory.write(layout.pdpt, struct.pack(f"<{len(pdpt)}Q", *pdpt) + bytes(8 * (512 - len(pdpt))))
    for gib in range(layout.identity_gib):
        entries = [
            ((gib << 30) + (i << 21)) | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE for i in range(512)
        ]
        memory.write(layout.pd + gib * 0x1000, struct.pack("<512Q", *entries))


def write_long_mode_tables(memory: GuestMemory, layout: LongModeLayout) -> None:
    """The GDT, the TSS and the page tables, at the layout's addresses."""
    memory.write(layout.gdt, build_gdt(layout.tss, layout.selectors))
    memory.write(layout.tss, build_tss(layout.stack_top))
    write_identity_page_tables(memory, layout)
