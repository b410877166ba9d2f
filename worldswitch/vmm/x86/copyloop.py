"""A boot loader's byte-copy loops, run by the VMM in one debug exit a call instead of four or five
emulated instructions a byte.

Where KVM emulates guest kernel code (a PVM host: about a microsecond an instruction), GRUB loads a
kernel and initrd through the BIOS and copies every byte it reads with its `grub_memmove`, compiled
(GRUB 2.06, i386-pc) to two loops, one for each direction:

    up:    cmp  %edi, %ecx          39 f9      the end reached?
           je   done                74 rel8
           movsb                    a4         one byte; ESI and EDI step by EFLAGS.DF
           jmp  up                  eb f9

    down:  sub  $1, %ecx            83 e9 01   count down; a borrow ends it
           jb   done                72 rel8
           mov  (%esi,%ecx,1), %dl  8a 14 0e
           mov  %dl, (%eax,%ecx,1)  88 14 08
           jmp  down                eb f3

(docs/monitor.md: 222 million instructions for the 16 MB of a disk boot.) SeaBIOS's memset is a third,
a fill: `test %ecx,%ecx; je done; dec %ecx; mov %dl,(%eax,%ecx,1); jmp back`. The handoff (handoff.py)
finds such a loop where the vCPU is caught running it (and a memmove's other loop beside it,
find_sibling), or the firmware's own in its image before it runs (find_in_image), puts a hardware breakpoint on its head, and at each hit does what the loop would: the
copy in guest memory, the registers at their ends, the flags of the instruction that ended it (SDM Vol. 2A, "CMP" and "SUB": an equal compare sets ZF and PF and
clears CF, AF, SF and OF; 0 - 1 sets CF, PF, AF and SF and clears ZF and OF), and RIP at the exit
branch's target. The bytes say what to do, so any code with them is the loop, whoever's it is; the
registers are read from the instructions' own ModRM and SIB bytes. Everything else is checked at each
hit (the bytes again, flat 32-bit protected mode without paging, DF clear for `movsb`, both ranges in
RAM) and left to KVM where it does not hold. A `rep movsb` or `rep movsd` the sampling catches in
progress (GRUB's relocator moves tens of megabytes with one) is finished the same way (serve_rep_movs).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ...driver import structs as s
from ...memory.guest import GuestMemory
from .longmode import CR0_PE, CR0_PG

MASK32 = 0xFFFFFFFF
_REG_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
_ESI, _EDI, _ESP, _EBP = 6, 7, 4, 5  # register numbers in ModRM and SIB
FLAG_CF, FLAG_PF, FLAG_AF, FLAG_ZF, FLAG_SF, FLAG_TF, FLAG_DF, FLAG_OF = (
    1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 10, 1 << 11)
_ARITHMETIC = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF
_AFTER_EQUAL = FLAG_ZF | FLAG_PF  # cmp of two equal values, test of 0
_AFTER_BORROW = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_SF  # 0 - 1 = 0xFFFFFFFF
_FLAT_LIMIT = 0xFFFFFFFF

UP_LENGTH = 7  # cmp (2), je (2), movsb (1), jmp (2)
DOWN_LENGTH = 13  # sub (3), jb (2), mov (3), mov (3), jmp (2)
FILL_LENGTH = 10  # test (2), je (2), dec (1), mov (3), jmp (2)
LENGTH = DOWN_LENGTH  # the most a loop's bytes take
SIBLING_SPAN = 64  # how far either side of a memmove loop its other direction is looked for
CHUNK = 1 << 20  # the most guest memory the VMX holds at once for one copy: a guest names up to 4 GiB
_CMP = (0x39, 0x3B)  # CMP r/m32, r32 and CMP r32, r/m32: the same equality either way
_JE, _JB, _MOVSB = 0x74, 0x72, 0xA4
_INSTRUCTION_STARTS = {"up": (0, 2, 4, 5), "down": (0, 3, 5, 8, 11), "fill": (0, 2, 4, 5, 8)}
_REP, _MOVS = 0xF3, {0xA4: 1, 0xA5: 4}  # REP; MOVSB and MOVSD, by the bytes each moves
_LOOP_START = re.compile(rb"[\x39\x3b\x83\x85]")  # a loop's first opcode: CMP (up), SUB (down), TEST (fill)


class CopyLoop(NamedTuple):
    """One such loop: `up` (movsb: `walker`, ESI or EDI, runs until it equals `end`), `down`
    (`counter` runs down to 0, copying the byte at `source` + counter through `byte` to `target` +
    counter) or `fill` (`counter` runs down to 0, storing `byte` at `target` + counter); where its
    head is, and where its exit branch goes."""

    kind: str
    head: int
    done: int
    walker: str = ""  # up
    end: str = ""  # up
    counter: str = ""  # down, fill
    source: str = ""  # down
    target: str = ""  # down, fill
    byte: str = ""  # down, fill: the low byte of this register carries each byte


class Copied(NamedTuple):
    """What one served call of a loop wrote: `length` bytes from `target` up."""

    target: int
    length: int


def _rel8(value: int) -> int:
    return value - 0x100 if value & 0x80 else value


def _up(code: bytes, head: int) -> CopyLoop | None:
    if len(code) < UP_LENGTH or code[0] not in _CMP or code[2] != _JE or code[4] != _MOVSB:
        return None
    if code[5:7] != bytes([0xEB, 0x100 - UP_LENGTH]) or code[1] >> 6 != 3:  # back to the head; two registers
        return None
    first, second = (code[1] >> 3) & 7, code[1] & 7
    walking = {first, second} & {_ESI, _EDI}
    if len(walking) != 1 or first == second:  # ESI against EDI never meets (both step); one must hold the end
        return None
    walker = walking.pop()
    end = second if walker == first else first
    return CopyLoop("up", head, (head + 4 + _rel8(code[3])) & MASK32, walker=_REG_NAMES[walker], end=_REG_NAMES[end])


def _indexed(modrm: int, sib: int, count: int) -> tuple[int, int] | None:
    """(the byte register, the base) of `mov` between a low byte register and (base, count, 1)."""
    if modrm >> 6 != 0 or modrm & 7 != 4 or sib >> 6 != 0:  # [SIB], no displacement, scale 1
        return None
    byte, index, base = (modrm >> 3) & 7, (sib >> 3) & 7, sib & 7
    if byte > 3 or index == _ESP or base == _EBP or count not in (index, base):  # AL-BL; an index; no disp32
        return None
    other = base if index == count else index
    return (byte, other) if other != count else None


def _down(code: bytes, head: int) -> CopyLoop | None:
    if len(code) < DOWN_LENGTH or code[0] != 0x83 or code[1] >> 3 != 0x1D or code[2] != 1 or code[3] != _JB:
        return None  # sub $1, r32 (83 /5 ib, register form)
    if code[5] != 0x8A or code[8] != 0x88 or code[11:13] != bytes([0xEB, 0x100 - DOWN_LENGTH]):
        return None
    count = code[1] & 7
    load, store = _indexed(code[6], code[7], count), _indexed(code[9], code[10], count)
    if load is None or store is None or load[0] != store[0]:
        return None
    byte = load[0]
    if byte in (count, load[1], store[1]):  # the byte register would change the count or an address
        return None
    return CopyLoop("down", head, (head + 5 + _rel8(code[4])) & MASK32, counter=_REG_NAMES[count],
                    source=_REG_NAMES[load[1]], target=_REG_NAMES[store[1]], byte=_REG_NAMES[byte])


def _fill(code: bytes, head: int) -> CopyLoop | None:
    if len(code) < FILL_LENGTH or code[0] != 0x85 or code[2] != _JE or code[9] != 0x100 - FILL_LENGTH:
        return None  # test r32, r32
    count = code[1] & 7
    if code[1] != 0xC0 | count << 3 | count or code[4] != 0x48 | count or code[5] != 0x88 or code[8] != 0xEB:
        return None  # the same register tested and decremented (DEC r32's one-byte form), then a byte stored
    store = _indexed(code[6], code[7], count)
    if store is None or store[0] == count:
        return None
    return CopyLoop("fill", head, (head + 4 + _rel8(code[3])) & MASK32, counter=_REG_NAMES[count],
                    target=_REG_NAMES[store[1]], byte=_REG_NAMES[store[0]])


def recognize(code: bytes, head: int) -> CopyLoop | None:
    """The loop, if `code` (bytes at linear address `head`) is one; None for anything else."""
    return _up(code, head) or _down(code, head) or _fill(code, head)


def find_in_image(base: int, code: bytes) -> list[CopyLoop]:
    """Every loop in `code`, a firmware's image as it lies at linear address `base`, in address order.
    Bytes that only look like one (data, or the middle of other instructions) are never executed
    from their first byte, so a breakpoint on them never fires."""
    heads = (match.start() for match in _LOOP_START.finditer(code))
    return [loop for loop in (recognize(code[head:head + LENGTH], base + head) for head in heads) if loop is not None]


def _code_at(memory: GuestMemory, head: int) -> bytes:
    length = LENGTH if memory.contains(head, LENGTH) else UP_LENGTH
    return memory.read(head, length) if memory.contains(head, length) else b""  # contains: False below 0 too


def find_around(memory: GuestMemory, address: int) -> CopyLoop | None:
    """The loop that has an instruction at `address`, if there is one there (a sample of where the
    vCPU runs: at any of its instructions)."""
    for kind, starts in _INSTRUCTION_STARTS.items():
        for offset in starts:
            loop = recognize(_code_at(memory, address - offset), address - offset)
            if loop is not None and loop.kind == kind:
                return loop
    return None


def find_sibling(memory: GuestMemory, loop: CopyLoop) -> CopyLoop | None:
    """The copy loop of the other direction near `loop`, if there is one: a memmove's two loops are one
    function's two branches (in each GRUB build read, 2.06 and 2.12, the down loop's head is the up
    loop's end), and once one is caught the other is likely to run soon, while the sampling could take
    seconds to find it (a CD's GRUB: its up loop at 5 s, its down loop at 0.7 s)."""
    wanted = {"up": "down", "down": "up"}.get(loop.kind)
    start = max(loop.head - SIBLING_SPAN, 0)
    length = loop.head + SIBLING_SPAN + LENGTH - start
    if wanted is None or not memory.contains(start, length):  # the window at an edge of RAM: not looked at
        return None
    window = memory.read(start, length)
    for offset in range(len(window)):
        found = recognize(window[offset:offset + LENGTH], start + offset)
        if found is not None and found.kind == wanted:
            return found
    return None


def still_there(loop: CopyLoop, memory: GuestMemory) -> bool:
    """Whether the loop's bytes are still at its head."""
    return recognize(_code_at(memory, loop.head), loop.head) == loop


def flat_protected(sregs: s.kvm_sregs) -> bool:
    """32-bit protected mode, paging off, CS, DS and ES based at 0 and 4 GiB long: linear addresses
    are guest-physical ones, as for GRUB and SeaBIOS."""
    segments = (sregs.cs, sregs.ds, sregs.es)
    return (bool(sregs.cr0 & CR0_PE) and not sregs.cr0 & CR0_PG and bool(sregs.cs.db) and not sregs.cs.l
            and all(segment.base == 0 and segment.limit == _FLAT_LIMIT for segment in segments))


def copy_bytes(memory: GuestMemory, source: int, target: int, length: int, upward: bool) -> bool:
    """What a loop of one-byte copies leaves, walking up or down: where it writes ahead of where it
    reads (upward onto a later part of its source, downward onto an earlier one), it reads again what
    it wrote, and the first (or last) `period` bytes repeat. False (nothing written) where a range
    leaves RAM or wraps. The VMX holds at most CHUNK bytes of it at once, whatever the guest asked."""
    if not length:
        return True
    if source + length > 1 << 32 or target + length > 1 << 32:
        return False
    if not (memory.contains(source, length) and memory.contains(target, length)):
        return False  # MMIO or a hole: KVM's emulator does each access
    lag = target - source
    period = abs(lag)
    rereads = 0 < period < length and (lag > 0) == upward
    if rereads and period < CHUNK:  # a pattern of `period` bytes, read before anything is written
        shift = 0 if upward else length - period  # byte i gets the pattern's (i - shift) % period
        pattern = memory.read(source + shift, period)
        for start in range(0, length, CHUNK):
            size = min(CHUNK, length - start)
            offset = (start - shift) % period
            memory.write(target + start, ((pattern[offset:] + pattern[:offset]) * (size // period + 1))[:size])
        return True
    # In the loop's own order, in pieces no longer than the distance between the ranges where it reads
    # again what it wrote: each piece reads only bytes the pieces before it have written, or none.
    step = min(CHUNK, period) if rereads else CHUNK
    starts = range(0, length, step)
    for start in starts if upward else reversed(starts):
        size = min(step, length - start)
        memory.write(target + start, memory.read(source + start, size))
    return True


def fill_bytes(memory: GuestMemory, target: int, length: int, byte: int) -> bool:
    """`length` bytes of `byte` from `target`, in pieces of at most CHUNK; False where that is not RAM."""
    if length and (target + length > 1 << 32 or not memory.contains(target, length)):
        return False
    for start in range(0, length, CHUNK):
        memory.fill(target + start, min(CHUNK, length - start), byte)
    return True


def serve_rep_movs(memory: GuestMemory, regs: s.kvm_regs, sregs: s.kvm_sregs) -> Copied | None:
    """A `rep movsb` or `rep movsd` (no other prefix) at RIP, caught in progress or before it began:
    the rest of it run here (ECX left 0, ESI and EDI past their ends, RIP past it; the flags are
    MOVS's to leave alone), or None where KVM must go on with it (`regs` untouched). GRUB's relocator
    moves the kernel and initrd into place with one, of tens of megabytes, in either direction."""
    rip = regs.rip & MASK32
    if not flat_protected(sregs) or regs.rflags & FLAG_TF or not memory.contains(rip, 2):
        return None
    code = memory.read(rip, 2)
    size = _MOVS.get(code[1], 0) if code[0] == _REP else 0
    if not size:
        return None
    length = (regs.rcx & MASK32) * size
    source, target = regs.rsi & MASK32, regs.rdi & MASK32
    downward = bool(regs.rflags & FLAG_DF)
    low_source, low_target = (source - length + size, target - length + size) if downward else (source, target)
    if min(low_source, low_target) < 0:
        return None  # wraps below 0
    if size > 1 and abs(low_target - low_source) < length:
        return None  # overlapping dwords: KVM's emulator makes each move
    if not copy_bytes(memory, low_source, low_target, length, upward=not downward):
        return None
    moved = -length if downward else length
    regs.rsi = (source + moved) & MASK32
    regs.rdi = (target + moved) & MASK32
    regs.rcx &= ~MASK32
    regs.rip = rip + 2
    return Copied(low_target, length)


def serve(loop: CopyLoop, memory: GuestMemory, regs: s.kvm_regs, sregs: s.kvm_sregs) -> Copied | None:
    """Run the loop to its end at a hit on its head: what it copied (`regs` then hold the state
    after its exit branch), or None where KVM must run it (`regs` untouched)."""
    if regs.rip != loop.head or not flat_protected(sregs) or regs.rflags & FLAG_TF or not still_there(loop, memory):
        return None
    if loop.kind == "up":
        if regs.rflags & FLAG_DF:
            return None
        walker = getattr(regs, loop.walker) & MASK32
        length = (getattr(regs, loop.end) - walker) & MASK32  # iterations until the walker meets the end
        source, target = regs.rsi & MASK32, regs.rdi & MASK32
        if not copy_bytes(memory, source, target, length, upward=True):
            return None
        regs.rsi = (source + length) & MASK32
        regs.rdi = (target + length) & MASK32
        after = _AFTER_EQUAL
    elif loop.kind == "fill":
        length = getattr(regs, loop.counter) & MASK32
        target = getattr(regs, loop.target) & MASK32
        if not fill_bytes(memory, target, length, getattr(regs, loop.byte) & 0xFF):
            return None
        setattr(regs, loop.counter, getattr(regs, loop.counter) & ~MASK32)  # test of 0, which ended it
        after = _AFTER_EQUAL  # TEST's AF is undefined; KVM's (the CPU's) is clear
    else:
        length = getattr(regs, loop.counter) & MASK32
        source, target = getattr(regs, loop.source) & MASK32, getattr(regs, loop.target) & MASK32
        if not copy_bytes(memory, source, target, length, upward=False):
            return None
        if length:  # the last byte carried is the first of the range
            setattr(regs, loop.byte, (getattr(regs, loop.byte) & ~0xFF) | memory.read(target, 1)[0])
        setattr(regs, loop.counter, MASK32)  # 0 - 1, which ended it
        after = _AFTER_BORROW
    regs.rflags = (regs.rflags & ~_ARITHMETIC) | after
    regs.rip = loop.done
    return Copied(target, length)
