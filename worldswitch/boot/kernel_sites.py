"""Where a Linux rewrites its own code, at boot and later, and where it enters its code by address
rather than by a branch a decoder sees: what the binary translator (translator.py) must leave as it
is. Read from the kernel's own tables (arch/x86/kernel/alternative.c, jump_label.c, static_call.c,
ftrace.c; arch/x86/mm/extable.c), each found by its section or, for those the linker puts inside
.data, by its __start_ and __stop_ symbols (kallsyms names them in a kernel with KALLSYMS_ALL).

Each table is a list of sites: the instruction at each is rewritten whole (a jump label's JMP or NOP,
a static call's CALL, a retpoline's or a return thunk's JMP, ftrace's CALL of __fentry__), or found
by its address (an instruction with an exception-table entry: its fixup is looked up by the faulting
RIP), so a site is kept as its first byte: a window of whole instructions covers it exactly when it
covers that byte. Alternatives and paravirt sites are ranges of the length their entry gives. Three
kinds are given apart, for translator.py to cover on its terms: LOCK prefixes, JMPs to the return
thunk (move_return_sites) and unchecked WRMSRs (EX_TYPE_WRMSR entries, `faulting`).
"""

from __future__ import annotations

import struct
from typing import Callable

from ..errors import GuestImageError
from .elf import Section
from .kernel_symbols import BtfTypes, Symbols, relative_addresses, struct_fields, table_entries
from .translator import KernelSites

# Tables of s32 offsets, each relative to its own entry, naming an instruction the kernel rewrites
RELATIVE_SITE_TABLES = (".retpoline_sites", ".call_sites", ".ibt_endbr_seal", ".cfi_sites")
# and two that a window may cover (translator.py): LOCK prefixes, which the kernel makes DS prefixes
# while it runs on one CPU and back, and JMPs to the return thunk, which it makes RETs (or JMPs to
# another thunk) once at boot
LOCK_PREFIXES, RETURN_SITES = ".smp_locks", ".return_sites"
# Tables the linker puts inside .data: (first symbol, end symbol, entry size, a text symbol present
# exactly when the kernel has the feature, so that a table kallsyms does not name is refused)
JUMP_TABLE = ("__start___jump_table", "__stop___jump_table", 16, "jump_label_init")  # {s32 code, s32 target, long key}
STATIC_CALL_SITES = ("__start_static_call_sites", "__stop_static_call_sites", 8, "static_call_init")  # {s32 addr, s32 key}
MCOUNT_LOCATIONS = ("__start_mcount_loc", "__stop_mcount_loc", 8, "ftrace_init")  # u64 addresses
ENTRY_TEXT = ("__entry_text_start", "__entry_text_end")  # the entry code: runs on any stack, found by address
# The head (.head.text, from _text): code that runs at its physical address too, where a rel32 to the
# cache lands nowhere. No symbol ends it: it ends at the first function not of these names.
HEAD_FUNCTIONS = frozenset(("_text", "_stext", "startup_64", "secondary_startup_64", "secondary_startup_64_no_verify",
                            "verify_cpu", "sev_verify_cbit", "start_cpu0", "__startup_64", "startup_64_setup_env",
                            "startup_64_setup_gdt_idt", "early_setup_idt", "startup_64_load_idt", "vc_boot_ghcb",
                            "__startup_secondary_64", "sme_postprocess_startup", "common_startup_64"))
EX_TYPE_WRMSR = 8  # arch/x86/include/asm/extable_fixup_types.h


