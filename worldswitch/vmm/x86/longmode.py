"""64-bit long-mode entry, the CPU's part: control registers, EFER and the segment registers that
describe the tables boot/longmode.py writes into guest memory, given to KVM through kvm_sregs.
"""

from __future__ import annotations

from ...boot.longmode import FLAT_LIMIT, TSS_SIZE, LongModeLayout, write_long_mode_tables
from ...boot.program import ProgramEntry
from ...driver import structs as s
from ...memory.guest import GuestMemory

RFLAGS_RESERVED = 0x2  # bit 1 always reads 1; interrupts start disabled

# Control register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1)
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11


def _segment(selector: int, type_: int, dpl: int, code64: bool) -> s.kvm_segment:
    return s.kvm_segment(
        base=0,
        limit=FLAT_LIMIT,
        selector=selector,
        type=type_,
        present=1,
        dpl=dpl,
        db=0 if code64 else 1,
        s=1,
        l=1 if code64 else 0,
        g=1,
    )


def setup_long_mode(memory: GuestMemory, sregs: s.kvm_sregs, layout: LongModeLayout = LongModeLayout()) -> None:
    """Write the GDT, TSS and page tables into guest memory and fill `sregs` (taken from
    KVM_GET_SREGS, so that fields such as apic_base keep KVM's values) for 64-bit ring 0."""
    selectors = layout.selectors
    write_long_mode_tables(memory, layout)

    code = _segment(selectors.kernel_cs, 0xB, 0, code64=True)  # execute/read, accessed
    data = _segment(selectors.kernel_ds, 0x3, 0, code64=False)  # read/write, accessed
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = s.kvm_segment(base=layout.tss, limit=TSS_SIZE - 1, selector=selectors.tss, type=0xB, present=1, s=0)
    sregs.ldt = s.kvm_segment(selector=0, type=0x2, present=1, limit=0xFFFF, unusable=1)
    sregs.gdt = s.kvm_dtable(base=layout.gdt, limit=selectors.entries * 8 - 1)
    sregs.idt = s.kvm_dtable(base=0, limit=0)
    sregs.cr3 = layout.pml4
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE


def program_registers(entry: ProgramEntry) -> s.kvm_regs:
    """The general registers a bare-metal program starts with (boot/program.py documents them)."""
    return s.kvm_regs(rip=entry.rip, rsp=entry.rsp, rdi=entry.args_addr, rsi=entry.ram_size, rdx=entry.vcpus,
                      rflags=RFLAGS_RESERVED)
