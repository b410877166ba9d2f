"""The seed's binary translator, for a Linux without CONFIG_PARAVIRT_XXL under the in-guest monitor
(docs/monitor.md, "Translated CLIs, STIs, PUSHFs, CR3 loads, WRMSRs and INVLPGs"): its sensitive
instructions stop trapping.

Deprivileged, such a kernel's CLI, STI, MOV to CR3, MOV from CR2, WRMSR and INVLPG fault, and its
PUSHFs are made to (flag_sites.py): each is a trip through the host's exception path into the
monitor, 370,000 of them in a boot. A paravirtual kernel calls the monitor's functions instead
(pv_ops), which run in its ring 3; this kernel's sites are translated to do the same. A *window* of
whole instructions around each site (at least the 5 bytes of a JMP rel32) is copied into the code
cache, the pages after the pv page, with each sensitive instruction in it replaced by a call of the
monitor's function for it (irq_disable, irq_enable, save_fl, write_cr3, read_cr2, write_msr,
invlpg) that keeps every register and flag as the instruction would; the window's first bytes become a jump there, the rest INT3s, and the
copy jumps back after it. A copied branch or CALL reaches the same target with a rel32 (a CALL's
callee returns into the cache, and the copy goes on from there), a RIP-relative operand the same
memory.

A window is only safe where nothing else reaches into it or rewrites it, so it is refused where:
- an instruction after its first is the target of a direct branch anywhere in the kernel's code
  (found from the bytes for every rel32 and for the rel8s nearby, decoded in its function), of a
  jump label or of an exception fixup: only its first instruction may be entered;
- its function jumps indirectly (a jump table names targets no decoder sees);
- it overlaps code the kernel rewrites later (alternatives, paravirt sites, retpolines, static
  calls, jump labels, ftrace's calls, ENDBR seals) or finds by its address (an instruction with an
  exception-table entry; the entry text, which also runs on stacks a copy may not push to; the
  head, which also runs at its physical address);
- it holds an instruction that traps or means something else elsewhere (anything privileged, a
  prefixed branch), or an STI followed by HLT or MWAIT, whose interrupt shadow keeps a wake-up from
  being lost between the two.
Three kinds of such sites may be covered: a LOCK prefix (the kernel swaps it with a DS prefix, and
only where the byte is one of the two, which the window's bytes are made not to be), a JMP to the
return thunk (the copy is the one the kernel rewrites: kernel_sites.py points its .return_sites
entry there, and the monitor lets the kernel write the cache), and a WRMSR whose exception-table
entry only warns (the kernel's unchecked wrmsr(), which pv_ops sends to the same write_msr). Sites
refused stay trapping; the monitor still emulates them. A stack trace through a copy shows an
address outside the kernel.
"""

from __future__ import annotations

import re
import struct
from bisect import bisect_left, bisect_right
from collections import Counter
from typing import Any, Iterable, NamedTuple

from .decoding import PUSHF_TRAP, Decoded, decode, new_decoder
from .flag_sites import CodeRange
from .kernel_symbols import ADDRESS_MASK

