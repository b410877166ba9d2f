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
from collections.abc import Iterator, Mapping
from operator import itemgetter
from typing import NamedTuple

from ..errors import GuestImageError
from .elf import Section, read_sections

ADDRESS_MASK = 2**64 - 1
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


def _words_within(rodata: bytes, end: int, low: int, high: int) -> list[int]:
    """Where the u32 words from `low` to `high` (less than 256 apart) lie before `end`, aligned to 4,
    from the last back: their upper three bytes take one or two values, which bytes.find looks for
    (a walk of the words in Python took 120 ms over Linux 7.2's 2 MB of names)."""
    found = []
    for upper in {low >> 8, high >> 8}:
        pattern = upper.to_bytes(3, "little")
        at = rodata.find(pattern, 1, end)
        while at >= 0:
            position = at - 1
            if position % 4 == 0 and low <= struct.unpack_from("<I", rodata, position)[0] <= high:
                found.append(position)
            at = rodata.find(pattern, at + 1, end)
    return sorted(found, reverse=True)


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
    for position in _words_within(rodata, markers, max(256 * needed - 255, _MIN_SYMBOLS), min(256 * needed, _MAX_SYMBOLS)):
        count = struct.unpack_from("<I", rodata, position)[0]
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


def kallsyms(vmlinux: bytes) -> Symbols:
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
    names, position, tokens = [], layout.names, table.tokens.__getitem__
    for _ in range(layout.symbols):
        if position + 2 > len(rodata):
            raise GuestImageError("the kernel's kallsyms_names run past .rodata")
        codes, length = _name_at(rodata, position)
        if codes + length > len(rodata):
            raise GuestImageError("the kernel's kallsyms_names run past .rodata")
        names.append(b"".join(map(tokens, rodata[codes : codes + length])))  # map: a generator took twice as long
        position = codes + length
    offsets = struct.unpack_from(f"<{layout.symbols}i", rodata, layout.offsets)
    # Up to 6.14 x86-64's per-CPU symbols are absolute (KALLSYMS_ABSOLUTE_PERCPU): an offset of 0 or
    # more is the address itself, and the rest count down from the base, so `_text` is -1. By 6.17
    # they are not, and every offset counts up from the base: `_text` is 0.
    text = next((offset for name, offset in zip(names, offsets) if name[1:] == b"_text"), None)
    absolute_per_cpu = text == -1
    if not all(names):
        raise GuestImageError("the kernel's kallsyms_names hold an empty name")
    # Whole lists, not a loop over the symbols: this runs for 80,000 to 190,000 of them at every boot.
    if layout.place_relative:
        first = rodata_section.address + layout.offsets
        addresses = [(first + 4 * number + offset) % (1 << 64) for number, offset in enumerate(offsets)]
    elif absolute_per_cpu:
        addresses = [offset if offset >= 0 else KERNEL_TEXT - 1 - offset for offset in offsets]
    else:
        addresses = [KERNEL_TEXT + (offset & 0xFFFF_FFFF) for offset in offsets]
    return Symbols([name[1:].decode(errors="replace") for name in names], bytes(map(itemgetter(0), names)), addresses)


class Symbols(Mapping[str, Symbol]):
    """A kernel's symbols by name (the last of equal names wins). Each Symbol is made when asked for:
    a kernel has 80,000 to 190,000 of them and a boot asks for a dozen (making them all, tuples the
    garbage collector then walked, took 100 to 200 ms)."""

    def __init__(self, names: list[str], kinds: bytes, addresses: list[int]) -> None:
        self._index = dict(zip(names, range(len(names))))
        self._kinds, self._addresses = kinds, addresses

    def __getitem__(self, name: str) -> Symbol:
        number = self._index[name]
        return Symbol(chr(self._kinds[number]), self._addresses[number])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def code_addresses(self) -> list[int]:
        """Where each of the kernel's text symbols (kinds t and T) begins, in order, once each."""
        text = {ord("t"), ord("T")}
        return sorted({address for kind, address in zip(self._kinds, self._addresses) if kind in text})

    def next_above(self, address: int) -> int:
        """The lowest address above `address` that kallsyms names (`address` if none is), whatever
        the name: the end of the code or data at `address`."""
        return min(filter(address.__lt__, self._addresses), default=address)


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
_TAIL = [_FIXED_TAIL.get(kind, 0 if kind in _PER_MEMBER else -1) for kind in range(32)]  # by kind; -1: unknown
_TAIL_PER_MEMBER = [_PER_MEMBER.get(kind, 0) for kind in range(32)]


