"""Reading a Linux bzImage (Documentation/arch/x86/boot.rst): its setup header, its protected-mode
kernel, and the compressed vmlinux inside it, which worldswitch can decompress on the host so the
guest skips its own decompressor (on PVM hosts that decompressor runs emulated, for minutes).

Only parsing and decompression happen here; placing things in guest memory is boot/linux.py's job.
"""

from __future__ import annotations

import bz2
import ctypes
import lzma
import struct
import zlib

from ..errors import GuestImageError
from ..record import record
from . import bootparams as bp

MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, and with it XLF_KERNEL_64 (the 64-bit entry point)
SECTOR = 512

# Magic numbers of the payloads arch/x86/boot/compressed can hold (what `file` and the kernel's
# own scripts/extract-vmlinux look for).
COMPRESSIONS = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("none", b"\x7fELF"),
)
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20


@record(frozen=True)
class BzImage:
    name: str
    header: bp.setup_header  # as found in the image
    header_bytes: bytes  # from 0x1f1 to the end of the header the image declares
    kernel: bytes  # the protected-mode kernel: everything after the setup sectors
    version_string: str

    @property
    def protocol(self) -> str:
        return f"{self.header.version >> 8}.{self.header.version & 0xFF:02d}"

    @property
    def payload(self) -> bytes:
        start, length = self.header.payload_offset, self.header.payload_length
        return self.kernel[start : start + length]

    @property
    def compression(self) -> str:
        start, length = self.header.payload_offset, self.header.payload_length
        for name, magic in COMPRESSIONS:
            if self.kernel.startswith(magic, start, start + length):  # not a copy of the payload's megabytes
                return name
        return "unknown"


def is_bzimage(image: bytes) -> bool:
    return len(image) > 0x210 and image[0x202:0x206] == b"HdrS"


