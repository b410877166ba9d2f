"""Making a paravirtual Linux's vmlinux ready to run deprivileged under the in-guest monitor
(docs/monitor.md, stage 2), before it runs: its interrupt flag goes to the monitor's functions,
since its kernel runs in ring 3, where PUSHF, POPF, CLI and STI cannot show or change the real IF
without a trap; so do its MSR writes (`pv_ops.cpu.write_msr`: the FS base at every context switch,
which the monitor writes with one trip into ring 0 instead of a trap and a call), its user GS loads
(`pv_ops.cpu.load_gs_index`: between two SWAPGS, four traps, one trip into ring 0 instead), and its
CR2 reads and CR3 loads (`pv_ops.mmu.read_cr2`, at every page fault, and `write_cr3`, at every
context switch: each MOV a trap, where the monitor's functions take none); its one IRETQ to user mode
is made to trap, its return to itself and its return from a system call go to the monitor, which
does each without a trap, and an AMD CPU's SS load at a context switch, a trap that changes nothing
there, goes (see paravirtualize).

A kernel built with CONFIG_PARAVIRT_XXL reaches its interrupt flag through `pv_ops.irq` (save_fl,
irq_disable, irq_enable, safe_halt, halt). Its boot decides what each call site becomes
(arch/x86/kernel/alternative.c, alternative_instructions()):
1. Each indirect call through pv_ops becomes a direct call to what the slot holds then. So the
   slots are set here, in the image. Up to Linux 6.7 `.parainstructions` lists the sites (struct
   paravirt_patch_site: the site, its pv_ops index, its length; apply_paravirt()); from 6.8 on each
   site is an alternative of its own, ALT_CALL_ALWAYS (ALT_FLAG_DIRECT_CALL: the CALL through
   RIP-relative memory becomes a direct call to where that memory points), and the slot is found
   from the instruction.
2. `.altinstructions` (struct alt_instr): apply_alternatives() puts the native instruction
   (`cli`, `sti`, `pushf; pop %rax`; `mov %cr2, %rax`, `mov %rdi, %cr3`) over an irq or mmu call
   unless the CPU has X86_FEATURE_XENPV. Each of those alternatives is marked
   ALT_NOT(X86_FEATURE_XENPV); here its "not" goes, so that it applies only on a CPU with XENPV, a
   flag only Linux's Xen PV start-up sets. The call stays.
   struct alt_instr's feature word is a u16 up to 6.2 (ALTINSTR_FLAG_INV its top bit), and a u32
   from 6.3 on (ft_flags: the feature, and flags from bit 16 up).
Both layouts come from the kernel's own BTF; its symbols from its kallsyms (kernel_symbols.py).

A kernel built without PARAVIRT_XXL (no Xen PV: `defconfig`, and most kernels one builds oneself) has
no such pv_ops: its CLIs, STIs, MOVs to control registers and WRMSRs trap as they are, and only its
PUSHFs and POPFs, which do not, are made to (flag_sites.py). The rest below is done to both kinds.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Callable, NamedTuple

from ..errors import GuestImageError
from .elf import Section, read_sections
from .flag_sites import CodeRange, FlagSites, trap_flag_instructions
from .kernel_sites import kernel_sites, move_return_sites
from .kernel_symbols import (ADDRESS_MASK, PV_IRQ_OPS, PV_MMU_OPS, PV_OPS, BtfTypes, Symbols, has_paravirt_xxl,
                             kallsyms, pv_slots, relative_addresses, struct_fields, table_entries)
from .monitor import AP_ENTRY, CODE_CACHE, CODE_CACHE_SIZE
from .translator import CacheLayout, Translation, translate

X86_FEATURE_XENPV = 8 * 32 + 16  # arch/x86/include/asm/cpufeatures.h
CALL_RIP_RELATIVE = b"\xff\x15"  # CALL *disp32(%rip): a pv_ops call site as compiled
X86_FEATURE_CX16 = 4 * 32 + 13
CALL_REL32, NOP = 0xE8, b"\x90"
CMPXCHG16B_GS = b"\x65\x48\x0f\xc7"  # CMPXCHG16B %gs:(reg): GS, REX.W, 0F C7 /1
CMPXCHG16B_GS_HIGH = b"\x65\x49\x0f\xc7"  # the same through %r8 to %r15 (REX.WB): Linux 6.2's and 6.5's
IRETQ, UD2 = b"\x48\xcf", b"\x0f\x0b"
# entry_64.S's POP_REGS: R15, R14, R13, R12, RBP, RBX, R11 to R8, RAX, RCX, RDX, RSI, RDI (pt_regs' order)
POP_REGS = bytes.fromhex("415f415e415d415c5d5b415b415a4159415858595a5e5f")
SKIP_ORIG_AX = bytes.fromhex("4883c408")  # ADD $8, %RSP
ESPFIX_TEST = bytes.fromhex("f644242004")  # TESTB $4, SS-RIP(%RSP): an LDT selector (CONFIG_X86_ESPFIX64)
SWAPGS, SYSRETQ, INT3 = b"\x0f\x01\xf8", b"\x48\x0f\x07", 0xCC
JMP_REL32, JMP_REL8 = 0xE9, 0xEB
JNZ_REL8, JNZ_REL32 = 0x75, b"\x0f\x85"
# The monitor's function for the kernel's IRETQ to itself: not a pv_ops member (Linux had
# pv_ops.cpu.iret until 5.18), but early_xen_iret_patch's jump (see paravirtualize)
KERNEL_RETURN = "iret"
# The same for a kernel without early_xen_iret_patch (no CONFIG_XEN_PV), jumped to from its return's
# last POP (see _point_kernel_return)
KERNEL_RETURN_POP_RDI = "iret_pop_rdi"
# The monitor's function for the kernel's return from a system call, its SWAPGS before SYSRETQ:
# jumped to from the padding after that SYSRETQ (see paravirtualize)
SYSCALL_RETURN = "sysret"
TRANSLATED_INVLPG = "invlpg"  # not a pv_ops member: the monitor's invlpg(address), for translator.py
MOV_TO_SS = 0x8E, 2  # MOV Sreg, r/m16 (opcode, ModRM reg field 2: SS)
REX_B = 0x41
# the SDM's recommended NOPs of those lengths
NOPS = {1: b"\x90", 2: b"\x66\x90", 3: b"\x0f\x1f\x00", 4: b"\x0f\x1f\x40\x00", 5: b"\x0f\x1f\x44\x00\x00",
        6: b"\x66\x0f\x1f\x44\x00\x00", 7: b"\x0f\x1f\x80\x00\x00\x00\x00",
        8: b"\x0f\x1f\x84\x00\x00\x00\x00\x00", 9: b"\x66\x0f\x1f\x84\x00\x00\x00\x00\x00"}
# pv_ops.cpu.write_msr's parameters as BTF names them -> the monitor's function for that form:
# (msr, low, high) up to Linux 6.12 at least, (msr, value) in 7.2
WRITE_MSR_FORMS = {("unsigned int", "unsigned int", "unsigned int"): "write_msr",
                   ("unsigned int", "long long unsigned int"): "write_msr_u64"}


class AltFormat(NamedTuple):
    """struct alt_instr as a kernel lays it out: its size, where its instruction's offset and its
    feature word are, the word's width, and the flags in it."""
    size: int
    instr: int
    replacement: int
    feature: int
    width: int  # bytes: 2 (cpuid, up to Linux 6.2) or 4 (ft_flags, from 6.3)
    instrlen: int
    replacementlen: int
    flag_not: int  # apply where the CPU lacks the feature
    flag_direct_call: int  # the call becomes a direct one (6.8 on; 0 where the format has none)

    @property
    def word(self) -> str:
        """The feature word's struct format."""
        return "<H" if self.width == 2 else "<I"