class _Type(NamedTuple):
    kind: int
    name: int  # an offset in the string section
    size_or_type: int
    info: int  # the header's info word: kind, member count (vlen), kind_flag
    tail: int  # where the bytes after the header begin (a struct's or function's members)


class BtfTypes:
    """The type graph of a vmlinux's .BTF section. Made, it has walked every type's header (Debian's
    kernels have about 120,000); names, members and parameters are read when a question needs them,
    as a question needs a dozen types of them (reading them all took 0.35 to 0.47 s of every boot)."""

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
        self._data = btf[header_length + type_offset : header_length + type_offset + type_length]
        self._structs: dict[bytes, int] = {}  # the first struct of each name: its type id
        self._types = self._read(self._data)

    def _bytes(self, offset: int) -> bytes:
        end = self._strings.find(b"\0", offset)
        if offset >= len(self._strings) or end < 0:
            raise GuestImageError("the kernel's BTF names a string outside its string section")
        return self._strings[offset:end]

    def _string(self, offset: int) -> str:
        return self._bytes(offset).decode(errors="replace")

    def _read(self, data: bytes) -> list[tuple[int, int, int, int, int] | None]:
        """Every type's header, as _Type's fields (a plain tuple each: a NamedTuple made 95,000
        times took 80 ms more), and each struct's name in _structs."""
        headers: list[tuple[int, int, int, int, int] | None] = [None]  # type 0 is void
        size, tail, per_member = _TYPE.size, _TAIL, _TAIL_PER_MEMBER
        position, last, unpack, append = 0, len(data) - size, _TYPE.unpack_from, headers.append
        while position <= last:
            name, info, size_or_type = unpack(data, position)
            kind = (info >> 24) & 0x1F
            fixed = tail[kind]
            if fixed < 0:
                raise GuestImageError(f"the kernel's BTF has a type of unknown kind {kind}")
            if kind == _STRUCT:
                self._structs.setdefault(self._bytes(name), len(headers))
            append((kind, name, size_or_type, info, position + size))
            position += size + fixed + per_member[kind] * (info & 0xFFFF)
        if position > len(data):
            raise GuestImageError("the kernel's BTF is truncated")
        return headers

    def _type(self, type_id: int) -> _Type | None:
        header = self._types[type_id] if type_id < len(self._types) else None
        return None if header is None else _Type(*header)

    def _members(self, found: _Type) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct's or union's members; (name, type id, 0) of a
        function's parameters."""
        count = found.info & 0xFFFF
        if found.kind == _FUNC_PROTO:
            return [(self._string(name), type_id, 0) for name, type_id in
                    (struct.unpack_from("<II", self._data, found.tail + 8 * i) for i in range(count))]
        bitfields = found.info >> 31
        return [(self._string(name), type_id, offset & 0xFFFFFF if bitfields else offset) for name, type_id, offset in
                (_TYPE.unpack_from(self._data, found.tail + 12 * i) for i in range(count))]

    def _resolve(self, type_id: int) -> _Type | None:
        for _ in range(64):  # a chain of typedefs and qualifiers; a loop would be a corrupt file
            found = self._type(type_id)
            if found is None or found.kind not in _QUALIFIERS:
                return found
            type_id = found.size_or_type
        raise GuestImageError("the kernel's BTF has a loop of typedefs")

    def _struct(self, name: str) -> _Type:
        type_id = self._structs.get(name.encode())
        if type_id is None:
            raise GuestImageError(f"the kernel's BTF has no struct {name}")
        found = self._type(type_id)
        assert found is not None
        return found

    def _name(self, type_id: int) -> str:
        """What a type is called, past typedefs and qualifiers."""
        found = self._resolve(type_id)
        return "void" if found is None else self._string(found.name) or _UNNAMED.get(found.kind, "anonymous")

    def parameters(self, struct_name: str, member: str) -> list[str]:
        """The parameter types of the function a member of `struct struct_name` points to."""
        member_type = next((type_id for name, type_id, _ in self._members(self._struct(struct_name)) if name == member),
                           None)
        if member_type is None:
            raise GuestImageError(f"the kernel's struct {struct_name} has no member {member}")
        pointer = self._resolve(member_type)
        function = self._resolve(pointer.size_or_type) if pointer is not None and pointer.kind == _POINTER else None
        if function is None or function.kind != _FUNC_PROTO:
            raise GuestImageError(f"the kernel's struct {struct_name} member {member} is not a function pointer")
        return [self._name(type_id) for _name, type_id, _ in self._members(function)]

    def struct(self, name: str) -> tuple[int, dict[str, Member]]:
        """(size, members by name) of `struct name`."""
        found = self._struct(name)
        return found.size_or_type, {member_name: Member(bit_offset // 8, self._name(member_type))
                                    for member_name, member_type, bit_offset in self._members(found)}


PV_IRQ_OPS = ("save_fl", "irq_disable", "irq_enable", "safe_halt", "halt")
PV_CPU_OPS = ("write_msr", "load_gs_index")
PV_MMU_OPS = ("read_cr2", "write_cr3")
PV_OPS = {"irq": PV_IRQ_OPS, "cpu": PV_CPU_OPS, "mmu": PV_MMU_OPS}  # pv_ops's groups, and the members of each a VMM may point


def has_paravirt_xxl(types: BtfTypes) -> bool:
    """Whether the kernel is built with CONFIG_PARAVIRT_XXL, the pv_ops that reach its interrupt flag
    (struct pv_irq_ops has save_fl; without XXL the struct is empty, and without PARAVIRT absent)."""
    try:
        _size, members = types.struct("pv_irq_ops")
    except GuestImageError:
        return False
    return "save_fl" in members


def pv_slots(symbols: Mapping[str, Symbol], types: BtfTypes) -> dict[str, int]:
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


def struct_fields(size: int, members: dict[str, Member], struct_name: str, **widths: int) -> list[int]:
    """The offsets of a kernel struct's members, each checked to lie within the struct."""
    offsets = []
    for name, width in widths.items():
        if name not in members or members[name].offset + width > size:
            raise GuestImageError(f"the kernel's BTF gives struct {struct_name} no {width}-byte {name} within its {size} bytes")
        offsets.append(members[name].offset)
    return offsets


def table_entries(sections: dict[str, Section], name: str, size: int) -> range:
    """The file offsets of a kernel table's entries (`size` bytes each)."""
    section = sections.get(name)
    if section is None:
        raise GuestImageError(f"the kernel has no {name} section (is it built with CONFIG_PARAVIRT?)")
    if size <= 0 or section.size % size:
        raise GuestImageError(f"the kernel's {name} is not a whole number of {size}-byte entries")
    return range(section.offset, section.offset + section.size, size)


def relative_addresses(image: bytes | bytearray, table: Section, entries: range, field: int) -> list[int]:
    """The addresses a kernel table's s32 field names in each entry (file offsets `entries`), each
    relative to the field's own address, as the kernel's tables of sites are."""
    found = []
    for at in entries:
        place = table.address + at - table.offset + field
        found.append((place + struct.unpack_from("<i", image, at + field)[0]) & ADDRESS_MASK)
    return found
