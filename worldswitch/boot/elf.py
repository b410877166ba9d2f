"""Loading a static ELF64 x86-64 executable into guest memory at its physical addresses.

Only loading happens here: segments are validated and copied, and the loader reports what it
placed where. Configuring the CPU to enter it is the caller's business (boot/program.py for
bare-metal programs, boot/linux.py for a vmlinux).
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import GuestImageError
from ..memory.guest import GuestMemory
from ..record import record

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_INTERP = 3
PT_DYNAMIC = 2

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
SHT_SYMTAB = 2
SHT_NOBITS = 8
STT_FUNC = 2


@record(frozen=True)
class Segment:
    offset: int  # in the file
    paddr: int
    vaddr: int
    filesz: int
    memsz: int
    flags: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@record(frozen=True)
class LoadedElf:
    path: str
    entry: int
    segments: tuple[Segment, ...]

    @property
    def low(self) -> int:
        return min(seg.paddr for seg in self.segments)

    @property
    def high(self) -> int:
        return max(seg.end for seg in self.segments)


def read_image(path: str | Path, what: str = "guest program") -> bytes:
    """The bytes of a file the user named, or one clear GuestImageError."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise GuestImageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise GuestImageError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise GuestImageError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as error:
        raise GuestImageError(f"cannot read {what} {path}: {error.strerror}") from None


def parse_elf(image: bytes, name: str = "image") -> tuple[int, list[Segment]]:
    """Validate an ELF64 executable and return (entry, loadable segments)."""
    if len(image) < _EHDR.size or image[:4] != ELF_MAGIC:
        raise GuestImageError(f"{name} is not an ELF file")
    ident, e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = _EHDR.unpack_from(image)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise GuestImageError(f"{name} is not a 64-bit little-endian ELF file")
    if machine != EM_X86_64:
        raise GuestImageError(f"{name} is not an x86-64 program (ELF machine {machine})")
    if e_type != ET_EXEC:
        raise GuestImageError(f"{name} is not a static executable (ELF type {e_type}); link it with -static and no PIE")
    if phentsize != _PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(image):
        raise GuestImageError(f"{name} has a corrupt program header table")
    segments: list[Segment] = []
    for i in range(phnum):
        p_type, p_flags, offset, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(image, phoff + i * phentsize)
        if p_type in (PT_INTERP, PT_DYNAMIC):
            raise GuestImageError(f"{name} is dynamically linked; a guest program must be static")
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(image):
            raise GuestImageError(f"{name}: segment {i} is truncated or corrupt")
        segments.append(Segment(offset, paddr, vaddr, filesz, memsz, p_flags))
    if not segments:
        raise GuestImageError(f"{name} has nothing to load (no PT_LOAD segment)")
    ordered = sorted(segments, key=lambda seg: seg.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if b.paddr < a.end:
            raise GuestImageError(f"{name}: segments at {a.paddr:#x} and {b.paddr:#x} overlap")
    return entry, segments


def load_elf(
    memory: GuestMemory,
    image: bytes,
    name: str = "image",
    reserved: list[tuple[int, int]] | None = None,
    entry_is_physical: bool = True,
) -> LoadedElf:
    """Copy each PT_LOAD segment to its physical address (zero-filling .bss) after checking that
    it fits in guest RAM and stays clear of `reserved` [start, end) ranges."""
    entry, segments = parse_elf(image, name)
    for seg in segments:
        if not memory.contains(seg.paddr, seg.memsz):
            raise GuestImageError(
                f"{name}: segment at {seg.paddr:#x}-{seg.end - 1:#x} does not fit in guest RAM "
                f"({memory.size >> 20} MiB); give the machine more memory or link the program lower"
            )
        for start, end in reserved or []:
            if seg.paddr < end and start < seg.end:
                raise GuestImageError(
                    f"{name}: segment at {seg.paddr:#x}-{seg.end - 1:#x} overlaps memory the VMM uses "
                    f"({start:#x}-{end - 1:#x}); link the program at 1 MiB (0x100000) or above"
                )
    if entry_is_physical and not any(seg.paddr <= entry < seg.end for seg in segments):
        raise GuestImageError(f"{name}: entry point {entry:#x} is outside every loaded segment")
    for seg in segments:
        memory.write(seg.paddr, image[seg.offset : seg.offset + seg.filesz])
        if seg.memsz > seg.filesz:
            memory.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    return LoadedElf(name, entry, tuple(segments))



@record(frozen=True)
class Section:
    address: int
    offset: int  # in the file
    size: int


def _section_headers(image: bytes) -> tuple[list[tuple[int, ...]], int]:
    """An ELF64 file's section headers (Elf64_Shdr fields) and the index of its names' section;
    none for a file without a readable section header table."""
    if len(image) < _EHDR.size or image[:4] != ELF_MAGIC or image[4] != ELFCLASS64:
        return [], 0
    header = _EHDR.unpack_from(image)
    shoff, shentsize, shnum, shstrndx = header[6], header[11], header[12], header[13]
    if shentsize != _SHDR.size or shoff + shnum * _SHDR.size > len(image):
        return [], 0
    return [_SHDR.unpack_from(image, shoff + i * _SHDR.size) for i in range(shnum)], shstrndx


def read_sections(image: bytes) -> dict[str, Section]:
    """An ELF64 file's sections by name, those whose bytes lie within the file."""
    headers, shstrndx = _section_headers(image)
    if shstrndx >= len(headers):
        return {}
    names_offset, names_size = headers[shstrndx][4], headers[shstrndx][5]
    names = image[names_offset : names_offset + names_size]
    sections = {}
    for name_index, kind, _flags, address, offset, size, *_ in headers:
        end = names.find(b"\0", name_index)
        if kind == SHT_NOBITS or end < 0 or offset + size > len(image):
            continue
        sections[names[name_index:end].decode(errors="replace")] = Section(address, offset, size)
    return sections


def read_function_symbols(image: bytes) -> list[tuple[int, str]]:
    """(address, name) of every function in an ELF64 file's symbol table (.symtab), for naming
    guest addresses; an image without one (stripped) gives an empty list."""
    sections, _names = _section_headers(image)
    shnum = len(sections)
    symbols = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != SHT_SYMTAB or entsize != _SYM.size or link >= shnum or offset + size > len(image):
            continue
        strings_offset, strings_size = sections[link][4], sections[link][5]
        strings = image[strings_offset : strings_offset + strings_size]
        for at in range(offset, offset + size - _SYM.size + 1, _SYM.size):
            name_index, info, _other, _shndx, value, _size = _SYM.unpack_from(image, at)
            if info & 0xF == STT_FUNC and value and name_index < len(strings):
                end = strings.find(b"\0", name_index)
                symbols.append((value, strings[name_index : end if end >= 0 else None].decode(errors="replace")))
    return sorted(symbols)