def alt_format(types: BtfTypes) -> AltFormat:
    """struct alt_instr's layout, from the kernel's BTF."""
    size, members = types.struct("alt_instr")
    width, not_flag, direct_call = (2, 0x8000, 0) if "cpuid" in members else (4, 1 << 16, 2 << 16)
    feature = {"cpuid": 2} if width == 2 else {"": 4}  # from 6.3 an anonymous union (ft_flags)
    offsets = struct_fields(size, members, "alt_instr", instr_offset=4, repl_offset=4, **feature, instrlen=1,
                      replacementlen=1)
    return AltFormat(size, offsets[0], offsets[1], offsets[2], width, offsets[3], offsets[4], not_flag, direct_call)


class Alternative(NamedTuple):
    """One struct alt_instr, read."""
    entry: int  # its file offset in .altinstructions
    instruction: int  # the address it patches, and how many bytes
    length: int
    replacement: int  # the address of what it puts there, and how many bytes
    replacement_length: int
    feature: int  # the feature word, flags included


def _alternatives(vmlinux: bytes, sections: dict[str, Section], fmt: AltFormat) -> list[Alternative]:
    """The kernel's `.altinstructions`, each entry's relative addresses made absolute."""
    entries = table_entries(sections, ".altinstructions", fmt.size)  # refuses a kernel without them
    section = sections[".altinstructions"]
    found = []
    for at in entries:
        base = section.address + at - section.offset
        instruction = base + fmt.instr + struct.unpack_from("<i", vmlinux, at + fmt.instr)[0]
        replacement = base + fmt.replacement + struct.unpack_from("<i", vmlinux, at + fmt.replacement)[0]
        found.append(Alternative(at, instruction & ADDRESS_MASK, vmlinux[at + fmt.instrlen], replacement & ADDRESS_MASK,
                                 vmlinux[at + fmt.replacementlen], struct.unpack_from(fmt.word, vmlinux, at + fmt.feature)[0]))
    return found


