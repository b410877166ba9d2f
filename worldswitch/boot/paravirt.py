"""Making a paravirtual Linux's vmlinux ready to run deprivileged under the in-guest monitor
(docs/monitor.md, stage 2), before it runs: its interrupt flag goes to the monitor's functions,
since its kernel runs in ring 3, where PUSHF, POPF, CLI and STI cannot show or change the real IF
without a trap; so do its MSR writes (`pv_ops.cpu.write_msr`: the FS base at every context switch,
which the monitor writes with one trip into ring 0 instead of a trap and a call) and its user GS loads
(`pv_ops.cpu.load_gs_index`: between two SWAPGS, four traps, one trip into ring 0 instead); and its
one IRETQ to user mode is made to trap (see paravirtualize).

A kernel built with CONFIG_PARAVIRT_XXL reaches its interrupt flag through `pv_ops.irq` (save_fl,
irq_disable, irq_enable, safe_halt, halt). Two tables decide what each call site becomes at boot
(arch/x86/kernel/alternative.c, alternative_instructions(), Linux 6.1):
1. `.parainstructions` (struct paravirt_patch_site: the site, its pv_ops index, its length):
   apply_paravirt() turns each indirect call through pv_ops into a direct call to what the slot
   holds then. So the slots are set here, in the image.
2. `.altinstructions` (struct alt_instr): apply_alternatives() then puts the native instruction
   (`cli`, `sti`, `pushf; pop %rax`) over the call unless the CPU has X86_FEATURE_XENPV. Each of
   those alternatives is marked ALT_NOT(X86_FEATURE_XENPV); here its "not" goes, so that it
   applies only on a CPU with XENPV, a flag only Linux's Xen PV start-up sets. The call stays.
Both layouts come from the kernel's own BTF; its symbols from its kallsyms (kernel_symbols.py).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import GuestImageError
from .elf import Section, read_sections
from .kernel_symbols import PV_IRQ_OPS, PV_OPS, BtfTypes, Member, kallsyms, pv_slots

ALT_FLAG_NOT = 0x8000  # ALTINSTR_FLAG_INV in alt_instr.cpuid: apply where the CPU lacks the feature
X86_FEATURE_XENPV = 8 * 32 + 16  # arch/x86/include/asm/cpufeatures.h
IRETQ, UD2 = b"\x48\xcf", b"\x0f\x0b"


class Paravirtualized(NamedTuple):
    vmlinux: bytes
    sites: int  # pv_ops.irq call sites that stay calls to the new functions
    cpu_sites: int  # pv_ops.cpu.write_msr and load_gs_index call sites
    alternatives: int  # native replacements taken away from them
    iret_site: int  # the kernel's IRETQ to user mode (native_irq_return_iret), now a UD2


def paravirtualize(vmlinux: bytes, functions: dict[str, int]) -> Paravirtualized:
    """`vmlinux` made ready to run deprivileged under the monitor: its pv_ops.irq slots and
    pv_ops.cpu.write_msr and load_gs_index holding `functions` (by member name), every call site of
    them kept a call (the native alternatives over the irq ones disarmed), and its IRETQ to user mode
    a UD2."""
    names = [name for group in PV_OPS.values() for name in group]
    if sorted(functions) != sorted(names):
        raise ValueError(f"pv_ops functions must be exactly {', '.join(names)}")
    sections = read_sections(vmlinux)
    image = bytearray(vmlinux)

    def file_offset(address: int, length: int) -> int:
        for section in sections.values():
            if section.address and section.address <= address and address + length <= section.address + section.size:
                return section.offset + address - section.address
        raise GuestImageError(f"the kernel image holds no bytes for {address:#x}")

    symbols, types = kallsyms(vmlinux), BtfTypes(vmlinux)
    slots = pv_slots(symbols, types)
    pv_ops = symbols["pv_ops"].address
    for name, slot in slots.items():
        struct.pack_into("<Q", image, file_offset(slot, 8), functions[name])

    types_of = {(slot - pv_ops) // 8: name for name, slot in slots.items()}
    sites, cpu_sites = set(), set()
    site_size, site = types.struct("paravirt_patch_site")
    site_instr, site_type = _fields(site_size, site, "paravirt_patch_site", instr=8, type=1)
    for at in _entries(sections, ".parainstructions", site_size):
        instruction = struct.unpack_from("<Q", vmlinux, at + site_instr)[0]
        op = types_of.get(vmlinux[at + site_type])
        if op in PV_IRQ_OPS:
            sites.add(instruction)
        elif op is not None:
            cpu_sites.add(instruction)

    alt_size, alt = types.struct("alt_instr")
    alt_instr, alt_cpuid = _fields(alt_size, alt, "alt_instr", instr_offset=4, cpuid=2)
    entries = _entries(sections, ".altinstructions", alt_size)
    section = sections[".altinstructions"]
    disarmed = 0
    for at in entries:
        relative = struct.unpack_from("<i", vmlinux, at + alt_instr)[0]
        instruction = (section.address + at - section.offset + alt_instr + relative) & (2**64 - 1)
        if instruction in cpu_sites:  # nothing would put the native code back over these: keep it so
            raise GuestImageError(f"the kernel has an alternative at the pv_ops.cpu call {instruction:#x}")
        if instruction not in sites:
            continue
        feature_at = at + alt_cpuid
        feature = struct.unpack_from("<H", vmlinux, feature_at)[0]
        if feature != ALT_FLAG_NOT | X86_FEATURE_XENPV:
            raise GuestImageError(f"the kernel's alternative at the pv_ops.irq call {instruction:#x} is for feature "
                                  f"{feature:#x}, not the expected ALT_NOT(X86_FEATURE_XENPV)")
        struct.pack_into("<H", image, feature_at, X86_FEATURE_XENPV)
        disarmed += 1
    # Every return to user mode by IRETQ goes through one instruction (entry_64.S, native_irq_return_iret).
    # Where the kernel runs deprivileged on a PVM host, that IRETQ to the user segments Linux shares
    # with the host would run natively and unseen; as a UD2 it traps, and the monitor does the IRETQ.
    if "native_irq_return_iret" not in symbols:
        raise GuestImageError("the kernel has no native_irq_return_iret (not an x86-64 Linux of the 4.x to 6.x line?)")
    iret_site = symbols["native_irq_return_iret"].address
    at = file_offset(iret_site, len(IRETQ))
    if vmlinux[at : at + len(IRETQ)] != IRETQ:
        raise GuestImageError(f"the kernel's native_irq_return_iret at {iret_site:#x} is not an IRETQ")
    image[at : at + len(IRETQ)] = UD2
    return Paravirtualized(bytes(image), len(sites), len(cpu_sites), disarmed, iret_site)


def _fields(size: int, members: dict[str, Member], struct_name: str, **widths: int) -> list[int]:
    """The offsets of a kernel struct's members, each checked to lie within the struct."""
    offsets = []
    for name, width in widths.items():
        if name not in members or members[name].offset + width > size:
            raise GuestImageError(f"the kernel's BTF gives struct {struct_name} no {width}-byte {name} within its {size} bytes")
        offsets.append(members[name].offset)
    return offsets


def _entries(sections: dict[str, Section], name: str, size: int) -> range:
    """The file offsets of a kernel table's entries (`size` bytes each)."""
    section = sections.get(name)
    if section is None:
        raise GuestImageError(f"the kernel has no {name} section (is it built with CONFIG_PARAVIRT?)")
    if size <= 0 or section.size % size:
        raise GuestImageError(f"the kernel's {name} is not a whole number of {size}-byte entries")
    return range(section.offset, section.offset + section.size, size)
