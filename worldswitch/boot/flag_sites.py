"""The PUSHF and POPF instructions of a Linux built without CONFIG_PARAVIRT_XXL, made to trap, for
the in-guest monitor (docs/monitor.md, "A kernel without PARAVIRT_XXL"): the first step of the
seed's binary translation, a patch of each sensitive instruction that does not trap by itself.

Deprivileged, the kernel's code runs in ring 3, where CLI, STI, HLT, MOVs to and from control
registers, RDMSR and WRMSR, IRETQ to itself, LGDT and the rest fault, and the monitor emulates each.
PUSHF and POPF do not fault: in ring 3 PUSHF shows the real IF, always set, and POPF leaves it as it
is. A paravirtual kernel reads and sets its IF through pv_ops.irq, which the VMM points at the
monitor (paravirt.py). Another kernel inlines `pushf; pop` wherever it saves its flags
(arch_local_save_flags, so every local_irq_save and spin_lock_irqsave), and has POPF where it restores
them whole (the CMPXCHG16B emulation, verify_cpu, SMAP's flags, ftrace's and kretprobes' trampolines):
with the real IF always showing, every local_irq_restore would turn interrupts on.

So each PUSHF (0x9C) becomes PUSHF_TRAP and each POPF (0x9D) POPF_TRAP, one byte for one byte: PUSH
ES and POP ES, which are invalid in 64-bit mode, so they raise #UD and no compiler emits them; the
monitor then does the instruction on the guest's virtual IF (monitor.c, emulate_flags). The sites
are found by decoding the kernel's code with Capstone (a maintained x86 disassembler: finding an
instruction needs its boundaries, which only decoding gives) from each text symbol kallsyms names,
so a misdecoded byte cannot run past the next function; and in each alternative's replacement code,
which the kernel copies over its text at boot.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from ..errors import GuestImageError
from .decoding import POPF_TRAP, PUSHF_TRAP, decode, new_decoder

PUSHF, POPF = 0x9C, 0x9D
_TRAPS = {PUSHF: PUSHF_TRAP, POPF: POPF_TRAP}


class CodeRange(NamedTuple):
    """Instructions from `address` (as linked) for `length` bytes, at file offset `offset`."""
    address: int
    offset: int
    length: int


class FlagSites(NamedTuple):
    pushf: int  # PUSHFs made PUSHF_TRAP
    popf: int  # POPFs made POPF_TRAP


def trap_flag_instructions(image: bytearray, code: Iterable[CodeRange]) -> FlagSites:
    """Every PUSHF and POPF that decoding `code` (ranges of `image`, each beginning at an instruction)
    finds, made to trap. A range is decoded until its end or its first byte that is no instruction.
    Raises GuestImageError for a PUSHF or POPF with a prefix (a 16-bit one), which has no one-byte trap."""
    decoder = new_decoder()
    counts = {PUSHF: 0, POPF: 0}
    for start, offset, length in code:
        chunk = bytes(image[offset : offset + length])
        if PUSHF not in chunk and POPF not in chunk:
            continue  # most functions: nothing to decode for
        for address, size, mnemonic, _operands in decode(decoder, chunk, start)[0]:
            if mnemonic not in ("pushfq", "popfq", "pushf", "popf"):
                continue
            at = offset + address - start
            if image[at] in _TRAPS.values():
                continue  # a site made to trap already (code that two ranges share)
            if size != 1 or image[at] not in _TRAPS:
                raise GuestImageError(f"the kernel's {mnemonic} at {address:#x} has a prefix: it has no one-byte trap")
            counts[image[at]] += 1
            image[at] = _TRAPS[image[at]]
    return FlagSites(counts[PUSHF], counts[POPF])