# KVM's paravirtual features a kernel in ring 3 cannot use: both are hypercalls or stand on one,
# and KVM refuses a hypercall from ring 3 (KVM_EPERM). PV IPIs (KVM_HC_SEND_IPI) would be IPIs lost;
# a PV TLB flush leaves a preempted vCPU's flush to KVM at its next entry, which flushes the CPU's
# TLB but not the monitor's shadows of that vCPU. Linux asks each of these functions once whether
# to use the feature; each is made to say no (see _refuse_kvm_features). Only a kernel of more than
# one CPU would use either. PV spinlocks' kick is the third: `nopvspin` on the command line (linux.py).
REFUSED_KVM_FEATURES = ("pv_ipi_supported", "pv_tlb_flush_supported")
ENDBR64 = b"\xf3\x0f\x1e\xfa"
RETURN_FALSE = b"\x31\xc0\xc3"  # xor %eax, %eax; ret


class Paravirtualized(NamedTuple):
    vmlinux: bytes
    xxl: bool  # built with CONFIG_PARAVIRT_XXL: its pv_ops point at the monitor; else its PUSHFs and POPFs trap
    sites: int  # pv_ops.irq call sites that stay calls to the new functions
    cpu_sites: int  # pv_ops.cpu.write_msr and load_gs_index call sites
    mmu_sites: int  # pv_ops.mmu.read_cr2 and write_cr3 call sites
    alternatives: int  # native replacements taken away from the irq and mmu sites
    iret_site: int  # the kernel's IRETQ to user mode (native_irq_return_iret), now a UD2
    kernel_return_site: int | None  # early_xen_iret_patch, or its last POP, now a jump to the monitor's; None: it traps
    sysret_site: int | None  # the SWAPGS before its SYSRETQ, now a jump towards the monitor's; None if it has none
    ss_load_site: int | None  # __switch_to's load of SS (an AMD CPU's), now a NOP; None if it has none
    cx16_sites: int  # calls of this_cpu_cmpxchg16b_emu made CMPXCHG16B
    ap_entry: int  # secondary_startup_64, where its trampoline enters an AP (0 if it has none): the monitor takes the AP there
    refused_kvm: tuple[str, ...]  # of REFUSED_KVM_FEATURES, the functions made to say no
    flag_sites: FlagSites  # without PARAVIRT_XXL, its PUSHFs and POPFs made to trap (flag_sites.py); none with it
    translation: Translation  # without PARAVIRT_XXL, its CLIs, STIs and PUSHFs that run translated (translator.py)


