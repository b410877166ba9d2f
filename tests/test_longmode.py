"""The long-mode scaffolding decoded back by the rules of the Intel SDM (vol. 3, 3.4.5 and 4.5)."""

from __future__ import annotations

import struct

from worldswitch.boot import longmode as tables
from worldswitch.driver import structs as s
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.x86 import longmode as lm


def decode(descriptor: int) -> dict[str, int]:
    return {
        "base": ((descriptor >> 16) & 0xFFFFFF) | (((descriptor >> 56) & 0xFF) << 24),
        "limit": (descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16),
        "type": (descriptor >> 40) & 0xF,
        "s": (descriptor >> 44) & 1,
        "dpl": (descriptor >> 45) & 3,
        "p": (descriptor >> 47) & 1,
        "l": (descriptor >> 53) & 1,
        "db": (descriptor >> 54) & 1,
        "g": (descriptor >> 55) & 1,
    }


def test_gdt_segments() -> None:
    gdt = struct.unpack("<7Q", tables.build_gdt(0x2000))
    assert gdt[0] == 0
    kcode, kdata, udata, ucode = (decode(d) for d in gdt[1:5])
    assert kcode == {"base": 0, "limit": 0xFFFFF, "type": 0xA, "s": 1, "dpl": 0, "p": 1, "l": 1, "db": 0, "g": 1}
    assert kdata["type"] == 0x2 and kdata["dpl"] == 0 and kdata["db"] == 1
    assert udata["dpl"] == 3 and udata["type"] == 0x2
    assert ucode["dpl"] == 3 and ucode["l"] == 1
    assert tables.SEL_USER_CS == 0x23 and tables.SEL_USER_DS == 0x1B


def test_tss_descriptor_and_io_bitmap() -> None:
    gdt = tables.build_gdt(0x12345000)
    low, high = struct.unpack_from("<QQ", gdt, tables.SEL_TSS)
    tss = decode(low)
    assert tss["type"] == 0x9 and tss["s"] == 0 and tss["p"] == 1
    assert tss["base"] | (high << 32) == 0x12345000
    assert tss["limit"] == tables.TSS_SIZE - 1
    body = tables.build_tss(0x8F000)
    assert struct.unpack_from("<Q", body, 4)[0] == 0x8F000  # RSP0
    iomap = struct.unpack_from("<H", body, 0x66)[0]
    assert iomap == 0x68
    assert body[iomap : iomap + 8192] == bytes(8192)  # every port allowed
    assert body[-1] == 0xFF and len(body) == 0x68 + 8192 + 1


def test_identity_page_tables_map_4_gib_user_writable() -> None:
    memory = GuestMemory([(0, 0x100000)])
    layout = tables.LongModeLayout()
    tables.write_identity_page_tables(memory, layout)

    def walk(va: int) -> tuple[int, int]:
        pml4e = memory.read_int(layout.pml4 + 8 * ((va >> 39) & 511), 8)
        pdpte = memory.read_int((pml4e & ~0xFFF) + 8 * ((va >> 30) & 511), 8)
        pde = memory.read_int((pdpte & ~0xFFF) + 8 * ((va >> 21) & 511), 8)
        flags = pml4e & pdpte & pde & 0x7
        return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF), flags | (pde & tables.PTE_HUGE)

    for va in (0, 0x100000, 0x12345678, 0xFEB00000, 0xFFFFFFFF):
        pa, flags = walk(va)
        assert pa == va
        assert flags == tables.PTE_PRESENT | tables.PTE_WRITE | tables.PTE_USER | tables.PTE_HUGE
    assert memory.read_int(layout.pml4 + 8, 8) == 0  # nothing above 512 GiB
    memory.close()


def test_setup_long_mode_fills_sregs() -> None:
    memory = GuestMemory([(0, 0x100000)])
    sregs = s.kvm_sregs()
    lm.setup_long_mode(memory, sregs)
    assert sregs.efer & (lm.EFER_LME | lm.EFER_LMA) == lm.EFER_LME | lm.EFER_LMA
    assert sregs.cr0 & lm.CR0_PG and sregs.cr0 & lm.CR0_PE
    assert sregs.cr4 & lm.CR4_PAE
    assert sregs.cs.l == 1 and sregs.cs.selector == tables.SEL_KERNEL_CS
    assert sregs.tr.type == 0xB and sregs.tr.base == tables.LongModeLayout().tss
    assert memory.read(tables.LongModeLayout().gdt, 56) == tables.build_gdt(tables.LongModeLayout().tss)
    memory.close()