JMP_REL32, CALL_REL32, INT3 = 0xE9, 0xE8, 0xCC
LOCK, DS = 0xF0, 0x3E  # the prefixes the kernel swaps at .smp_locks
WINDOW_MIN = 5  # a JMP rel32
PUSH_RAX, POP_RAX, PUSHFQ, POPFQ = b"\x50", b"\x58", b"\x9c", b"\x9d"
RFLAGS_KEPT_BY_PUSHF = 0x40DD7  # monitor.h RFLAGS_STATUS | RFLAGS_FIXED: what emulate_flags pushes beside the virtual IF
AND_16_RSP_IMM32 = b"\x48\x81\x64\x24\x10"  # andq $imm32, 16(%rsp)
OR_RAX_TO_16_RSP = b"\x48\x09\x44\x24\x10"  # orq %rax, 16(%rsp)
# CLI, STI, PUSHF (and its trap), MOV to and from CR, INVLPG: a function without one of these is not
# decoded (a WRMSR's function is, by its exception-table entry)
SENSITIVE_BYTES = (b"\xfa", b"\xfb", b"\x9c", bytes([PUSHF_TRAP]), b"\x0f\x22", b"\x0f\x20", b"\x0f\x01")
# The caller-saved registers, which the C-ABI functions (write_msr, write_cr3, invlpg) may change:
# pushed before the call and popped after it, with the flags, so that the copy changes none
SAVE_CALLER_SAVED = bytes.fromhex("9c 50 51 52 56 57 41 50 41 51 41 52 41 53")  # pushfq, RAX ... R11
RESTORE_CALLER_SAVED = bytes.fromhex("41 5b 41 5a 41 59 41 58 5f 5e 5a 59 58 9d")
MSR_ARGUMENTS = bytes.fromhex("89 cf 89 c6")  # mov %ecx, %edi; mov %eax, %esi (the high half is EDX already)
REGISTERS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{n}" for n in range(8, 16)))
SHORT_REACH = 130  # a rel8 jump's reach, with its own two bytes
_RIP_DISPLACEMENT = re.compile(r"\[rip(?: ([+-]) (0x[0-9a-f]+))?\]")
_REL8_OPCODE = [0x70 <= byte <= 0x7F or byte == 0xEB or 0xE0 <= byte <= 0xE3 for byte in range(256)]  # Jcc, JMP, LOOP, JRCXZ
_REL32 = re.compile(rb"[\xe8\xe9]|\x0f[\x80-\x8f]", re.S)  # CALL, JMP, Jcc: the opcode before a rel32
# What a window may copy besides them: instructions that mean the same anywhere and never trap in ring 3
MOVABLE = frozenset((
    "mov", "movabs", "movzx", "movsx", "movsxd", "lea", "push", "pop", "xor", "and", "or", "add", "sub", "adc", "sbb",
    "cmp", "test", "inc", "dec", "neg", "not", "shl", "shr", "sar", "sal", "rol", "ror", "bt", "bts", "btr", "btc",
    "xchg", "cmpxchg", "xadd", "nop", "imul", "bswap", "cdqe", "cdq", "cqo", "cwde",
))
MOVABLE_FAMILIES = ("set", "cmov")  # setcc, cmovcc
# An STI's interrupt shadow covers the next instruction: these rely on it
NEEDS_SHADOW = frozenset(("hlt", "mwait", "mwaitx", "sysexit", "sysret", "sysretq", "swapgs", "iretq", "iret"))
CONDITIONS = frozenset(("jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns", "jp", "jnp", "jl", "jge", "jle",
                        "jg"))  # Capstone's names of the 16 Jcc
BRANCHES = re.compile(r"^(j\w+|call|loop\w*|xbegin)$")
_SEGMENT_OPERAND = re.compile(r"(^|, )(cs|ds|es|fs|gs|ss)(, |$)")
_SYSTEM_REGISTER = re.compile(r"\b(cr|dr)\d+\b")


class CacheLayout(NamedTuple):
    """Where the translations go (the pages after the pv page, in the kernel's address space) and
    the pv page's functions they call."""
    base: int
    size: int
    irq_disable: int
    irq_enable: int
    save_fl: int
    write_msr: int  # write_msr(u32 msr, u32 low, u32 high)
    write_cr3: int
    invlpg: int  # invlpg(u64 address)
    read_cr2: int  # the guest's CR2 in RAX, nothing else changed
    calls: dict[int, int]  # kernel functions -> the monitor's for the same: their direct calls are made its


class KernelSites(NamedTuple):
    """What of the kernel's code no window may cover, and the places it enters that no direct
    branch names."""
    kept: list[tuple[int, int]]  # [start, end): rewritten by the kernel, or found by their address
    targets: set[int]  # jump labels' targets, exception fixups
    faulting: set[int]  # instructions with an exception-table entry: kept, but for a WRMSR whose entry only warns
    locks: set[int]  # LOCK prefixes the kernel rewrites where the byte is a LOCK or a DS prefix
    returns: set[int]  # JMPs to the return thunk, each moved with its .return_sites entry (kernel_sites.py)


class Translation(NamedTuple):
    cache: bytes  # the code cache's contents (CacheLayout.size at most); empty if nothing was translated
    sites: int  # sensitive instructions that now run translated
    windows: int
    left: Counter[str]  # sites left to trap, by the reason
    moved_returns: dict[int, int]  # a return thunk JMP's address -> its copy's in the cache
    calls: int = 0  # direct calls made the monitor's functions' (CacheLayout.calls)
    refused: str = ""  # why nothing was translated, if so


class Instruction(NamedTuple):
    """As Capstone's disasm_lite gives it."""
    address: int
    size: int
    mnemonic: str
    operands: str


