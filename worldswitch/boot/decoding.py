"""A kernel's code decoded with Capstone (a maintained x86 disassembler), for the sites the VMM
patches before the kernel runs under the monitor (flag_sites.py, translator.py): instruction
boundaries, which only decoding gives.

Two kinds of bytes Capstone does not take for instructions are decoded past here: PUSHF_TRAP and
POPF_TRAP, which stand for the PUSHF and POPF the VMM made them (flag_sites.py), and the instructions
in UNDECODED, which Capstone 5.0 does not know (Linux's sync_core has SERIALIZE, and a PUSHF after it
in its IRETQ to itself). Any other byte ends the decoding: past it lies no code to be sure of.
"""

from __future__ import annotations

from typing import Any

PUSHF_TRAP, POPF_TRAP = 0x06, 0x07  # monitor.h: PUSH ES and POP ES, #UD in 64-bit mode
UNDECODED = {b"\x0f\x01\xe8": "serialize"}
Decoded = tuple[int, int, str, str]  # as disasm_lite gives each: address, size, mnemonic, operands


def new_decoder(detail: bool = False) -> Any:
    """A 64-bit decoder; with `detail`, one that gives an instruction's parts (where its displacement is)."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs  # 80 ms to import: only for a kernel that needs it

    decoder = Cs(CS_ARCH_X86, CS_MODE_64)
    decoder.detail = detail
    return decoder


def decode(decoder: Any, code: bytes, address: int) -> tuple[list[Decoded], bool]:
    """The instructions of `code`, which begins at an instruction at `address`, and whether they run
    to its end. A PUSHF_TRAP is decoded as the PUSHF it stands for ("pushfq"), a POPF_TRAP as "popfq"."""
    listing: list[Decoded] = []
    done = 0
    while done < len(code):
        listing += decoder.disasm_lite(code[done:], address + done)
        if listing:
            done = max(done, listing[-1][0] + listing[-1][1] - address)
        if done >= len(code):
            break
        if code[done] in (PUSHF_TRAP, POPF_TRAP):
            listing.append((address + done, 1, "pushfq" if code[done] == PUSHF_TRAP else "popfq", ""))
            done += 1
            continue
        known = next((encoding for encoding in UNDECODED if code.startswith(encoding, done)), None)
        if known is None:
            return listing, False
        listing.append((address + done, len(known), UNDECODED[known], ""))
        done += len(known)
    return listing, True