def paravirtualize(vmlinux: bytes, functions: dict[str, int]) -> Paravirtualized:
    """`vmlinux` made ready to run deprivileged under the monitor: its pv_ops.irq slots,
    pv_ops.cpu.write_msr and load_gs_index and pv_ops.mmu.read_cr2 and write_cr3 holding `functions`
    (by member name), every call site of them kept a call (the native alternatives over the irq and
    mmu ones disarmed), or, in a kernel without PARAVIRT_XXL, its PUSHFs and POPFs made to trap
    (flag_sites.py); its IRETQ to user mode a UD2, its return to itself a jump to
    `functions[KERNEL_RETURN]`, its return from a system call a jump to `functions[SYSCALL_RETURN]`,
    an AMD CPU's SS load in `__switch_to` a NOP, the calls of the CMPXCHG16B emulation the
    instruction, and KVM's PV IPIs and PV TLB flush refused (REFUSED_KVM_FEATURES)."""
    names = [name for group in PV_OPS.values() for name in group]
    names += [form for form in WRITE_MSR_FORMS.values() if form not in names]  # write_msr's other forms
    names += [KERNEL_RETURN, KERNEL_RETURN_POP_RDI, SYSCALL_RETURN, TRANSLATED_INVLPG]
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
    fmt = alt_format(types)
    alternatives = _alternatives(vmlinux, sections, fmt)
    xxl = has_paravirt_xxl(types)
    if xxl:
        sites, cpu_sites, mmu_sites, disarmed = _point_pv_ops(image, vmlinux, sections, symbols, types, fmt, alternatives,
                                                              functions, file_offset)
        flag_sites = FlagSites(0, 0)
    else:
        sites = cpu_sites = mmu_sites = disarmed = 0
        code = _code(sections, symbols, alternatives, file_offset)
        flag_sites = trap_flag_instructions(image, code)
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
    kernel_return_site = _point_kernel_return(image, symbols, iret_site, functions[KERNEL_RETURN],
                                              functions[KERNEL_RETURN_POP_RDI], file_offset)
    sysret_site = _point_syscall_return(image, symbols, alternatives, functions[SYSCALL_RETURN], file_offset)
    ss_load = _switch_ss_load(vmlinux, sections, symbols, types)
    ss_load_site = None
    if ss_load is not None:
        ss_load_site, length = ss_load
        at = file_offset(ss_load_site, length)
        image[at : at + length] = NOPS[length]
    cx16_sites = _apply_cx16(image, vmlinux, alternatives, symbols, file_offset)
    refused_kvm = _refuse_kvm_features(image, symbols, alternatives, file_offset)
    ap_entry = symbols[AP_ENTRY].address if AP_ENTRY in symbols else 0
    translation = Translation(b"", 0, 0, Counter(), {})
    if not xxl:  # last: the translator copies what the patches above made
        found = kernel_sites(vmlinux, sections, symbols, types,
                             [(each.instruction, each.instruction + each.length) for each in alternatives], file_offset)
        if isinstance(found, str):
            translation = Translation(b"", 0, 0, Counter(), {}, refused=found)
        else:
            layout = CacheLayout(CODE_CACHE, CODE_CACHE_SIZE, functions["irq_disable"], functions["irq_enable"],
                                 functions["save_fl"], functions["write_msr"], functions["write_cr3"],
                                 functions[TRANSLATED_INVLPG], functions["read_cr2"], _monitor_calls(symbols, functions))
            translation = translate(image, code, found, layout)
            move_return_sites(image, sections, translation.moved_returns)
    return Paravirtualized(bytes(image), xxl, sites, cpu_sites, mmu_sites, disarmed, iret_site, kernel_return_site,
                           sysret_site, ss_load_site, cx16_sites, ap_entry, refused_kvm, flag_sites, translation)