def parse_bzimage(image: bytes, name: str = "kernel") -> BzImage:
    """Validate the setup header as a boot loader must before using a kernel."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise GuestImageError(f"{name} is not a Linux kernel (no 'HdrS' boot header); "
                              "give a bzImage (vmlinuz) or an uncompressed ELF vmlinux")
    header_end = bp.SETUP_HEADER_OFFSET + ctypes.sizeof(bp.setup_header)
    if len(image) < header_end:
        raise GuestImageError(f"{name} is cut short: {len(image)} bytes end inside its boot header "
                              f"(which ends at byte {header_end})")
    header = bp.setup_header.from_buffer_copy(image, bp.SETUP_HEADER_OFFSET)
    if header.boot_flag != bp.BOOT_FLAG:  # the file's boot sector's (GRUB does not pass it on in a zero page)
        raise GuestImageError(f"{name}: boot sector signature is {header.boot_flag:#06x}, not 0xaa55")
    check_header(header, name)
    setup_sects = header.setup_sects or 4  # boot.rst: 0 means 4
    kernel_start = (setup_sects + 1) * SECTOR
    if kernel_start >= len(image):
        raise GuestImageError(f"{name} is truncated: {setup_sects} setup sectors and nothing after them")
    # The header ends where the jump at 0x200 lands (boot.rst: "the end of the setup header can be
    # calculated from the jump instruction"); copy no further than our structure.
    header_end = min(0x202 + image[0x201], bp.SETUP_HEADER_OFFSET + ctypes.sizeof(bp.setup_header))
    kernel = image[kernel_start:]
    check_kernel_length(header, len(kernel), name)
    version = ""
    if header.kernel_version:
        at = header.kernel_version + 0x200
        version = image[at : at + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return BzImage(name, header, image[bp.SETUP_HEADER_OFFSET : header_end], kernel, version)


def check_header(header: bp.setup_header, name: str) -> None:
    """What a boot loader must check of a setup header (in a file, or in a zero page a loader filled)
    before it relies on it."""
    if header.version < MIN_PROTOCOL:
        raise GuestImageError(
            f"{name} speaks boot protocol {header.version >> 8}.{header.version & 0xff:02d}; worldswitch needs "
            "2.12 or newer (Linux 3.8+) for the 64-bit entry point"
        )
    if not header.xloadflags & bp.XLF_KERNEL_64:
        raise GuestImageError(f"{name} has no 64-bit entry point (XLF_KERNEL_64 is clear): a 32-bit kernel?")
    if not header.loadflags & bp.LOADED_HIGH:
        raise GuestImageError(f"{name} must be loaded low (loadflags.LOADED_HIGH is clear): a zImage, not a bzImage")
    alignment = header.kernel_alignment
    if alignment & (alignment - 1) or alignment < 0x1000:
        raise GuestImageError(f"{name}: kernel_alignment {alignment:#x} is not a power of two of at least 4 KiB")


def check_kernel_length(header: bp.setup_header, length: int, name: str) -> None:
    """The protected-mode kernel (`length` bytes) must hold what its header says: syssize paragraphs
    and the payload."""
    payload_end = header.payload_offset + header.payload_length
    if header.syssize * 16 > length + 15 or (header.version >= 0x0208 and payload_end > length):
        raise GuestImageError(f"{name} is truncated: the header promises {max(header.syssize * 16, payload_end)} "
                              f"bytes of kernel, the file has {length}")


def _lz4_legacy(payload: bytes, limit: int) -> bytes:
    """LZ4's legacy frame format, which the kernel uses: magic, then (u32 size, block)* where every
    block but the last unpacks to exactly 8 MiB; then the 4 bytes of size the kernel build appends.
    The format has no checksums, so its structure is all there is to check: every block must fit,
    unpack whole, and the blocks must end exactly where the appended size begins."""
    import lz4.block  # a well-kept binding of the reference implementation

    blocks: list[bytes] = []
    unpacked, position = 0, 4
    short_block = False
    while len(payload) - position > 4:  # the last 4 bytes are the appended size
        (size,) = struct.unpack_from("<I", payload, position)
        position += 4
        if size == LZ4_LEGACY_MAGIC:
            continue  # a new frame (concatenated streams)
        if position + size > len(payload) - 4:
            raise ValueError(f"a block of {size} bytes at offset {position - 4} runs past the end")
        if short_block:
            raise ValueError("a block follows one shorter than 8 MiB")
        block = lz4.block.decompress(payload[position : position + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        short_block = len(block) < LZ4_LEGACY_BLOCK
        blocks.append(block)
        unpacked += len(block)
        if unpacked > limit:
            break  # decompress() says so
        position += size
    if unpacked <= limit and position != len(payload) - 4:
        raise ValueError("the blocks do not end where the appended size begins")
    return b"".join(blocks)


def _zstd(payload: bytes, limit: int) -> bytes:
    """The first frame (the size the build appends follows it), no more than `limit` + 1 bytes of it:
    a stream reader returns no more than it is asked for, and stops at the frame's end (a read past
    it would take the appended size for a frame). A read cut short shows in the size check after."""
    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False) as reader:
        return reader.read(limit + 1)


def decompress(payload: bytes, compression: str, name: str = "kernel", limit: int = 1 << 32) -> bytes:
    """Decompress a kernel payload, stopping past `limit` bytes of output (a payload that unpacks to
    more is refused by its caller, without the host's memory spent on the rest). Trailing bytes (the
    size the kernel build appends) are ignored."""
    try:
        if compression == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload, limit + 1)
        if compression == "xz":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload, limit + 1)
        if compression == "lzma":
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload, limit + 1)
        if compression == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload, limit + 1)
        if compression == "lz4":
            return _lz4_legacy(payload, limit)
        if compression == "zstd":
            return _zstd(payload, limit)
        if compression == "none":
            return payload
    except ImportError as error:
        raise GuestImageError(f"{name}: decompressing {compression} needs the Python module {error.name}") from None
    except Exception as error:  # noqa: BLE001 - each library has its own error types (ZstdError, LZ4BlockError)
        raise GuestImageError(f"{name}: its {compression} payload is corrupt ({error})") from None
    raise GuestImageError(f"{name}: cannot decompress a {compression} payload on the host; use --decompress=guest")


def check_unpacked_size(data: bytes, payload: bytes, compression: str, init_size: int, name: str) -> None:
    """What the kernel build recorded about the payload must hold: its last 4 bytes are the unpacked
    size (gzip's own ISIZE, or the size every other format gets appended: the kernel's mkpiggy reads
    it so), and the kernel needs no more room than its header's init_size."""
    if compression == "none":
        return
    if len(data) > init_size:  # decompress() stops one byte past it
        raise GuestImageError(f"{name}: its payload unpacks to more than the {init_size} bytes its header says "
                              "the kernel needs (init_size): not a kernel this header describes")
    recorded = int.from_bytes(payload[-4:], "little")
    if len(payload) < 4 or recorded != len(data) & 0xFFFFFFFF:
        raise GuestImageError(f"{name}: its {compression} payload is corrupt: it unpacks to {len(data)} bytes, "
                              f"the kernel build recorded {recorded}")


def extract_vmlinux(kernel: BzImage) -> bytes:
    """The ELF vmlinux inside a bzImage (protocol 2.08+ describes where the payload is), decompressed
    no further than the init_size its header declares."""
    if kernel.header.version < 0x0208 or not kernel.header.payload_length:
        raise GuestImageError(f"{kernel.name}: boot protocol {kernel.protocol} does not locate its payload; "
                              "use --decompress=guest")
    init_size, payload, compression = kernel.header.init_size, kernel.payload, kernel.compression
    data = decompress(payload, compression, kernel.name, init_size)
    check_unpacked_size(data, payload, compression, init_size, kernel.name)
    if not data.startswith(b"\x7fELF"):
        raise GuestImageError(f"{kernel.name}: the decompressed {kernel.compression} payload is not an ELF vmlinux")
    return data
