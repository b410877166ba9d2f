"""What a Linux vmlinux says about itself: its symbols, from the kallsyms tables it carries (a
distribution's image has them even where its System.map is a placeholder, as Debian's is), and its
types, from its BTF section (CONFIG_DEBUG_INFO_BTF). The in-guest monitor's Linux support
(docs/monitor.md, stage 2) needs both: where `pv_ops` is, and where its interrupt-flag entries lie
in it.

The image is the user's file: every table is bounds-checked, and what cannot be read is a
GuestImageError naming what was missing, never an exception from deep inside.

kallsyms (scripts/kallsyms.c, base-relative with absolute per-CPU symbols, in .rodata, each table
aligned to 8): kallsyms_offsets (s32 each), kallsyms_relative_base (u64), kallsyms_num_syms (u32),
kallsyms_names (each a length, one byte or two for 128 and more, and that many token codes),
kallsyms_markers, and the 256-entry kallsyms_token_table, in which every character that names use
is a one-character token at its own code, then its kallsyms_token_index (u16 each). That is Linux
6.1's order; from 6.4 on (Masahiro Yamada's "scripts/kallsyms: change the output order") the
offsets and the base come after the token index, and the count before the names. From 7.0 on
(Ard Biesheuvel's "kallsyms: Get rid of kallsyms relative base", a081b5789255d) there is no base:
each offset is relative to its own place in kallsyms_offsets, and Debian 14's 7.2 aligns the
tables to 4, not 8.
BTF: Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import GuestImageError
from .elf import read_sections

KERNEL_TEXT = 0xFFFF_FFFF_8100_0000  # kallsyms_relative_base of an x86-64 kernel linked at its default
_DIGIT_TOKENS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_MIN_SYMBOLS, _MAX_SYMBOLS = 1_000, 2_000_000


class Symbol(NamedTuple):
    kind: str  # nm's letter: T text, D data, ... (lower case: local)
    address: int


class _TokenTable(NamedTuple):
    tokens: list[bytes]
    start: int  # in .rodata
    end: int  # past its last token


class _Layout(NamedTuple):
    symbols: int  # how many
    names: int  # where kallsyms_names begins in .rodata
    offsets: int  # where kallsyms_offsets begins
    place_relative: bool = False  # 7.0's offsets, each from its own address; before, from KERNEL_TEXT


def _tokens(rodata: bytes) -> _TokenTable:
    """kallsyms_token_table: the run of one-character tokens '0'..'9' sits at codes 0x30..0x39, and
    code 0 holds a token of several characters (a table of single bytes is something else)."""
    at = -1
    while True:
        at = rodata.find(_DIGIT_TOKENS, at + 1)
        if at < 0:
            raise GuestImageError("the kernel has no kallsyms token table (is it built with CONFIG_KALLSYMS?)")
        start = at
        for _ in range(0x30):
            start = rodata.rfind(b"\0", 0, start - 1) + 1
        first_end = rodata.find(b"\0", start)
        if first_end - start > 1:
            break
    tokens, position = [], start
    for _ in range(256):
        end = rodata.find(b"\0", position)
        if end < 0:
            raise GuestImageError("the kernel's kallsyms token table is truncated")
        tokens.append(rodata[position:end])
        position = end + 1
    return _TokenTable(tokens, start, position)


def _aligned(position: int) -> int:
    return (position + 7) & ~7


def _layout_of_6_1(rodata: bytes) -> _Layout | None:
    """The offsets, then the base, the count and the names: the base is KERNEL_TEXT, followed by a
    count that the offsets before it fit."""
    base = struct.pack("<Q", KERNEL_TEXT)
    at = -1
    while True:
        at = rodata.find(base, at + 1)
        if at < 0:
            return None
        if at % 8 or at + 16 > len(rodata):
            continue
        count = struct.unpack_from("<I", rodata, at + 8)[0]
        table = at - 4 * count - (4 * count) % 8
        if _MIN_SYMBOLS <= count <= _MAX_SYMBOLS and table >= 0:
            return _Layout(count, at + 16, table)


def _layout_since_6_4(rodata: bytes, table: _TokenTable) -> _Layout | None:
    """The count and the names first, the token table and index, then the offsets and the base: the
    offsets begin after the index, and end where the base is (padded to 8, with a zero word, for an
    odd count); the count, a u32 padded to 8, is the last such word before the names that decode to
    exactly the markers' start."""
    index = _aligned(table.end)
    if index + 512 > len(rodata) or struct.unpack_from("<H", rodata, index)[0] != 0:
        return None
    offsets = _aligned(index + 512)
    at = offsets
    base = struct.pack("<Q", KERNEL_TEXT)
    while True:
        at = rodata.find(base, at)
        if at < 0:
            return None
        if at % 8 == 0:
            break
        at += 1
    count = (at - offsets) // 4
    if count and struct.unpack_from("<I", rodata, at - 4)[0] == 0:
        count -= 1  # the padding after an odd count of offsets
    if not _MIN_SYMBOLS <= count <= _MAX_SYMBOLS:
        return None
    markers = 4 * ((count + 255) // 256)
    word, before = struct.pack("<II", count, 0), table.start
    while True:
        names = rodata.rfind(word, 0, before)
        if names < 0:
            return None
        end = _names_end(rodata, names + 8, count, table.start)
        if names % 8 == 0 and end >= 0 and _aligned(end + markers) == table.start:
            return _Layout(count, names + 8, offsets)
        before = names + len(word) - 1


def _markers_before(rodata: bytes, end: int) -> int:
    """Where kallsyms_markers begins, given where it ends (4-aligned): the u32 offsets of every
    256th name rise from 0, so walking back from its end they fall until the 0 (-1: not so)."""
    position, above = end - 4, 1 << 32
    while position >= 0:
        marker = struct.unpack_from("<I", rodata, position)[0]
        if marker >= above:
            return -1
        if marker == 0:
            return position
        position, above = position - 4, marker
    return -1


def _layout_since_7_0(rodata: bytes, table: _TokenTable, rodata_address: int) -> _Layout | None:
    """The count and the names first, the markers, the token table and index, then the offsets with
    no base after them, each table aligned to 4: the markers end where the token table begins, and
    their number fixes the count within 256; the count is the last word before the names that fits
    it and whose names end exactly where the markers begin. The offsets follow the index; the first
    symbol, `_text`, is at KERNEL_TEXT."""
    if table.start % 4:
        return None
    index = table.end + (-table.end % 4)
    if index + 512 > len(rodata) or struct.unpack_from("<H", rodata, index)[0] != 0:
        return None
    markers = _markers_before(rodata, table.start)
    if markers < 0:
        return None
    needed = (table.start - markers) // 4
    for offsets in (index + 512 + (-(index + 512) % 4), _aligned(index + 512)):
        if offsets + 4 <= len(rodata) and \
                rodata_address + offsets + struct.unpack_from("<i", rodata, offsets)[0] == KERNEL_TEXT:
            break
    else:
        return None
    for position in range(markers - 4, -1, -4):
        count = struct.unpack_from("<I", rodata, position)[0]
        if (count + 255) // 256 != needed or not _MIN_SYMBOLS <= count <= _MAX_SYMBOLS:
            continue
        if offsets + 4 * count > len(rodata):
            return None
        for names in (position + 4, position + 8):
            if _names_end(rodata, names, count, markers, alignment=4) == markers:
                return _Layout(count, names, offsets, place_relative=True)
    return None


def _name_at(rodata: bytes, position: int) -> tuple[int, int]:
    """A name in kallsyms_names: where its token codes begin, and how many there are. The length is
    one byte, or for a "big" symbol (Linux 6.1 on) seven bits there and the rest in the next byte."""
    length = rodata[position]
    if length & 0x80:
        return position + 2, (length & 0x7F) | rodata[position + 1] << 7
    return position + 1, length


def _names_end(rodata: bytes, position: int, count: int, limit: int, alignment: int = 8) -> int:
    """Where `count` names that begin at `position` end, aligned (-1 if they pass `limit`)."""
    for _ in range(count):
        if position + 1 >= limit:
            return -1
        codes, length = _name_at(rodata, position)
        position = codes + length
    return position + (-position % alignment) if position <= limit else -1


def kallsyms(vmlinux: bytes) -> dict[str, Symbol]:
    """Every symbol kallsyms names, by name (the last of equal names wins)."""
    rodata_section = read_sections(vmlinux).get(".rodata")
    if rodata_section is None:
        raise GuestImageError("the kernel has no .rodata section")
    rodata = vmlinux[rodata_section.offset : rodata_section.offset + rodata_section.size]
    table = _tokens(rodata)
    layout = _layout_of_6_1(rodata) or _layout_since_6_4(rodata, table) or \
        _layout_since_7_0(rodata, table, rodata_section.address)
    if layout is None:
        raise GuestImageError("the kernel's kallsyms tables were not found in any layout of Linux 6.1 to 7.2")
    names, position = [], layout.names
    for _ in range(layout.symbols):
        if position + 2 > len(rodata):
            raise GuestImageError("the kernel's kallsyms_names run past .rodata")
        codes, length = _name_at(rodata, position)
        if codes + length > len(rodata):
            raise GuestImageError("the kernel's kallsyms_names run past .rodata")
        names.append(b"".join(table.tokens[code] for code in rodata[codes : codes + length]))
        position = codes + length
    offsets = struct.unpack_from(f"<{layout.symbols}i", rodata, layout.offsets)
    # Up to 6.14 x86-64's per-CPU symbols are absolute (KALLSYMS_ABSOLUTE_PERCPU): an offset of 0 or
    # more is the address itself, and the rest count down from the base, so `_text` is -1. By 6.17
    # they are not, and every offset counts up from the base: `_text` is 0.
    text = next((offset for name, offset in zip(names, offsets) if name[1:] == b"_text"), None)
    absolute_per_cpu = text == -1
    symbols = {}
    for number, (name, offset) in enumerate(zip(names, offsets)):
        if not name:
            raise GuestImageError("the kernel's kallsyms_names hold an empty name")
        if layout.place_relative:
            address = (rodata_section.address + layout.offsets + 4 * number + offset) % (1 << 64)
        elif absolute_per_cpu:
            address = offset if offset >= 0 else KERNEL_TEXT - 1 - offset
        else:
            address = KERNEL_TEXT + (offset & 0xFFFF_FFFF)
        symbols[name[1:].decode(errors="replace")] = Symbol(chr(name[0]), address)
    return symbols


class Member(NamedTuple):
    offset: int  # in bytes
    type_name: str  # the member's type, through typedefs and qualifiers


_BTF_MAGIC = 0xEB9F
_BTF_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_POINTER, _STRUCT, _UNION, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _FUNC_PROTO, _TYPE_TAG = 2, 4, 5, 8, 9, 10, 11, 13, 18
_QUALIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)
# bytes that follow each kind's header: fixed, or per member (vlen)
_FIXED_TAIL = {1: 4, 2: 0, 3: 12, 7: 0, 8: 0, 9: 0, 10: 0, 11: 0, 12: 0, 14: 4, 16: 0, 17: 4, 18: 0}
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
_UNNAMED = {2: "pointer", 3: "array", 13: "function"}