def _point_pv_ops(image: bytearray, vmlinux: bytes, sections: dict[str, Section], symbols: Symbols, types: BtfTypes,
                  fmt: AltFormat, alternatives: list[Alternative], functions: dict[str, int],
                  file_offset: Callable[[int, int], int]) -> tuple[int, int, int, int]:
    """A PARAVIRT_XXL kernel's pv_ops slots holding `functions`, and its call sites of them kept calls:
    how many irq, cpu and mmu sites, and how many native alternatives over them were disarmed."""
    slots = pv_slots(symbols, types)
    pv_ops = symbols["pv_ops"].address
    write_msr = tuple(types.parameters("pv_cpu_ops", "write_msr"))
    if write_msr not in WRITE_MSR_FORMS:
        raise GuestImageError(f"the kernel's pv_ops.cpu.write_msr takes ({', '.join(write_msr)}), a form the monitor "
                              "does not offer")
    chosen = dict(functions, write_msr=functions[WRITE_MSR_FORMS[write_msr]])
    for name, slot in slots.items():
        struct.pack_into("<Q", image, file_offset(slot, 8), chosen[name])

    if ".parainstructions" in sections:
        ops = _patch_sites(vmlinux, sections, types, slots, pv_ops)
    else:
        ops = _direct_call_sites(vmlinux, alternatives, fmt, slots, file_offset)
    sites = {instruction for instruction, op in ops.items() if op in PV_IRQ_OPS}
    mmu_sites = {instruction for instruction, op in ops.items() if op in PV_MMU_OPS}
    cpu_sites = set(ops) - sites - mmu_sites
    armed = fmt.flag_not | X86_FEATURE_XENPV
    disarmed = 0
    for alternative in alternatives:
        instruction, feature = alternative.instruction, alternative.feature
        if fmt.flag_direct_call and feature & fmt.flag_direct_call:
            continue  # the site's own alternative: its call made direct
        if instruction in cpu_sites:  # nothing would put the native code back over these: keep it so
            raise GuestImageError(f"the kernel has an alternative at the pv_ops.cpu call {instruction:#x}")
        if instruction not in sites and instruction not in mmu_sites:
            continue
        if feature != armed:
            raise GuestImageError(f"the kernel's alternative at the pv_ops.{ops[instruction]} call {instruction:#x} is "
                                  f"for feature {feature:#x}, not the expected ALT_NOT(X86_FEATURE_XENPV)")
        struct.pack_into(fmt.word, image, alternative.entry + fmt.feature, X86_FEATURE_XENPV)
        disarmed += 1
    return len(sites), len(cpu_sites), len(mmu_sites), disarmed


def _monitor_calls(symbols: Symbols, functions: dict[str, int]) -> dict[int, int]:
    """The kernel's functions whose direct calls the translator makes the monitor's: asm_load_gs_index
    (entry_64.S: SWAPGS, a MOV to GS with an exception-table entry, SWAPGS; called at a context switch
    where the CPU has no FSGSBASE, as under the monitor), three traps and a trip into ring 0 that the
    monitor's load_gs_index, pv_ops.cpu.load_gs_index's in a paravirtual kernel, does in one trip."""
    gs = symbols.get("asm_load_gs_index")
    return {gs.address: functions["load_gs_index"]} if gs is not None else {}


def _code(sections: dict[str, Section], symbols: Symbols, alternatives: list[Alternative],
          file_offset: Callable[[int, int], int]) -> list[CodeRange]:
    """The kernel's code, as ranges that each begin at an instruction: from each text symbol to the
    next (or its section's end), and each alternative's replacement."""
    ranges = []
    starts = symbols.code_addresses()
    ends = [*starts[1:], 0]
    for start, end in zip(starts, ends):
        section = next((s for s in sections.values() if s.address and s.address <= start < s.address + s.size), None)
        if section is None:
            continue  # a symbol of the image's layout (its end, say), not of code it holds
        end = min(end, section.address + section.size) if end > start else section.address + section.size
        ranges.append(CodeRange(start, section.offset + start - section.address, end - start))
    for alternative in alternatives:
        if alternative.replacement_length:
            length = alternative.replacement_length
            ranges.append(CodeRange(alternative.replacement, file_offset(alternative.replacement, length), length))
    return ranges


def _point_kernel_return(image: bytearray, symbols: Symbols, iret_site: int, target: int, target_pop_rdi: int,
                         file_offset: Callable[[int, int], int]) -> int | None:
    """The kernel's return to itself (entry_64.S, restore_regs_and_return_to_kernel) ends in a jump
    at early_xen_iret_patch to its IRETQ, which Xen PV's start-up rewrites into a jump to xen_iret
    (arch/x86/xen/enlighten_pv.c, xen_start_kernel; Linux 5.18 on, with CONFIG_XEN_PV): here it is
    rewritten into a jump to `target`, where the monitor does that IRETQ natively (monitor.S
    pv_iret). A kernel built without CONFIG_XEN_PV has no such jump: there POP_REGS's last POP and
    the skip of orig_ax after it (five bytes, which nothing jumps into: the return to user mode
    enters at or after the IRETQ's ESPFIX test) become a jump to `target_pop_rdi`, which does them
    first. The site's address, or None for a kernel whose return has neither shape: its returns to
    itself trap at the IRETQ, as its returns to user mode do."""
    if "early_xen_iret_patch" not in symbols:
        return _point_pop_regs_return(image, symbols, iret_site, target_pop_rdi, file_offset)
    site = symbols["early_xen_iret_patch"].address
    at = file_offset(site, 5)
    jumps_to = site + 5 + struct.unpack_from("<i", image, at + 1)[0]
    if image[at] != JMP_REL32 or not site + 5 <= jumps_to <= iret_site:
        raise GuestImageError(f"the kernel's early_xen_iret_patch at {site:#x} is not a jump to its IRETQ")
    _write_jump(image, at, site, target, "return to the kernel")
    return site