class _Function(NamedTuple):
    instructions: list[Decoded]  # each an Instruction's fields (a tuple costs less to make)
    delta: int  # an instruction's offset in the image, less its address
    whole: bool  # decoded to its end, and with no indirect jump


def translate(image: bytearray, code: Iterable[CodeRange], sites: KernelSites, cache: CacheLayout) -> Translation:
    """Translate the sensitive instructions of `code` (the kernel's functions, each a range that
    begins at an instruction) in `image`, which has every other patch made already (PUSHFs made
    PUSHF_TRAP). Writes the jumps into `image` and returns the cache to put at `cache.base`."""
    decoder, detailed = new_decoder(), new_decoder(detail=True)
    ranges = sorted(code)
    far, calling = _rel32_targets(image, ranges, cache.calls)
    far |= sites.targets
    kept = _Ranges(sites.kept)
    faulting = sorted(sites.faulting)
    decoded: dict[int, _Function] = {}

    def function(n: int) -> _Function:
        if n not in decoded:
            decoded[n] = _decode(decoder, image, ranges[n])
        return decoded[n]

    out = bytearray()
    translated = windows = 0
    left: Counter[str] = Counter()
    moved: dict[int, int] = {}
    calls = 0
    for n, each in enumerate(ranges):
        chunk = image[each.offset : each.offset + each.length]
        wrmsr = bisect_left(faulting, each.address)
        if not any(pattern in chunk for pattern in SENSITIVE_BYTES) and not (
                wrmsr < len(faulting) and faulting[wrmsr] < each.address + each.length) and n not in calling:
            continue  # most functions: nothing to decode for
        listing, delta, whole = function(n)
        calls += _redirect_calls(image, listing, delta, cache.calls, kept)
        near: set[int] | None = None  # the targets of short branches, here and in the functions around
        taken_to = 0  # the end of the last window in this function
        for k, instruction in enumerate(listing):
            if _sensitive(instruction) is None or instruction[0] < taken_to:
                continue
            if not whole:
                left["its function jumps indirectly or did not decode"] += 1
                continue
            if near is None:
                near = _near_targets(image, ranges, n, function(n))
            window, reason = _window(listing, k, taken_to, _Either(far, near), kept, sites.faulting)
            if window is None:
                left[reason] += 1
                continue
            stub = _stub(image, window, delta, cache, cache.base + len(out), detailed)
            if stub is None:
                left["a displacement beyond 32 bits, or a form not copied"] += 1
                continue
            body, copies = stub
            if len(out) + len(body) > cache.size:
                left["the code cache is full"] += 1
                continue
            start, end = window[0].address, window[-1].address + window[-1].size
            jump = bytes([JMP_REL32]) + struct.pack("<i", cache.base + len(out) - (start + 5))
            written = jump + bytes([INT3]) * (end - start - len(jump))
            if any(written[lock - start] in (LOCK, DS) for lock in sites.locks.intersection(range(start, end))):
                left["a LOCK prefix's byte the kernel would rewrite"] += 1
                continue
            image[start + delta : end + delta] = written
            moved.update((site, cache.base + len(out) + at) for site, at in copies.items() if site in sites.returns)
            out += body
            taken_to = end
            windows += 1
            translated += sum(_sensitive(copied) is not None for copied in window)
    return Translation(bytes(out), translated, windows, left, moved, calls=calls)


def _redirect_calls(image: bytearray, listing: list[Decoded], delta: int, calls: dict[int, int], kept: "_Ranges") -> int:
    """Each direct CALL in `listing` of a key of `calls` made a CALL of its value, in `image` and in
    `listing` (a window that copies it then calls the same); how many. Before the windows are made."""
    redirected = 0
    for k, (address, size, mnemonic, operands) in enumerate(listing):
        if mnemonic != "call" or not operands.startswith("0x") or int(operands, 16) not in calls:
            continue
        target = calls[int(operands, 16)]
        displacement = target - (address + size)
        if size != 5 or image[address + delta] != CALL_REL32 or not _fits(displacement) or kept.meets(address, address + 5):
            continue
        struct.pack_into("<i", image, address + delta + 1, displacement)
        listing[k] = (address, size, mnemonic, f"{target:#x}")
        redirected += 1
    return redirected


class _Either:
    """Two sets asked as one, without the copy of a union."""

    def __init__(self, first: set[int], second: set[int]) -> None:
        self.first, self.second = first, second

    def __contains__(self, address: object) -> bool:
        return address in self.first or address in self.second