class _Type(NamedTuple):
    kind: int
    name: str
    size_or_type: int
    members: tuple[tuple[str, int, int], ...]  # (name, type id, bit offset) of a struct or union; a function's parameters


class BtfTypes:
    """The type graph of a vmlinux's .BTF section, read whole when made."""

    def __init__(self, vmlinux: bytes) -> None:
        section = read_sections(vmlinux).get(".BTF")
        if section is None:
            raise GuestImageError("the kernel has no .BTF section (is it built with CONFIG_DEBUG_INFO_BTF?)")
        btf = vmlinux[section.offset : section.offset + section.size]
        if len(btf) < _BTF_HEADER.size:
            raise GuestImageError("the kernel's .BTF section is truncated")
        magic, _version, _flags, header_length, type_offset, type_length, string_offset, string_length = _BTF_HEADER.unpack_from(btf)
        if magic != _BTF_MAGIC or header_length + max(type_offset + type_length, string_offset + string_length) > len(btf):
            raise GuestImageError("the kernel's .BTF section is not BTF, or is truncated")
        self._strings = btf[header_length + string_offset : header_length + string_offset + string_length]
        self._types = self._read(btf[header_length + type_offset : header_length + type_offset + type_length])

    def _string(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        if offset >= len(self._strings) or end < 0:
            raise GuestImageError("the kernel's BTF names a string outside its string section")
        return self._strings[offset:end].decode(errors="replace")

    def _read(self, data: bytes) -> list[_Type | None]:
        types: list[_Type | None] = [None]  # type 0 is void
        position = 0
        while position + _TYPE.size <= len(data):
            name, info, size_or_type = _TYPE.unpack_from(data, position)
            position += _TYPE.size
            kind, count, bitfields = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            members: tuple[tuple[str, int, int], ...] = ()
            if kind in (_STRUCT, _UNION):
                if position + 12 * count > len(data):
                    raise GuestImageError("the kernel's BTF is truncated")
                members = tuple((self._string(member_name), member_type, offset & 0xFFFFFF if bitfields else offset)
                                for member_name, member_type, offset in
                                (_TYPE.unpack_from(data, position + 12 * i) for i in range(count)))
                position += 12 * count
            elif kind == _FUNC_PROTO:  # its parameters: (name, type id) each
                if position + 8 * count > len(data):
                    raise GuestImageError("the kernel's BTF is truncated")
                members = tuple((self._string(parameter_name), parameter_type, 0) for parameter_name, parameter_type in
                                (struct.unpack_from("<II", data, position + 8 * i) for i in range(count)))
                position += 8 * count
            elif kind in _PER_MEMBER:
                position += _PER_MEMBER[kind] * count
            elif kind in _FIXED_TAIL:
                position += _FIXED_TAIL[kind]
            else:
                raise GuestImageError(f"the kernel's BTF has a type of unknown kind {kind}")
            types.append(_Type(kind, self._string(name), size_or_type, members))
        return types

    def _resolve(self, type_id: int) -> _Type | None:
        for _ in range(64):  # a chain of typedefs and qualifiers; a loop would be a corrupt file
            found = self._types[type_id] if type_id < len(self._types) else None
            if found is None or found.kind not in _QUALIFIERS:
                return found
            type_id = found.size_or_type
        raise GuestImageError("the kernel's BTF has a loop of typedefs")

    def _struct(self, name: str) -> _Type:
        for found in self._types:
            if found is not None and found.kind == _STRUCT and found.name == name:
                return found
        raise GuestImageError(f"the kernel's BTF has no struct {name}")

    def _name(self, type_id: int) -> str:
        """What a type is called, past typedefs and qualifiers."""
        found = self._resolve(type_id)
        return "void" if found is None else found.name or _UNNAMED.get(found.kind, "anonymous")

    def parameters(self, struct_name: str, member: str) -> list[str]:
        """The parameter types of the function a member of `struct struct_name` points to."""
        member_type = next((type_id for name, type_id, _ in self._struct(struct_name).members if name == member), None)
        if member_type is None:
            raise GuestImageError(f"the kernel's struct {struct_name} has no member {member}")
        pointer = self._resolve(member_type)
        function = self._resolve(pointer.size_or_type) if pointer is not None and pointer.kind == _POINTER else None
        if function is None or function.kind != _FUNC_PROTO:
            raise GuestImageError(f"the kernel's struct {struct_name} member {member} is not a function pointer")
        return [self._name(type_id) for _name, type_id, _ in function.members]

    def struct(self, name: str) -> tuple[int, dict[str, Member]]:
        """(size, members by name) of `struct name`."""
        found = self._struct(name)
        return found.size_or_type, {member_name: Member(bit_offset // 8, self._name(member_type))
                                    for member_name, member_type, bit_offset in found.members}


PV_IRQ_OPS = ("save_fl", "irq_disable", "irq_enable", "safe_halt", "halt")
PV_CPU_OPS = ("write_msr", "load_gs_index")
PV_MMU_OPS = ("read_cr2", "write_cr3")
PV_OPS = {"irq": PV_IRQ_OPS, "cpu": PV_CPU_OPS, "mmu": PV_MMU_OPS}  # pv_ops's groups, and the members of each a VMM may point


def pv_slots(symbols: dict[str, Symbol], types: BtfTypes) -> dict[str, int]:
    """The addresses (as linked) of the function pointers in pv_ops that PV_OPS names, by member name
    (unique across the groups), from a kernel's symbols and types: where a VMM points a PARAVIRT_XXL
    kernel's interrupt flag, MSR writes, CR2 reads and CR3 loads at its own code before the kernel runs."""
    if "pv_ops" not in symbols:
        raise GuestImageError("the kernel has no pv_ops (is it built with CONFIG_PARAVIRT?)")
    _size, template = types.struct("paravirt_patch_template")
    slots = {}
    for group, names in PV_OPS.items():
        if group not in template:
            raise GuestImageError(f"the kernel's pv_ops has no {group} operations (no CONFIG_PARAVIRT_XXL?)")
        _size, members = types.struct(template[group].type_name)
        missing = [name for name in names if name not in members]
        if missing:
            raise GuestImageError(f"the kernel's {template[group].type_name} has no {', '.join(missing)}")
        base = symbols["pv_ops"].address + template[group].offset
        slots.update({name: base + members[name].offset for name in names})
    return slots
