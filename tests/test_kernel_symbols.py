"""Reading a Linux vmlinux's own symbols (kallsyms) and types (BTF), against Debian's cloud kernel,
whose package ships no System.map: three sources that must agree (docs/monitor.md, stage 2). And
what the VMM does with them for the monitor (boot/paravirt.py), checked byte by byte in the image."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import pytest

from worldswitch.boot import bootparams as bp
from worldswitch.boot.bzimage import extract_vmlinux, parse_bzimage
from worldswitch.boot.elf import read_sections
from worldswitch.boot.kernel_symbols import (KERNEL_TEXT, PV_IRQ_OPS, BtfTypes, Symbols, _layout_since_6_4, _tokens,
                                             kallsyms, pv_slots)
from worldswitch.boot.linux import CMDLINE_ADDR, ZERO_PAGE, take_over_linux
from worldswitch.boot.monitor import PV_BASE, pv_functions
from worldswitch.boot.paravirt import CMPXCHG16B_GS, X86_FEATURE_XENPV, alt_format, paravirtualize
from worldswitch.errors import GuestImageError
from worldswitch.memory.guest import GuestMemory
from worldswitch.memory.layout import MIB, MemoryMap

from .helpers import DEBIAN_13, DEBIAN_14, LOADER_ZERO_PAGE, debian, linux_without_xxl, loaded_by_a_boot_loader


class Feature(NamedTuple):
    """A CPU feature the host forces into CPUID (boot/linux.py CpuFeature)."""
    name: str
    linux_feature: int


@pytest.fixture(scope="module")
def vmlinux() -> bytes:
    kernel = debian().kernel
    return extract_vmlinux(parse_bzimage(Path(kernel).read_bytes(), "kernel"))


@pytest.fixture(scope="module")
def symbols(vmlinux: bytes) -> Symbols:
    return kallsyms(vmlinux)


@pytest.fixture(scope="module")
def vmlinux_13() -> bytes:
    """Debian 13's cloud kernel (Linux 6.12): kallsyms in 6.4's order, alt_instr with its u32
    ft_flags, and pv_ops call sites that are alternatives (6.8), not .parainstructions."""
    return extract_vmlinux(parse_bzimage(Path(debian(DEBIAN_13).kernel).read_bytes(), "kernel"))


@pytest.fixture(scope="module")
def vmlinux_14() -> bytes:
    """Debian 14's cloud kernel (Linux 7.2 in testing): kallsyms offsets relative to their own place,
    with no base, tables aligned to 4; pv_ops.cpu.write_msr(u32 msr, u64 value)."""
    return extract_vmlinux(parse_bzimage(Path(debian(DEBIAN_14).kernel).read_bytes(), "kernel"))


def read_u64(vmlinux: bytes, address: int) -> int:
    for section in read_sections(vmlinux).values():
        if section.address <= address < section.address + section.size:
            return int(struct.unpack_from("<Q", vmlinux, section.offset + address - section.address)[0])
    raise AssertionError(f"{address:#x} is in no section of the image")


def test_kallsyms_names_the_kernels_symbols(symbols: Symbols) -> None:
    assert len(symbols) > 50_000
    assert symbols["startup_64"].address == KERNEL_TEXT and symbols["startup_64"].kind == "T"
    assert symbols["pv_ops"].kind == "D" and symbols["native_save_fl"].kind == "T"


def test_btf_gives_pv_ops_its_layout(vmlinux: bytes, symbols: Symbols) -> None:
    types = BtfTypes(vmlinux)
    size, template = types.struct("paravirt_patch_template")
    assert list(template) == ["cpu", "irq", "mmu", "lock"] and template["irq"].type_name == "pv_irq_ops"
    assert symbols["pv_ops"].address + size == symbols["pv_info"].address  # pv_info follows pv_ops
    _, irq = types.struct("pv_irq_ops")
    assert [irq[name].offset for name in PV_IRQ_OPS] == [0, 8, 16, 24, 32]
    assert irq["save_fl"].type_name == "paravirt_callee_save" and irq["halt"].type_name == "pointer"


def test_the_pv_ops_slots_hold_the_native_functions_kallsyms_names(vmlinux: bytes, symbols: Symbols) -> None:
    """Where BTF and kallsyms put pv_ops.irq, pv_ops.cpu.write_msr and load_gs_index and
    pv_ops.mmu.read_cr2 and write_cr3, the image holds pointers to the functions kallsyms calls
    native: the three sources agree."""
    natives = {"save_fl": "native_save_fl", "irq_disable": "pv_native_irq_disable",
               "irq_enable": "pv_native_irq_enable", "safe_halt": "native_safe_halt", "halt": "native_halt",
               "write_msr": "native_write_msr", "load_gs_index": "native_load_gs_index",
               "read_cr2": "pv_native_read_cr2", "write_cr3": "native_write_cr3"}
    for name, address in pv_slots(symbols, BtfTypes(vmlinux)).items():
        assert read_u64(vmlinux, address) == symbols[natives[name]].address, name


def test_what_is_not_a_kernel_is_refused_in_one_line() -> None:
    with pytest.raises(GuestImageError, match="no .rodata section"):
        kallsyms(b"not an ELF file at all")
    with pytest.raises(GuestImageError, match="no .BTF section"):
        BtfTypes(b"\x7fELF" + bytes(200))


def test_a_corrupt_btf_section_is_refused_in_one_line(vmlinux: bytes) -> None:
    btf = read_sections(vmlinux)[".BTF"]
    damaged = bytearray(vmlinux)
    damaged[btf.offset + 4 : btf.offset + 8] = struct.pack("<I", 0xFFFF0000)  # the header's length
    with pytest.raises(GuestImageError, match="not BTF, or is truncated"):
        BtfTypes(bytes(damaged))


def _alternatives(vmlinux: bytes) -> dict[int, int]:
    """Each .altinstructions entry's file offset -> its feature word (struct alt_instr, Linux 6.1:
    s32 instr_offset, s32 repl_offset, u16 cpuid, u8 instrlen, u8 replacementlen)."""
    section = read_sections(vmlinux)[".altinstructions"]
    return {at: struct.unpack_from("<H", vmlinux, at + 8)[0] for at in range(section.offset, section.offset + section.size, 12)}


def test_paravirtualizing_points_the_interrupt_flag_at_the_monitor_and_keeps_every_call(vmlinux: bytes, symbols: Symbols) -> None:
    result = paravirtualize(vmlinux, pv_functions())
    slots = pv_slots(symbols, BtfTypes(vmlinux))
    assert len(slots) == 9
    for name, slot in slots.items():  # pv_ops.irq, cpu.write_msr and load_gs_index, mmu.read_cr2 and write_cr3 now hold the pv page's
        assert read_u64(result.vmlinux, slot) == pv_functions()[name], name
        assert PV_BASE <= read_u64(result.vmlinux, slot) < PV_BASE + 0x1000
    assert PV_BASE - KERNEL_TEXT < 1 << 31  # within a direct call of the kernel's text, as Linux patches it
    # Linux 6.1's pv_ops.irq call sites: about 1,300, a few more or fewer by Debian 12's point release
    # (1,300 in 6.1.0-4x, 1,298 in 6.1.0-50): save_fl, irq_disable and irq_enable each with an
    # alternative, ALT_NOT(X86_FEATURE_XENPV), that would put cli, sti or pushf back, and ten of
    # safe_halt and halt without; its pv_ops.mmu.read_cr2 and write_cr3 sites: 16, each with one
    # (MOV from CR2, to CR3)
    assert 1250 < result.sites < 1350 and result.mmu_sites == 16
    assert result.alternatives == result.sites - 10 + result.mmu_sites
    assert result.cpu_sites == 357 + 12  # pv_ops.cpu.write_msr's and load_gs_index's, with no alternative over any
    before, after = _alternatives(vmlinux), _alternatives(result.vmlinux)
    changed = [at for at in before if before[at] != after[at]]
    assert len(changed) == result.alternatives
    flag_not = alt_format(BtfTypes(vmlinux)).flag_not
    assert flag_not == 0x8000  # ALTINSTR_FLAG_INV, in 6.1's u16 cpuid
    assert all(before[at] == flag_not | X86_FEATURE_XENPV and after[at] == X86_FEATURE_XENPV for at in changed)
    inverted = sum(1 for word in before.values() if word == flag_not | X86_FEATURE_XENPV)
    kept = sum(1 for word in after.values() if word == flag_not | X86_FEATURE_XENPV)
    assert kept == inverted - len(changed) > 900  # the rest stay (907 in 6.1.0-4x, 908 in 6.1.0-50)
    iret = result.iret_site
    assert iret == symbols["native_irq_return_iret"].address
    text = read_sections(vmlinux)[".text"]
    at = text.offset + iret - text.address
    assert vmlinux[at : at + 2] == b"\x48\xcf" and result.vmlinux[at : at + 2] == b"\x0f\x0b"  # IRETQ -> UD2
    # __switch_to's MOV to SS, the one its exception-table entries name, is a NOP of its length
    ss_load = result.ss_load_site
    assert ss_load is not None and symbols["__switch_to"].address < ss_load < symbols["__switch_to"].address + 0x400
    at = text.offset + ss_load - text.address
    assert vmlinux[at : at + 2] == b"\x8e\xd0" and result.vmlinux[at : at + 2] == b"\x66\x90"  # mov %eax,%ss
    # the 7 calls of this_cpu_cmpxchg16b_emu (LEA, CALL: 8 bytes) now CMPXCHG16B %gs:(%rdi); SETZ %al
    assert result.cx16_sites == 7
    emulation = symbols["this_cpu_cmpxchg16b_emu"].address
    assert text_calls(vmlinux, emulation) == 7 and text_calls(result.vmlinux, emulation) == 0
    exchange = CMPXCHG16B_GS + b"\x0f\x0f\x94\xc0"  # CMPXCHG16B %gs:(%rdi); SETZ %al
    assert result.vmlinux.count(exchange) == vmlinux.count(exchange) + 7
    # nothing else in the image moved: 9 slots of 8 bytes, 1306 feature words, the IRETQ's and the MOV's 2
    # bytes each, the 7 sites' 8 bytes, the return to itself's displacement (4), and the return from
    # a system call's SWAPGS (3) and the jump after its SYSRETQ (5)
    differing = sum(1 for a, b in zip(vmlinux, result.vmlinux) if a != b)
    assert differing <= 9 * 8 + 1306 + 2 + 2 + 7 * 8 + 4 + 3 + 5


def test_a_cx16_alternative_through_r8_to_r15_is_applied_and_any_other_code_refused(vmlinux: bytes) -> None:
    """Ubuntu's 6.2 and 6.5 exchange through %r8 to %r15 (REX.WB, 65 49 0F C7); the same replacement so
    rewritten in Debian 12's image is put over the calls just as well. Code that is no CMPXCHG16B
    (here a REX.WR prefix, another instruction's operands) is refused in one line, not copied."""
    section = read_sections(vmlinux)[".altinstr_replacement"]
    exchange = CMPXCHG16B_GS + b"\x0f\x0f\x94\xc0"  # CMPXCHG16B %gs:(%rdi); SETZ %al
    replacements = vmlinux[section.offset : section.offset + section.size]
    assert replacements.count(exchange) == 7
    through_r15 = exchange.replace(b"\x65\x48", b"\x65\x49")  # CMPXCHG16B %gs:(%r15)
    high = vmlinux[: section.offset] + replacements.replace(exchange, through_r15) + vmlinux[section.offset + section.size :]
    result = paravirtualize(high, pv_functions())
    assert result.cx16_sites == 7 and result.vmlinux.count(through_r15) == high.count(through_r15) + 7
    other = vmlinux[: section.offset] + replacements.replace(exchange, exchange.replace(b"\x65\x48", b"\x65\x4c")) + \
        vmlinux[section.offset + section.size :]
    with pytest.raises(GuestImageError, match="CX16 alternative at 0x[0-9a-f]+ is not the CMPXCHG16B expected"):
        paravirtualize(other, pv_functions())


def text_calls(vmlinux: bytes, target: int) -> int:
    """The direct CALLs (E8 rel32) to `target` in the kernel's .text, decoded where they would be."""
    text = read_sections(vmlinux)[".text"]
    data = vmlinux[text.offset : text.offset + text.size]
    count, at = 0, data.find(b"\xe8")
    while at >= 0:
        if at + 5 <= len(data) and text.address + at + 5 + struct.unpack_from("<i", data, at + 1)[0] == target:
            count += 1
        at = data.find(b"\xe8", at + 1)
    return count


def test_debian_13s_kallsyms_come_in_6_4s_order(vmlinux_13: bytes) -> None:
    """Linux 6.4 on writes the count and the names first and the offsets and their base after the token
    index; the symbols read the same way from there. Its startup_64 no longer begins the image."""
    symbols = kallsyms(vmlinux_13)
    assert len(symbols) > 100_000
    assert symbols["_text"].address == KERNEL_TEXT and symbols["startup_64"].address > KERNEL_TEXT
    assert symbols["pv_ops"].kind == "D" and symbols["native_save_fl"].kind == "T"
    text = read_sections(vmlinux_13)[".text"]
    iret = symbols["native_irq_return_iret"].address
    assert vmlinux_13[text.offset + iret - text.address :][:2] == b"\x48\xcf"  # where kallsyms says: an IRETQ
    natives = {"save_fl": "pv_native_save_fl", "irq_disable": "pv_native_irq_disable",
               "irq_enable": "pv_native_irq_enable", "safe_halt": "pv_native_safe_halt", "halt": "native_halt",
               "write_msr": "native_write_msr", "load_gs_index": "native_load_gs_index",
               "read_cr2": "pv_native_read_cr2", "write_cr3": "native_write_cr3"}
    for name, address in pv_slots(symbols, BtfTypes(vmlinux_13)).items():  # BTF, kallsyms and the data agree
        assert read_u64(vmlinux_13, address) == symbols[natives[name]].address, name


def test_debian_13s_pv_ops_sites_are_found_among_its_alternatives(vmlinux_13: bytes) -> None:
    """Linux 6.8 on has no .parainstructions: each call through pv_ops is an alternative that makes
    it a direct call to what the slot holds (ALT_CALL_ALWAYS). Those stay; the native instructions
    over the irq calls (ALT_NOT(X86_FEATURE_XENPV), its "not" now bit 16 of a u32) are disarmed,
    and the emulation of CMPXCHG16B, whose POPF cannot restore a deprivileged kernel's IF, goes."""
    fmt = alt_format(BtfTypes(vmlinux_13))
    assert (fmt.size, fmt.width, fmt.flag_not, fmt.flag_direct_call) == (14, 4, 1 << 16, 2 << 16)
    result = paravirtualize(vmlinux_13, pv_functions())
    assert (result.sites, result.cpu_sites, result.mmu_sites, result.cx16_sites) == (1513, 400, 17, 13)
    assert result.alternatives == 1505 + 17  # the irq sites' and every mmu site's
    words = {}
    section = read_sections(vmlinux_13)[".altinstructions"]
    for image in (vmlinux_13, result.vmlinux):
        words[image is vmlinux_13] = [struct.unpack_from("<I", image, at + fmt.feature)[0]
                                      for at in range(section.offset, section.offset + section.size, fmt.size)]
    changed = [(a, b) for a, b in zip(words[True], words[False]) if a != b]
    assert len(changed) == 1522 and set(changed) == {(fmt.flag_not | X86_FEATURE_XENPV, X86_FEATURE_XENPV)}
    symbols = kallsyms(vmlinux_13)
    emulation = symbols["this_cpu_cmpxchg16b_emu"].address
    assert text_calls(vmlinux_13, emulation) == 13 and text_calls(result.vmlinux, emulation) == 0
    assert result.ss_load_site is not None
    assert symbols["__switch_to"].address < result.ss_load_site < symbols["__switch_to"].address + 0x400


def test_kallsyms_whose_per_cpu_symbols_are_not_absolute_count_every_offset_up_from_the_text(vmlinux_13: bytes) -> None:
    """Up to 6.14 x86-64's per-CPU symbols are absolute: a negative offset counts down from the text,
    `_text`'s is -1. From 6.15 (Ubuntu's 6.17 shows it) per-CPU data has kernel addresses and every
    offset is an unsigned count up from the text, `_text`'s 0. Debian 13's table, rewritten so, reads
    the same addresses."""
    symbols = kallsyms(vmlinux_13)
    section = read_sections(vmlinux_13)[".rodata"]
    rodata = vmlinux_13[section.offset : section.offset + section.size]
    layout = _layout_since_6_4(rodata, _tokens(rodata))
    assert layout is not None
    at = section.offset + layout.offsets
    offsets = struct.unpack_from(f"<{layout.symbols}i", vmlinux_13, at)
    assert -1 in offsets and min(offsets) < -1 and max(offsets) >= 0  # both kinds, and `_text` among them
    addresses = [offset if offset >= 0 else KERNEL_TEXT - 1 - offset for offset in offsets]
    rewritten = bytearray(vmlinux_13)
    struct.pack_into(f"<{layout.symbols}I", rewritten, at, *((address - KERNEL_TEXT) % (1 << 32) for address in addresses))
    read = kallsyms(bytes(rewritten))
    kernel = {name: symbol for name, symbol in symbols.items() if symbol.address >= KERNEL_TEXT}
    assert len(kernel) > 100_000 and all(read[name] == symbol for name, symbol in kernel.items())
    assert read["_text"].address == KERNEL_TEXT and read["pv_ops"] == symbols["pv_ops"]


def test_debian_14s_kallsyms_are_place_relative(vmlinux_14: bytes) -> None:
    """Linux 7.0 on has no kallsyms_relative_base: each offset counts from its own address. Read so,
    the symbols land where the image's own pointers and instructions say."""
    symbols = kallsyms(vmlinux_14)
    assert len(symbols) > 100_000
    assert symbols["_text"].address == KERNEL_TEXT and symbols["startup_64"].address > KERNEL_TEXT
    text = read_sections(vmlinux_14)[".text"]
    iret = symbols["native_irq_return_iret"].address
    assert vmlinux_14[text.offset + iret - text.address :][:2] == b"\x48\xcf"
    natives = {"save_fl": "pv_native_save_fl", "irq_disable": "pv_native_irq_disable",
               "irq_enable": "pv_native_irq_enable", "safe_halt": "pv_native_safe_halt", "halt": "native_halt",
               "write_msr": "native_write_msr", "load_gs_index": "native_load_gs_index",
               "read_cr2": "pv_native_read_cr2", "write_cr3": "pv_native_write_cr3"}
    for name, address in pv_slots(symbols, BtfTypes(vmlinux_14)).items():  # BTF, kallsyms and the data agree
        assert read_u64(vmlinux_14, address) == symbols[natives[name]].address, name


def test_each_kernels_write_msr_gets_the_monitors_function_of_its_form(vmlinux: bytes, vmlinux_13: bytes,
                                                                         vmlinux_14: bytes) -> None:
    """pv_ops.cpu.write_msr takes (msr, low, high) in 6.1 and 6.12 and (msr, value) in 7.2, as their BTF
    says; the slot gets the pv page's function for that form (a 64-bit value given as two halves would
    write the GS base's low half with RDX's garbage above it: 7.2 triple-faulted at its per-CPU setup)."""
    functions = pv_functions()
    for image, form, chosen in ((vmlinux, ["unsigned int"] * 3, "write_msr"),
                                (vmlinux_13, ["unsigned int"] * 3, "write_msr"),
                                (vmlinux_14, ["unsigned int", "long long unsigned int"], "write_msr_u64")):
        types = BtfTypes(image)
        assert types.parameters("pv_cpu_ops", "write_msr") == form
        assert types.parameters("pv_cpu_ops", "load_gs_index") == ["unsigned int"]
        slot = pv_slots(kallsyms(image), types)["write_msr"]
        assert read_u64(paravirtualize(image, functions).vmlinux, slot) == functions[chosen]
    assert functions["write_msr"] != functions["write_msr_u64"]
    with pytest.raises(GuestImageError, match="has no member nothing"):
        BtfTypes(vmlinux_14).parameters("pv_cpu_ops", "nothing")
    with pytest.raises(GuestImageError, match="not a function pointer"):
        BtfTypes(vmlinux_14).parameters("alt_instr", "instrlen")


def test_debian_14s_pv_ops_are_pointed_and_its_iretq_made_to_trap(vmlinux_14: bytes) -> None:
    """7.2's pv_ops sites are alternatives as 6.12's; it has no CMPXCHG16B emulation to replace.
    (Debian's testing moves on: 7.2.12 had 1,703 irq sites, 1,695 of them with a native alternative,
    438 cpu ones and 19 mmu ones, each of those with one; the test asks for the shape, not those numbers.)"""
    result = paravirtualize(vmlinux_14, pv_functions())
    assert result.sites > 1000 and 10 <= result.mmu_sites <= 40, result
    assert result.sites - 20 <= result.alternatives - result.mmu_sites <= result.sites, result
    assert result.cpu_sites > 300 and result.cx16_sites == 0, result
    symbols = kallsyms(vmlinux_14)
    assert result.iret_site == symbols["native_irq_return_iret"].address
    assert result.ss_load_site is not None
    assert symbols["__switch_to"].address < result.ss_load_site < symbols["__switch_to"].address + 0x400


def test_a_kernel_whose_return_to_user_mode_is_no_iretq_is_refused_in_one_line(vmlinux: bytes) -> None:
    sections = read_sections(vmlinux)
    damaged = bytearray(vmlinux)
    iret = kallsyms(vmlinux)["native_irq_return_iret"].address
    text = sections[".text"]
    damaged[text.offset + iret - text.address] = 0x90  # not an IRETQ there any more
    with pytest.raises(GuestImageError, match="is not an IRETQ"):
        paravirtualize(bytes(damaged), pv_functions())


@pytest.mark.parametrize("release", [None, DEBIAN_13, DEBIAN_14], ids=["debian-12", "debian-13", "debian-14"])
def test_each_kernels_return_to_itself_jumps_to_the_monitors_iretq(release: str | None, vmlinux: bytes,
                                                                   vmlinux_13: bytes, vmlinux_14: bytes) -> None:
    """restore_regs_and_return_to_kernel ends in a jump at early_xen_iret_patch (Xen PV's patch point)
    to the IRETQ: in all three, the jump the VMM rewrites into one to the pv page's pv_iret (its four
    displacement bytes), with the IRETQ after it the UD2 that returns to user mode still trap at."""
    image = {None: vmlinux, DEBIAN_13: vmlinux_13, DEBIAN_14: vmlinux_14}[release]
    symbols = kallsyms(image)
    site = symbols["early_xen_iret_patch"].address
    result = paravirtualize(image, pv_functions())
    assert result.kernel_return_site == site
    text = read_sections(image)[".text"]
    at = text.offset + site - text.address
    assert image[at] == result.vmlinux[at] == 0xE9
    assert site + 5 + struct.unpack_from("<i", image, at + 1)[0] == result.iret_site  # the IRETQ, before
    assert site + 5 + struct.unpack_from("<i", result.vmlinux, at + 1)[0] == pv_functions()["iret"] == PV_BASE + 0x160
    assert image[at + 5 : at + 7] == b"\x48\xcf" and result.vmlinux[at + 5 : at + 7] == b"\x0f\x0b"  # then the UD2


def test_a_kernel_whose_return_to_itself_is_no_jump_is_refused_in_one_line(vmlinux: bytes) -> None:
    text = read_sections(vmlinux)[".text"]
    damaged = bytearray(vmlinux)
    damaged[text.offset + kallsyms(vmlinux)["early_xen_iret_patch"].address - text.address] = 0x90
    with pytest.raises(GuestImageError, match="early_xen_iret_patch at 0x[0-9a-f]+ is not a jump to its IRETQ"):
        paravirtualize(bytes(damaged), pv_functions())


@pytest.fixture(scope="module")
def vmlinux_without_xxl() -> bytes:
    """Linux 6.1 built without CONFIG_PARAVIRT_XXL, so without CONFIG_XEN_PV (tests/kernels/README.md)."""
    return extract_vmlinux(parse_bzimage(linux_without_xxl().read_bytes(), "kernel"))


def test_a_kernel_without_xen_pv_returns_to_itself_through_the_monitors_iretq(vmlinux_without_xxl: bytes) -> None:
    """No early_xen_iret_patch: restore_regs_and_return_to_kernel is POP_REGS, ADD $8, %RSP and the
    IRETQ (no ESPFIX64 in this build). Its last POP and the ADD, five bytes, become a jump to the pv
    page's iret_pop_rdi, which does them and goes on as pv_iret; the POPs before stay the kernel's,
    and the IRETQ, which the returns to user mode jump to, stays their UD2."""
    image = vmlinux_without_xxl
    symbols = kallsyms(image)
    assert "early_xen_iret_patch" not in symbols
    start = symbols["restore_regs_and_return_to_kernel"].address
    result = paravirtualize(image, pv_functions())
    text = read_sections(image)[".text"]
    at = text.offset + start - text.address
    pops = 23  # R15 to RSI, then RDI's
    assert result.kernel_return_site == start + pops - 1 and result.iret_site == start + pops + 4
    assert image[at + pops - 1 : at + pops + 4] == bytes.fromhex("5f 48 83 c4 08")  # pop %rdi; add $8, %rsp
    assert result.vmlinux[at : at + pops - 1] == image[at : at + pops - 1]
    site = result.kernel_return_site
    assert result.vmlinux[at + pops - 1] == 0xE9
    assert site + 5 + struct.unpack_from("<i", result.vmlinux, at + pops)[0] == pv_functions()["iret_pop_rdi"]
    assert result.vmlinux[at + pops + 4 : at + pops + 6] == b"\x0f\x0b"  # the UD2 at native_irq_return_iret


@pytest.mark.parametrize("change", ["a pop missing", "a longer skip"])
def test_a_kernel_whose_return_to_itself_has_another_shape_keeps_its_trap(vmlinux_without_xxl: bytes,
                                                                          change: str) -> None:
    """Anything but POP_REGS, the skip and the IRETQ (with ESPFIX64's test between) is left as it is:
    its returns to itself trap at the UD2, as they did, and the VMM's note says so."""
    image = bytearray(vmlinux_without_xxl)
    text = read_sections(image)[".text"]
    at = text.offset + kallsyms(image)["restore_regs_and_return_to_kernel"].address - text.address
    if change == "a pop missing":
        image[at : at + 2] = b"\x66\x90"  # POP %R15 made a NOP
    else:
        image[at + 26] = 0x10  # ADD $16, %RSP
    result = paravirtualize(bytes(image), pv_functions())
    assert result.kernel_return_site is None
    assert result.vmlinux[at + 27 : at + 29] == b"\x0f\x0b"


@pytest.mark.parametrize("release", [None, DEBIAN_13, DEBIAN_14], ids=["debian-12", "debian-13", "debian-14"])
def test_each_kernels_return_from_a_system_call_jumps_to_the_monitor_past_its_sysretq(
        release: str | None, vmlinux: bytes, vmlinux_13: bytes, vmlinux_14: bytes) -> None:
    """entry_SYSRETQ_unsafe_stack's SWAPGS becomes a short jump (and an INT3) to the INT3 and padding
    after the SYSRETQ, and they a jump to the pv page's PV_SYSRET; the bytes between, where the
    kernel's CLEAR_CPU_BUFFERS alternative puts a VERW or not at boot, stay as they were, and so
    does the SYSRETQ."""
    image = {None: vmlinux, DEBIAN_13: vmlinux_13, DEBIAN_14: vmlinux_14}[release]
    symbols = kallsyms(image)
    site, end = symbols["entry_SYSRETQ_unsafe_stack"].address, symbols["entry_SYSRETQ_end"].address
    result = paravirtualize(image, pv_functions())
    assert result.sysret_site == site
    text = read_sections(image)[".text"]
    at, at_end = text.offset + site - text.address, text.offset + end - text.address
    assert image[at : at + 3] == b"\x0f\x01\xf8" and image[at_end - 3 : at_end + 1] == b"\x48\x0f\x07\xcc"
    assert result.vmlinux[at : at + 3] == bytes([0xEB, end - site - 2, 0xCC])
    assert result.vmlinux[at + 3 : at_end] == image[at + 3 : at_end]  # CLEAR_CPU_BUFFERS and the SYSRETQ
    assert result.vmlinux[at_end] == 0xE9
    assert end + 5 + struct.unpack_from("<i", result.vmlinux, at_end + 1)[0] == pv_functions()["sysret"] == PV_BASE + 0x90


def test_a_kernel_whose_return_from_a_system_call_is_no_swapgs_is_refused_in_one_line(vmlinux: bytes) -> None:
    text = read_sections(vmlinux)[".text"]
    damaged = bytearray(vmlinux)
    damaged[text.offset + kallsyms(vmlinux)["entry_SYSRETQ_end"].address - text.address] = 0x90  # not the INT3
    with pytest.raises(GuestImageError, match="entry_SYSRETQ_unsafe_stack at 0x[0-9a-f]+ is not a SWAPGS, then a SYSRETQ"):
        paravirtualize(bytes(damaged), pv_functions())


def test_the_kernel_a_boot_loader_started_is_made_ready_for_the_monitor_in_guest_memory(vmlinux: bytes) -> None:
    """Firmware under the monitor (vmm/x86/handoff.py): Debian's bzImage as GRUB leaves it at its
    32-bit entry, taken over as --kernel --monitor loads a file: the vmlinux patched as
    paravirtualize patches it, at its physical addresses; the loader's zero page and command line
    copied below 1 MiB for the 64-bit entry, its initrd left where the loader put it."""
    image = Path(debian().kernel).read_bytes()
    memory_map = MemoryMap.for_memory(256 * MIB)
    memory = GuestMemory(memory_map.backed_ranges())
    try:
        entry = parse_bzimage(image).header.pref_address  # where GRUB loads a relocatable kernel
        initrd = (0xC000000, 0xC000000 + MIB)
        loaded_by_a_boot_loader(memory, image, entry, b"console=ttyS0 quiet", ramdisk_image=initrd[0], ramdisk_size=MIB)
        boot = take_over_linux(memory, memory_map, LOADER_ZERO_PAGE, entry, pv_functions(), [Feature("xsave", 26)])
        patched = paravirtualize(vmlinux, pv_functions())
        first = read_sections(patched.vmlinux)[".text"]
        assert memory.read(first.address - KERNEL_TEXT + 0x1000000, 4096) == patched.vmlinux[first.offset:first.offset + 4096]
        assert boot.iret_site == patched.iret_site and boot.initrd == initrd and boot.zero_page == ZERO_PAGE
        assert boot.cmdline == "console=ttyS0 quiet noxsave"
        params = memory.read_obj(ZERO_PAGE, bp.boot_params)
        assert (params.hdr.cmd_line_ptr, params.hdr.ramdisk_image, params.hdr.type_of_loader) == (CMDLINE_ADDR, initrd[0], 0x72)
        assert memory.read_cstring(CMDLINE_ADDR, 100) == b"console=ttyS0 quiet noxsave"
        assert f"started it at {entry:#x}" in boot.notes[0] and any("lz4" in note or "zstd" in note for note in boot.notes)
    finally:
        memory.close()


def test_a_debian_13_kernel_whose_pv_call_is_no_call_through_memory_is_refused_in_one_line(vmlinux_13: bytes) -> None:
    fmt = alt_format(BtfTypes(vmlinux_13))
    section = read_sections(vmlinux_13)[".altinstructions"]
    text = read_sections(vmlinux_13)[".text"]
    damaged = bytearray(vmlinux_13)
    for at in range(section.offset, section.offset + section.size, fmt.size):
        if struct.unpack_from("<I", vmlinux_13, at + fmt.feature)[0] & fmt.flag_direct_call:
            relative = struct.unpack_from("<i", vmlinux_13, at + fmt.instr)[0]
            site = section.address + at - section.offset + fmt.instr + relative
            if text.address <= site < text.address + text.size:
                damaged[text.offset + site - text.address] = 0x90  # FF 15 no more
                break
    with pytest.raises(GuestImageError, match="is not a CALL through memory"):
        paravirtualize(bytes(damaged), pv_functions())