def _rel32_targets(image: bytearray, ranges: list[CodeRange], watched: Iterable[int]) -> tuple[set[int], set[int]]:
    """Where every CALL, JMP and Jcc with a 32-bit displacement in `ranges` goes, found from the
    bytes, not decoded: each E8, E9 and 0F 8x byte is taken for such an instruction, so the set
    holds every real target and a few more (a window refused that could have been made, never the
    reverse). Decoding the kernel's 1.5 million instructions for the same would take seconds. And
    the ranges (by index) that may branch to an address of `watched`."""
    targets: set[int] = set()
    reaching, watched = set(), set(watched)
    for n, (start, offset, length) in enumerate(ranges):
        chunk = bytes(image[offset : offset + length])
        for found in _REL32.finditer(chunk):
            at = found.end()
            if at + 4 <= length:
                target = (start + at + 4 + struct.unpack_from("<i", chunk, at)[0]) & ADDRESS_MASK
                targets.add(target)
                if target in watched:
                    reaching.add(n)
    return targets, reaching


def _near_targets(image: bytearray, ranges: list[CodeRange], n: int, function: _Function) -> set[int]:
    """The targets of every direct branch in function `n`, decoded, and of every rel8 branch that
    could be in the bytes within a short jump of it, found from the bytes as _rel32_targets does
    (each 70-7F, EB and E0-E3 byte taken for one): a rel8 displacement reaches 128 bytes."""
    targets = set()
    for _, _, mnemonic, operands in function.instructions:
        if operands.startswith("0x") and BRANCHES.match(mnemonic.split()[-1]):
            targets.add(int(operands, 16))
    here = ranges[n]
    for start, end in ((here.address - SHORT_REACH, here.address), (here.address + here.length,
                                                                    here.address + here.length + SHORT_REACH)):
        for other in ranges[max(n - 8, 0) : n + 9]:  # the functions around, in address order
            low, high = max(start, other.address), min(end, other.address + other.length)
            for address in range(low, high - 1):
                if _REL8_OPCODE[image[other.offset + address - other.address]]:
                    displacement = image[other.offset + address - other.address + 1]
                    targets.add(address + 2 + (displacement - 256 if displacement > 127 else displacement))
    return targets


def _decode(decoder: Any, image: bytearray, code: CodeRange) -> _Function:
    start, offset, length = code
    listing, whole = decode(decoder, bytes(image[offset : offset + length]), start)
    # an indirect jump: a jump table's targets are known to no decoder
    whole = whole and not any(mnemonic.endswith("jmp") and not operands.startswith("0x")
                              for _, _, mnemonic, operands in listing)
    return _Function(listing, offset - start, whole)