def kernel_sites(vmlinux: bytes, sections: dict[str, Section], symbols: Symbols, types: BtfTypes,
                 alternatives: list[tuple[int, int]], file_offset: Callable[[int, int], int]) -> KernelSites | str:
    """What no window may cover in `vmlinux` (`alternatives`: each alternative's [start, end)), or
    why the kernel's tables cannot tell (then nothing is translated)."""
    kept = list(alternatives)
    targets: set[int] = set()
    for name in RELATIVE_SITE_TABLES:
        if name in sections:
            entries = table_entries(sections, name, 4)
            kept += [(site, site + 1) for site in relative_addresses(vmlinux, sections[name], entries, 0)]
    locks, returns = (set(relative_addresses(vmlinux, sections[name], table_entries(sections, name, 4), 0))
                      if name in sections else set() for name in (LOCK_PREFIXES, RETURN_SITES))
    replacement = sections.get(".altinstr_replacement")
    if replacement is not None:  # copied over the text at boot: the copy, not this, runs
        kept.append((replacement.address, replacement.address + replacement.size))
    if ".parainstructions" in sections:  # up to Linux 6.7: struct paravirt_patch_site
        size, members = types.struct("paravirt_patch_site")
        instr, length = struct_fields(size, members, "paravirt_patch_site", instr=8, len=1)
        for at in table_entries(sections, ".parainstructions", size):
            site = struct.unpack_from("<Q", vmlinux, at + instr)[0]
            kept.append((site, site + vmlinux[at + length]))
    faulting: set[int] = set()
    if "__ex_table" in sections:
        size, members = types.struct("exception_table_entry")
        insn, fixup = struct_fields(size, members, "exception_table_entry", insn=4, fixup=4)
        entries = table_entries(sections, "__ex_table", size)
        sites = relative_addresses(vmlinux, sections["__ex_table"], entries, insn)
        targets.update(relative_addresses(vmlinux, sections["__ex_table"], entries, fixup))
        # an unchecked WRMSR's entry (EX_TYPE_WRMSR, Linux 5.16 on: the type in the low byte of `data`)
        # only warns if the CPU refuses it; the monitor's write_msr, which a copy calls, is pv_ops'
        # for the same unchecked writes in a paravirtual kernel. Every other entry's instruction stays.
        data = struct_fields(size, members, "exception_table_entry", data=4)[0] if "data" in members else None
        for at, site in zip(entries, sites):
            if data is not None and vmlinux[at + data] == EX_TYPE_WRMSR:
                faulting.add(site)
            else:
                kept.append((site, site + 1))
    for first, stop, size, feature in (JUMP_TABLE, STATIC_CALL_SITES, MCOUNT_LOCATIONS):
        if first not in symbols or stop not in symbols:
            if feature in symbols:
                return f"the kernel has {feature} but its kallsyms no {first} (a kernel without KALLSYMS_ALL)"
            continue
        start, end = symbols[first].address, symbols[stop].address
        if end < start or (end - start) % size:
            raise GuestImageError(f"the kernel's {first} to {stop} is not a whole number of {size}-byte entries")
        if end == start:
            continue
        at = file_offset(start, end - start)
        table = Section(start, at, end - start)
        entries = range(at, at + end - start, size)
        if first == MCOUNT_LOCATIONS[0]:
            kept += [(site, site + 1) for site in (struct.unpack_from("<Q", vmlinux, each)[0] for each in entries)]
            continue
        kept += [(site, site + 1) for site in relative_addresses(vmlinux, table, entries, 0)]
        if first == JUMP_TABLE[0]:
            targets.update(relative_addresses(vmlinux, table, entries, 4))
    if ENTRY_TEXT[0] in symbols and ENTRY_TEXT[1] in symbols:
        kept.append((symbols[ENTRY_TEXT[0]].address, symbols[ENTRY_TEXT[1]].address))
    if "_text" in symbols:
        head = symbols["_text"].address
        names: dict[int, set[str]] = {}
        for name, symbol in symbols.items():
            if symbol.kind in "tT" and symbol.address >= head:
                names.setdefault(symbol.address, set()).add(name)
        end = next((address for address in sorted(names) if not names[address] <= HEAD_FUNCTIONS), head)
        kept.append((head, end))
    return KernelSites(kept, targets, faulting, locks, returns)


def move_return_sites(image: bytearray, sections: dict[str, Section], moved: dict[int, int]) -> None:
    """Point each .return_sites entry that names a key of `moved` at its value: the copy of that JMP
    in the code cache, which the kernel then rewrites at boot as it would have the original."""
    if not moved:
        return
    table = sections[RETURN_SITES]
    entries = table_entries(sections, RETURN_SITES, 4)
    for at, site in zip(entries, relative_addresses(image, table, entries, 0)):
        place = table.address + at - table.offset
        if site in moved:
            displacement = moved[site] - place
            if not -(1 << 31) <= displacement < 1 << 31:
                raise GuestImageError(f"the return site moved from {site:#x} is beyond its .return_sites entry's reach")
            struct.pack_into("<i", image, at, displacement)