def _point_pop_regs_return(image: bytearray, symbols: Symbols, iret_site: int, target: int,
                           file_offset: Callable[[int, int], int]) -> int | None:
    """restore_regs_and_return_to_kernel built without CONFIG_XEN_PV and CONFIG_DEBUG_ENTRY (whose
    check of the frame would come first): POP_REGS from its label, ADD $8, %RSP, then the IRETQ, or
    before it CONFIG_X86_ESPFIX64's test of the frame's SS for an LDT selector and its JNZ. Its
    POP %RDI and ADD made a jump to `target`; the site's address, or None where the code is not that."""
    if "restore_regs_and_return_to_kernel" not in symbols:
        return None
    start = symbols["restore_regs_and_return_to_kernel"].address
    length = iret_site - start
    if not 0 < length <= len(POP_REGS) + len(SKIP_ORIG_AX) + len(ESPFIX_TEST) + 6:
        return None
    at = file_offset(start, length)
    code = bytes(image[at : at + length])
    jnz = code[len(POP_REGS) + len(SKIP_ORIG_AX) + len(ESPFIX_TEST):]
    if code != POP_REGS + SKIP_ORIG_AX and not (
            code.startswith(POP_REGS + SKIP_ORIG_AX + ESPFIX_TEST)
            and (len(jnz) == 2 and jnz[0] == JNZ_REL8 or len(jnz) == 6 and jnz[:2] == JNZ_REL32)):
        return None
    site = start + len(POP_REGS) - 1  # its POP %RDI
    _write_jump(image, at + len(POP_REGS) - 1, site, target, "return to the kernel")
    return site


def _write_jump(image: bytearray, at: int, address: int, target: int, what: str) -> None:
    """A JMP rel32 at file offset `at` (`address` as linked) to the monitor's function `target`."""
    displacement = target - (address + 5)
    if not -(1 << 31) <= displacement < 1 << 31:
        raise GuestImageError(f"the monitor's {what} at {target:#x} is beyond a jump from {address:#x}")
    image[at] = JMP_REL32
    struct.pack_into("<i", image, at + 1, displacement)


def _point_syscall_return(image: bytearray, symbols: Symbols, alternatives: list[Alternative], target: int,
                          file_offset: Callable[[int, int], int]) -> int | None:
    """The kernel's return from a system call (entry_64.S, from entry_SYSRETQ_unsafe_stack: SWAPGS,
    CLEAR_CPU_BUFFERS, SYSRETQ; at entry_SYSRETQ_end an INT3, then the padding to the next function)
    begins with a SWAPGS, which traps deprivileged, and the monitor does that and the SYSRETQ. Here
    the SWAPGS becomes a short jump to the INT3 and the padding after the SYSRETQ, which no code
    reaches, and they a jump to `target`, where the monitor does both without that trap (monitor.S
    sysret_gate). CLEAR_CPU_BUFFERS between (an alternative: the kernel decides at boot whether it is
    a VERW) stays as the kernel makes it, and the monitor reads it there, as at the trap. The
    SWAPGS's address, or None for a kernel without those symbols, whose SWAPGS still traps."""
    if "entry_SYSRETQ_unsafe_stack" not in symbols or "entry_SYSRETQ_end" not in symbols:
        return None
    site, end = symbols["entry_SYSRETQ_unsafe_stack"].address, symbols["entry_SYSRETQ_end"].address
    following = symbols.next_above(end)  # the end of the code there
    at, at_end = file_offset(site, len(SWAPGS)), file_offset(end - len(SYSRETQ), following - end + len(SYSRETQ))
    padding = bytes(image[at_end + len(SYSRETQ) : at_end + len(SYSRETQ) + following - end])
    if (image[at : at + len(SWAPGS)] != SWAPGS or image[at_end : at_end + len(SYSRETQ)] != SYSRETQ
            or not 0 < end - (site + 2) < 128 or len(padding) < 5 or padding[0] != INT3
            or padding[1:] not in (NOPS.get(len(padding) - 1), bytes([INT3]) * (len(padding) - 1))):
        raise GuestImageError(f"the kernel's entry_SYSRETQ_unsafe_stack at {site:#x} is not a SWAPGS, then a SYSRETQ "
                              "followed by an INT3 and padding")
    for alternative in alternatives:
        patched = alternative.instruction, alternative.instruction + alternative.length
        if any(start < patched[1] and patched[0] < stop for start, stop in ((site, site + len(SWAPGS)), (end, end + 5))):
            raise GuestImageError(f"the kernel has an alternative at {alternative.instruction:#x}, over its return from "
                                  "a system call")
    _write_jump(image, at_end + len(SYSRETQ), end, target, "return from a system call")
    image[at : at + len(SWAPGS)] = bytes([JMP_REL8, end - (site + 2), INT3])
    return site