class _Ranges:
    """Sorted [start, end) ranges, asked whether they meet another."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for start, end in sorted(ranges):
            if self.ends and start <= self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], end)
            else:
                self.starts.append(start)
                self.ends.append(end)

    def meets(self, start: int, end: int) -> bool:
        k = bisect_right(self.starts, end - 1) - 1
        return k >= 0 and self.ends[k] > start


def _sensitive(instruction: Decoded) -> str | None:
    """What a copy does instead of the instruction: "cli", "sti", "pushfq", "wrmsr", "cr3" (a MOV to
    CR3), "cr2" (a MOV from CR2), or None for an instruction copied as it is (or not at all)."""
    mnemonic, operands = instruction[2], instruction[3]
    if mnemonic in ("cli", "sti", "pushfq", "wrmsr"):
        return mnemonic
    if mnemonic == "invlpg" and "rip" not in operands and "rsp" not in operands:  # its operand read from here
        return mnemonic
    if mnemonic == "mov" and operands.startswith("cr3, ") and operands[5:] in REGISTERS:
        return "cr3"
    if mnemonic == "mov" and operands.endswith(", cr2") and operands[:-5] in REGISTERS and operands[:-5] != "rsp":
        return "cr2"
    return None


def _movable(instruction: Instruction) -> bool:
    """Copied as it is, or with its displacement made to reach the same place from the cache: a
    plain instruction (RIP-relative operands included), or a direct JMP or Jcc without prefixes."""
    words = instruction.mnemonic.split()
    name = words[-1]
    if _relocatable_branch(instruction):
        return True
    if words[:-1] not in ([], ["lock"]):
        return False  # rep and the rest: not met at these sites, not copied
    if name not in MOVABLE and not name.startswith(MOVABLE_FAMILIES):
        return False
    operands = instruction.operands
    return not _SEGMENT_OPERAND.search(operands) and not _SYSTEM_REGISTER.search(operands)


def _relocatable_branch(instruction: Instruction) -> bool:
    name = instruction.mnemonic
    return (name in ("jmp", "call") or name in CONDITIONS) and instruction.operands.startswith("0x")


def _window(listing: list[Decoded], k: int, taken_to: int, targets: _Either, kept: _Ranges,
            faulting: set[int]) -> tuple[list[Instruction] | None, str]:
    """Whole instructions around listing[k], at least WINDOW_MIN bytes, that may move: those from up
    to three before it, the first that is safe, made longer where that takes in a sensitive
    instruction one or two after it (`pushf; pop %rax; cli`: one window, not a second that cannot
    be). Else None and why."""
    reason = "the function ends first"
    for first in range(k, max(k - 4, -1), -1):
        if listing[first][0] < taken_to:
            break
        last, length = first, listing[first][1]
        while length < WINDOW_MIN or last < k:
            last += 1
            if last >= len(listing):
                break
            length += listing[last][1]
        if last >= len(listing):
            continue
        problem = _problem(listing, first, last, targets, kept, faulting)
        if problem is not None:
            reason = problem
            continue
        for more in (1, 2):
            if last + more < len(listing) and _sensitive(listing[last + more]) is not None and \
                    _problem(listing, first, last + more, targets, kept, faulting) is None:
                last += more
                break
        return [Instruction._make(each) for each in listing[first : last + 1]], ""
    return None, reason


def _problem(listing: list[Decoded], first: int, last: int, targets: _Either, kept: _Ranges,
             faulting: set[int]) -> str | None:
    """Why listing[first : last + 1] may not be a window, or None."""
    for n in range(first, last + 1):
        instruction = Instruction._make(listing[n])
        kind = _sensitive(instruction)
        if kind is None and not _movable(instruction):
            return "beside an instruction that cannot move"
        if (instruction.address in faulting) != (kind == "wrmsr"):  # only the kernel's unchecked wrmsr()
            return "code the kernel rewrites or finds by address"
        if n > first and instruction.address in targets:
            return "a branch target inside"
        if instruction.mnemonic == "sti" and (n + 1 >= len(listing) or listing[n + 1][2].split()[-1] in NEEDS_SHADOW):
            return "an STI whose interrupt shadow counts"
    start, end = listing[first][0], listing[last][0] + listing[last][1]
    return "code the kernel rewrites or finds by address" if kept.meets(start, end) else None


def _replacement(kind: str, instruction: Instruction, code: bytes, cache: CacheLayout) -> tuple[bytes, int, bytes] | None:
    """What a copy does for a sensitive instruction (`code`, its bytes): the code before a call, the
    function called, the code after; None for a form not translated."""
    if kind == "cli":  # the virtual IF cleared; irq_disable keeps the flags
        return PUSH_RAX, cache.irq_disable, POP_RAX
    if kind == "sti":  # set, and a held interrupt taken here, as at the STI's trap
        return PUSH_RAX + PUSHFQ, cache.irq_enable, POPFQ + POP_RAX
    if kind == "pushfq":  # the flags, with the virtual IF (save_fl's RAX) for the real one
        return (PUSHFQ + PUSH_RAX + PUSHFQ, cache.save_fl,
                AND_16_RSP_IMM32 + struct.pack("<I", RFLAGS_KEPT_BY_PUSHF) + OR_RAX_TO_16_RSP + POPFQ + POP_RAX)
    if kind == "wrmsr":  # write_msr(ECX, EAX, EDX), as pv_ops.cpu.write_msr
        return SAVE_CALLER_SAVED + MSR_ARGUMENTS, cache.write_msr, RESTORE_CALLER_SAVED
    if kind == "cr3":  # write_cr3(the register), as pv_ops.mmu.write_cr3
        source = REGISTERS.index(instruction.operands.split(", ")[1])
        move = bytes([0x48 | (source >> 3) << 2, 0x89, 0xC7 | (source & 7) << 3])  # mov %source, %rdi
        return SAVE_CALLER_SAVED + move, cache.write_cr3, RESTORE_CALLER_SAVED
    if kind == "cr2":  # read_cr2(), as pv_ops.mmu.read_cr2: RAX only, the flags kept
        target = REGISTERS.index(instruction.operands[:-5])
        if target == 0:
            return b"", cache.read_cr2, b""
        move = bytes([0x48 | target >> 3, 0x89, 0xC0 | (target & 7)])  # mov %rax, %target
        return PUSH_RAX, cache.read_cr2, move + POP_RAX
    # invlpg(the operand's address): a LEA into RDI made from INVLPG's own ModRM, whose reg field (7) is RDI's
    rex = code[0] if 0x40 <= code[0] <= 0x4F else 0
    body = code[1:] if rex else code
    if body[:2] != b"\x0f\x01":
        return None  # a prefix other than REX
    return SAVE_CALLER_SAVED + bytes([0x48 | (rex & 3), 0x8D]) + body[2:], cache.invlpg, RESTORE_CALLER_SAVED


def _stub(image: bytearray, window: list[Instruction], delta: int, cache: CacheLayout, at: int,
          detailed: Any) -> tuple[bytes, dict[int, int]] | None:
    """The window's translation at `at`, ending in a jump back after it, and where in it each copied
    branch begins (by the original's address); None if a displacement does not fit in 32 bits, or
    for a form not copied.
    `delta`: an instruction's offset in `image` less its address; `detailed`: a decoder that gives an
    instruction's parts, for where its displacement is."""
    out = bytearray()
    copies: dict[int, int] = {}
    for instruction in window:
        kind = _sensitive(instruction)
        if kind is not None:  # a call of the monitor's function for it, between what keeps the rest as it was
            replacement = _replacement(kind, instruction, bytes(image[instruction.address + delta :
                                                                      instruction.address + delta + instruction.size]),
                                       cache)
            if replacement is None:
                return None
            before, function, after = replacement
            out += before
            displacement = function - (at + len(out) + 5)
            if not _fits(displacement):
                return None
            out += bytes([CALL_REL32]) + struct.pack("<i", displacement) + after
        elif _relocatable_branch(instruction):  # the same target, reached from here with a rel32
            target = int(instruction.operands, 16)
            opcode = image[instruction.address + delta]
            if instruction.mnemonic == "call":  # it returns into the cache, and on from there
                encoding = bytes([CALL_REL32])
            elif instruction.mnemonic == "jmp":
                encoding = bytes([JMP_REL32])
            elif 0x70 <= opcode <= 0x7F:  # Jcc rel8 -> 0F 80+cc rel32
                encoding = bytes([0x0F, 0x80 + opcode - 0x70])
            elif opcode == 0x0F:
                encoding = bytes(image[instruction.address + delta : instruction.address + delta + 2])
            else:
                return None  # a prefix: not one of the forms above
            if instruction.mnemonic in ("jmp", "call") and opcode not in (0xEB, JMP_REL32, CALL_REL32):
                return None
            displacement = target - (at + len(out) + len(encoding) + 4)
            if not _fits(displacement):
                return None
            copies[instruction.address] = len(out)
            out += encoding + struct.pack("<i", displacement)
        else:
            copy = bytearray(image[instruction.address + delta : instruction.address + delta + instruction.size])
            if "rip" in instruction.operands:  # the same memory, addressed from here
                (detail,) = detailed.disasm(bytes(copy), instruction.address, 1)
                field = detail.disp_offset  # (its disp_size is wrong after a 0x66 prefix: RIP-relative is 32 bits)
                written = _RIP_DISPLACEMENT.search(instruction.operands)
                if written is None:
                    return None
                shown = int(written[2], 16) * (-1 if written[1] == "-" else 1) if written[2] else 0
                if not 0 < field <= len(copy) - 4 or struct.unpack_from("<i", copy, field)[0] != shown:
                    return None
                aimed = instruction.address + instruction.size + shown
                displacement = _wrapped(aimed - (at + len(out) + instruction.size))  # per-CPU data: GS-relative, near 0
                if not _fits(displacement):
                    return None
                struct.pack_into("<i", copy, field, displacement)
            out += copy
    back = window[-1].address + window[-1].size - (at + len(out) + 5)
    if not _fits(back) or not _fits(at - (window[0].address + 5)):
        return None
    return bytes(out) + bytes([JMP_REL32]) + struct.pack("<i", back), copies


def _wrapped(displacement: int) -> int:
    """A difference of addresses as the CPU computes it: modulo 2**64, signed."""
    return (displacement + (1 << 63)) % (1 << 64) - (1 << 63)


def _fits(displacement: int) -> bool:
    return -(1 << 31) <= displacement < 1 << 31
