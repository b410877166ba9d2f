"""A small AML encoder (ACPI 6.4, chapter 20: ACPI Machine Language), enough for a DSDT that names
a PCI root bridge: integers, strings, names, packages, buffers, devices, scopes and the resource
descriptors of _CRS (chapter 6.4). Each function returns the bytes of one term."""

from __future__ import annotations

import struct

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX, DUAL_NAME_PREFIX = 0x5C, 0x5E, 0x2E
END_TAG = bytes([0x79, 0x00])  # small resource: End Tag, checksum 0 ("the checksum is ignored")


def pkg_length(body_length: int) -> bytes:
    """PkgLength (20.2.4): the length of itself plus what follows, in one to four bytes."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)] + [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)])
    raise ValueError(f"{body_length} bytes do not fit a PkgLength")


def name_seg(name: str) -> bytes:
    if not 1 <= len(name) <= 4 or not (name[0].isupper() or name[0] == "_"):
        raise ValueError(f"{name!r} is not a NameSeg")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """\\, ^ prefixes and dotted segments: "\\_SB_.PCI0" or "PCI0"."""
    prefix = b""
    while path.startswith(("\\", "^")):
        prefix += bytes([ROOT_CHAR if path[0] == "\\" else PARENT_PREFIX])
        path = path[1:]
    segments = [name_seg(part) for part in path.split(".")] if path else []
    if len(segments) == 0:
        return prefix + b"\0"
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    return prefix + bytes([0x2F, len(segments)]) + b"".join(segments)  # MultiNamePrefix


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 0xFF), (WORD_PREFIX, "<H", 0xFFFF), (DWORD_PREFIX, "<I", 0xFFFFFFFF)):
        if 0 <= value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def eisa_id(text: str) -> bytes:
    """A compressed EISA ID ("PNP0A08") as the 32-bit integer _HID expects (6.1.5)."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    value = ((vendor >> 8) & 0xFF) | ((vendor & 0xFF) << 8) | (((product >> 8) & 0xFF) << 16) | ((product & 0xFF) << 24)
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


# --- resource descriptors (6.4.2 small, 6.4.3 large) ------------------------------------------

PRODUCER_FIXED = 0x0C  # general flags: producer, positive decode, min and max fixed


def io_port(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """I/O Port Descriptor (6.4.2.5), 16-bit decode."""
    return struct.pack("<BBHHBB", 0x47, 0x01, minimum, maximum, alignment, length)


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """Word Address Space Descriptor (6.4.3.5.3), resource type 2: bus numbers."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 2, PRODUCER_FIXED, 0, 0, minimum, maximum, 0, maximum - minimum + 1)


def word_io(minimum: int, maximum: int) -> bytes:
    """Word Address Space Descriptor, resource type 1: an I/O window (ISA and non-ISA ranges)."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 1, PRODUCER_FIXED, 0x03, 0, minimum, maximum, 0, maximum - minimum + 1)


def dword_memory(minimum: int, maximum: int, cacheable: bool = False) -> bytes:
    """DWord Address Space Descriptor (6.4.3.5.2), resource type 0: a memory window, read-write."""
    type_flags = 0x01 | (0x02 if cacheable else 0)
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, PRODUCER_FIXED, type_flags, 0, minimum, maximum, 0,
                       maximum - minimum + 1)


def resource_template(*descriptors: bytes) -> bytes:
    return buffer(b"".join(descriptors) + END_TAG)