def _apply_cx16(image: bytearray, vmlinux: bytes, alternatives: list[Alternative], symbols: Symbols,
                file_offset: Callable[[int, int], int]) -> int:
    """Puts CMPXCHG16B over each call of `this_cpu_cmpxchg16b_emu`, as the kernel's alternatives do
    later on a CPU with CX16 (every x86-64 CPU the monitor runs on has it, and the kernel's CPUID,
    which runs natively there, shows it); the number of sites. Until then the kernel calls the
    emulation, which is PUSHF, CLI, the exchange and POPF: deprivileged, the POPF cannot restore
    the interrupt flag that the CLI (which traps) cleared, so the kernel's interrupts stayed off for
    good. Linux 6.12's SLUB makes such calls between enabling its interrupts and applying its
    alternatives, and stopped at `BUG_ON(irqs_disabled())` in cpa_flush."""
    emulation = symbols.get("this_cpu_cmpxchg16b_emu")
    if emulation is None:
        return 0
    applied = 0
    for alternative in alternatives:
        if alternative.feature != X86_FEATURE_CX16:
            continue  # another feature, or one with flags (not, or a direct call)
        instruction, length = alternative.instruction, alternative.length
        replacement, replacement_length = alternative.replacement, alternative.replacement_length
        at_instruction = file_offset(instruction, length)
        original = vmlinux[at_instruction : at_instruction + length]
        if not any(original[k] == CALL_REL32 and
                   instruction + k + 5 + struct.unpack_from("<i", original, k + 1)[0] == emulation.address
                   for k in range(length - 4)):
            continue
        at_replacement = file_offset(replacement, replacement_length)
        code = vmlinux[at_replacement : at_replacement + replacement_length]
        if replacement_length > length or not code.startswith((CMPXCHG16B_GS, CMPXCHG16B_GS_HIGH)):
            raise GuestImageError(f"the kernel's CX16 alternative at {instruction:#x} is not the CMPXCHG16B expected")
        image[at_instruction : at_instruction + length] = code + NOP * (length - replacement_length)
        applied += 1
    return applied


def _refuse_kvm_features(image: bytearray, symbols: Symbols, alternatives: list[Alternative],
                         file_offset: Callable[[int, int], int]) -> tuple[str, ...]:
    """Each of REFUSED_KVM_FEATURES (arch/x86/kernel/kvm.c) made to return false at once: its first
    instruction after ftrace's site (an ENDBR64, if the kernel has them, then a 5-byte call of
    __fentry__ or a NOP, which ftrace checks at boot) becomes `xor %eax, %eax; ret`, where no
    alternative will write at boot. Returns the names of those it found."""
    refused = []
    for name in REFUSED_KVM_FEATURES:
        function = symbols.get(name)
        if function is None:  # a kernel without KVM's guest support, or of another layout: nothing asks
            continue
        at = file_offset(function.address, 16)
        skip = len(ENDBR64) if image[at : at + len(ENDBR64)] == ENDBR64 else 0
        if image[at + skip] == CALL_REL32 or image[at + skip : at + skip + 5] == NOPS[5]:
            skip += 5
        start = function.address + skip
        if any(alternative.instruction < start + len(RETURN_FALSE) and start < alternative.instruction + alternative.length
               for alternative in alternatives):
            raise GuestImageError(f"the kernel's {name} at {function.address:#x} begins with an alternative")
        image[at + skip : at + skip + len(RETURN_FALSE)] = RETURN_FALSE
        refused.append(name)
    return tuple(refused)


def _switch_ss_load(vmlinux: bytes, sections: dict[str, Section], symbols: Symbols,
                    types: BtfTypes) -> tuple[int, int] | None:
    """Where `__switch_to` loads SS, and that instruction's length, if it does. On an AMD CPU
    (X86_BUG_SYSRET_SS_ATTRS, Linux 4.3 on, arch/x86/kernel/process_64.c) it loads __KERNEL_DS at
    every context switch to a task whose SS reads otherwise, since an interrupt may have left a null
    SS that SYSRET would not mend. Deprivileged, SS always reads otherwise (the monitor's selectors
    have RPL 3), so the load always comes, and a ring-0 selector is one ring 3 may not load: a #GP,
    an event that ends with the monitor's copy of SS set, which the CPU never sees (the monitor's
    SYSRETQ loads the user mode's SS whole). Its `loadsegment` is a MOV to SS with an
    exception-table entry, so the table names the instruction: the one MOV to SS among
    `__switch_to`'s entries."""
    switch = symbols.get("__switch_to")
    if switch is None or "__ex_table" not in sections:
        return None
    end = symbols.next_above(switch.address)
    size, members = types.struct("exception_table_entry")
    (insn,) = struct_fields(size, members, "exception_table_entry", insn=4)
    table, text = sections["__ex_table"], sections[".text"]
    loads = []
    for instruction in relative_addresses(vmlinux, table, table_entries(sections, "__ex_table", size), insn):
        if not (switch.address <= instruction < end and text.address <= instruction <= text.address + text.size - 3):
            continue
        offset = text.offset + instruction - text.address
        prefix = int(vmlinux[offset] == REX_B)
        opcode, modrm = vmlinux[offset + prefix], vmlinux[offset + prefix + 1]
        if opcode == MOV_TO_SS[0] and modrm >> 6 == 3 and (modrm >> 3) & 7 == MOV_TO_SS[1]:  # from a register
            loads.append((instruction, prefix + 2))
    if len(loads) > 1:
        raise GuestImageError(f"the kernel's __switch_to loads SS at {len(loads)} places; one was expected")
    return loads[0] if loads else None


def _patch_sites(vmlinux: bytes, sections: dict[str, Section], types: BtfTypes, slots: dict[str, int],
                 pv_ops: int) -> dict[int, str]:
    """The call sites of the slots the VMM sets, and each one's member, as `.parainstructions` lists
    them (Linux up to 6.7)."""
    types_of = {(slot - pv_ops) // 8: name for name, slot in slots.items()}
    ops = {}
    site_size, site = types.struct("paravirt_patch_site")
    site_instr, site_type = struct_fields(site_size, site, "paravirt_patch_site", instr=8, type=1)
    for at in table_entries(sections, ".parainstructions", site_size):
        op = types_of.get(vmlinux[at + site_type])
        if op is not None:
            ops[struct.unpack_from("<Q", vmlinux, at + site_instr)[0]] = op
    return ops


def _direct_call_sites(vmlinux: bytes, alternatives: list[Alternative], fmt: AltFormat, slots: dict[str, int],
                       file_offset: Callable[[int, int], int]) -> dict[int, str]:
    """The call sites of the slots the VMM sets, and each one's member, among the alternatives that
    make a call direct (Linux 6.8 on): each a CALL through RIP-relative memory, that memory the slot."""
    if not fmt.flag_direct_call:
        raise GuestImageError("the kernel has neither .parainstructions nor direct-call alternatives "
                              "(is it built with CONFIG_PARAVIRT?)")
    op_of = {slot: name for name, slot in slots.items()}
    ops = {}
    for alternative in alternatives:
        if not alternative.feature & fmt.flag_direct_call:
            continue
        instruction = alternative.instruction
        code = file_offset(instruction, 6)
        if vmlinux[code : code + 2] != CALL_RIP_RELATIVE:
            raise GuestImageError(f"the kernel's direct-call alternative at {instruction:#x} is not a CALL "
                                  "through memory")
        op = op_of.get(instruction + 6 + struct.unpack_from("<i", vmlinux, code + 2)[0])
        if op is not None:
            ops[instruction] = op
    return ops
