"""QEMU's qcow2 image format, versions 2 and 3 (docs/interop/qcow2.txt in QEMU's source): reads and
writes, compressed clusters read, backing files (raw or qcow2, a chain of up to 16).

A guest address maps through a two-level table: the L1 entry for (address / cluster size) / (L2
entries) holds an L2 table's host offset, and the L2 entry the data cluster's. A cluster nobody
wrote reads from the backing file (or as zeros); v3's zero flag reads as zeros; compressed clusters
are raw deflate. A write to a cluster that is not this image's own, already allocated cluster
allocates one at the end of the file, fills what the write does not cover from what the guest saw
there, and then points the L2 entry at it. Every allocation is counted in the refcount blocks
before anything points at it, so a crash can only leak clusters (which `qemu-img check -r leaks`
reclaims), never corrupt the image; `qemu-img check` reports the image clean after any sequence of
complete writes (tests/test_disk.py checks it). Durability is the guest's flush (fdatasync).

What is not implemented is refused by name when the image is opened: encryption, external data
files, the zstd compression type, extended L2 entries, a dirty or corrupt image; writes to images
with internal snapshots or refcounts wider or narrower than 16 bits (the default), and growing the
refcount table (which `qemu-img convert` does).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections import OrderedDict
from typing import Callable

from ...errors import ConfigError
from .image import DiskImage
from .raw import preadv_all, pwritev_all

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes of version 2
HEADER_V3 = struct.Struct(">QQQII")  # at 72: incompatible, compatible, autoclear features, refcount order, header length
V3_HEADER_LENGTH = 104
AUTOCLEAR_AT = 88
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of an L1 or L2 entry
COPIED = 1 << 63  # the cluster's refcount is exactly 1: it may be written in place
COMPRESSED = 1 << 62
ZERO = 1  # v3: the cluster reads as zeros
REFCOUNT_OFFSET_MASK = ~0x1FF & (1 << 64) - 1

EXT_END, EXT_BACKING_FORMAT, EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
INCOMPATIBLE = {0: "the dirty bit (lazy refcounts were in use; `qemu-img check -r all` repairs it)",
                1: "the corrupt bit (`qemu-img check -r all` repairs it)", 2: "an external data file",
                3: "a compression type other than zlib", 4: "extended L2 entries (subclusters)"}
CRYPT = {1: "AES", 2: "LUKS"}
MAX_BACKING_DEPTH = 16
L2_CACHE = 64  # L2 tables kept (4 MiB with 64 KiB clusters)
REFCOUNT_ORDER = 4  # 16-bit refcounts: what qemu-img makes, and all this writer maintains


def _refuse(path: str, what: str) -> ConfigError:
    return ConfigError(f"qcow2 image {path}: {what}")


class Qcow2Image:
    format = "qcow2"
    can_discard = False

    def __init__(self, fd: int, path: str, read_only: bool,
                 open_backing: Callable[[str, str | None], DiskImage]) -> None:
        """`open_backing(path, format or None)` opens the backing file read-only (one level deeper)."""
        self.fd = fd
        self.path = path
        self.read_only = read_only
        raw = os.pread(fd, 4096, 0)
        if len(raw) < HEADER.size:
            raise _refuse(path, "too short for a header")
        (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset,
         refcount_table_offset, refcount_clusters, snapshots, _snapshots_offset) = HEADER.unpack_from(raw)
        if magic != MAGIC or version not in (2, 3):
            raise _refuse(path, f"not a qcow2 image of version 2 or 3 (version {version})")
        self.version: int = version
        self.refcount_table_offset: int = refcount_table_offset
        incompatible, autoclear, refcount_order, header_length = 0, 0, REFCOUNT_ORDER, HEADER.size
        if self.version == 3:
            if len(raw) < V3_HEADER_LENGTH:
                raise _refuse(path, "too short for a version 3 header")
            incompatible, _compatible, autoclear, refcount_order, header_length = HEADER_V3.unpack_from(raw, HEADER.size)
        for bit in range(64):
            if incompatible >> bit & 1:
                raise _refuse(path, f"has {INCOMPATIBLE.get(bit, f'unknown incompatible feature bit {bit}')}, "
                                    "which worldswitch does not implement")
        if crypt:
            raise _refuse(path, f"is encrypted ({CRYPT.get(crypt, crypt)}), which worldswitch does not implement")
        if not 9 <= cluster_bits <= 21:
            raise _refuse(path, f"has clusters of 2^{cluster_bits} bytes (qcow2 allows 2^9 to 2^21)")
        if size % 512:
            raise _refuse(path, f"has a size of {size} bytes, not a multiple of 512")
        self.cluster_bits: int = cluster_bits
        self.size: int = size
        self.cluster_size: int = 1 << cluster_bits
        self.l2_entries = self.cluster_size // 8
        needed = -(-self.size // (self.cluster_size * self.l2_entries))
        if l1_size < needed or l1_size > 1 << 22 or l1_offset % self.cluster_size:
            raise _refuse(path, f"has an L1 table of {l1_size} entries at {l1_offset:#x}; its size needs {needed}, "
                                "cluster-aligned")
        if refcount_clusters > 256 or self.refcount_table_offset % self.cluster_size:
            raise _refuse(path, "has a refcount table that is too big or not cluster-aligned")
        if not read_only:
            if snapshots:
                raise _refuse(path, f"has {snapshots} internal snapshots, which worldswitch does not write around; "
                                    "open it read-only (ro) or drop them (qemu-img snapshot -d)")
            if refcount_order != REFCOUNT_ORDER:
                raise _refuse(path, f"counts references in {1 << refcount_order}-bit entries; worldswitch writes only "
                                    "16-bit ones (open it read-only, or qemu-img convert it)")
        self.extensions = self._extensions(os.pread(fd, self.cluster_size, 0), header_length)
        if EXT_DATA_FILE in self.extensions:
            raise _refuse(path, "names an external data file, which worldswitch does not implement")
        l1 = os.pread(fd, l1_size * 8, l1_offset)
        if len(l1) != l1_size * 8:
            raise _refuse(path, "ends inside its L1 table")
        self.l1 = list(struct.unpack(f">{l1_size}Q", l1))
        self.l1_offset = l1_offset
        table = os.pread(fd, refcount_clusters * self.cluster_size, self.refcount_table_offset)
        self.refcount_table = list(struct.unpack(f">{len(table) // 8}Q", table))
        self.refcount_entries = self.cluster_size * 8 // 16
        self.end: int = -(-os.fstat(fd).st_size // self.cluster_size) * self.cluster_size  # where the next cluster goes
        self._l2: OrderedDict[int, bytearray] = OrderedDict()  # L2 tables by host offset, most recent last
        self._refcounts: dict[int, bytearray] = {}  # refcount blocks by host offset
        self._decompressed: tuple[int, bytes] | None = None
        self.backing: DiskImage | None = None
        if backing_offset:
            name = os.pread(fd, min(backing_size, 1023), backing_offset).decode(errors="replace")
            backing_path = os.path.join(os.path.dirname(os.path.abspath(path)), name)
            backing_format = self.extensions.get(EXT_BACKING_FORMAT)
            self.backing = open_backing(backing_path, backing_format.decode(errors="replace")
                                        if backing_format is not None else None)
        if autoclear and not read_only:  # features this writer would not keep up to date (bitmaps)
            os.pwrite(fd, bytes(8), AUTOCLEAR_AT)

    def _extensions(self, raw: bytes, at: int) -> dict[int, bytes]:
        """The header extensions (type -> data), which follow the header in its first cluster."""
        found: dict[int, bytes] = {}
        while at + 8 <= len(raw):
            kind, length = struct.unpack_from(">II", raw, at)
            if kind == EXT_END:
                break
            found[kind] = raw[at + 8 : at + 8 + length]
            at += 8 + (length + 7) // 8 * 8
        return found

    # --- reading -------------------------------------------------------------------------------

    def readv(self, buffers: list[memoryview], offset: int) -> None:
        self._by_cluster(buffers, offset, self._read_piece)

    def _by_cluster(self, buffers: list[memoryview], offset: int,
                    piece: Callable[[int, int, list[memoryview]], None]) -> None:
        """Call piece(address, offset in its cluster, views) for each cluster the range touches."""
        done, length = 0, sum(len(view) for view in buffers)
        while done < length:
            at = offset + done
            within = at & (self.cluster_size - 1)
            count = min(self.cluster_size - within, length - done)
            piece(at, within, _slices(buffers, done, count))
            done += count

    def _read_piece(self, at: int, within: int, views: list[memoryview]) -> None:
        entry = self._l2_entry(at >> self.cluster_bits)
        host = entry & OFFSET_MASK
        if entry & COMPRESSED:
            data = self._decompress(entry)
            _scatter(views, data[within:])
        elif self.version == 3 and entry & ZERO:
            _scatter(views, None)
        elif host:
            preadv_all(self.fd, views, host + within)
        else:
            self._read_below(at, views)

    def _read_below(self, at: int, views: list[memoryview]) -> None:
        """What the backing file has there (zeros beyond it, or with none)."""
        length = sum(len(view) for view in views)
        if self.backing is None or at >= self.backing.size:
            _scatter(views, None)
            return
        inside = min(length, self.backing.size - at)
        self.backing.readv(_slices(views, 0, inside), at)
        if inside < length:
            _scatter(_slices(views, inside, length - inside), None)

    def _compressed_extent(self, entry: int) -> tuple[int, int]:
        """(host offset, length) of a compressed cluster's deflate stream: its L2 entry holds the offset
        and how many 512-byte sectors beyond the first it reaches into."""
        shift = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << shift) - 1)
        sectors = (entry >> shift) & ((1 << (62 - shift)) - 1)
        return host, (sectors + 1) * 512 - (host & 511)

    def _decompress(self, entry: int) -> bytes:
        if self._decompressed is not None and self._decompressed[0] == entry:
            return self._decompressed[1]
        host, length = self._compressed_extent(entry)
        data = os.pread(self.fd, length, host)
        try:
            cluster = zlib.decompressobj(-12).decompress(data, self.cluster_size)
        except zlib.error as error:
            raise OSError(errno.EIO, f"a compressed cluster does not inflate: {error}") from None
        if len(cluster) != self.cluster_size:
            raise OSError(errno.EIO, "a compressed cluster inflates to the wrong size")
        self._decompressed = (entry, cluster)
        return cluster

    def _l2_entry(self, cluster: int) -> int:
        index = cluster // self.l2_entries
        if index >= len(self.l1):
            raise OSError(errno.EIO, "an address beyond the image's L1 table")
        table_offset = self.l1[index] & OFFSET_MASK
        if not table_offset:
            return 0
        table = self._l2_table(table_offset)
        return int(struct.unpack_from(">Q", table, (cluster % self.l2_entries) * 8)[0])

    def _l2_table(self, offset: int) -> bytearray:
        table = self._l2.get(offset)
        if table is None:
            table = self._metadata_cluster(offset, "an L2 table")
            self._l2[offset] = table
            if len(self._l2) > L2_CACHE:
                self._l2.popitem(last=False)
        else:
            self._l2.move_to_end(offset)
        return table

    # --- writing -------------------------------------------------------------------------------

    def writev(self, buffers: list[memoryview], offset: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "the image is read-only")
        self._by_cluster(buffers, offset, self._write_piece)

    def _write_piece(self, at: int, within: int, views: list[memoryview]) -> None:
        cluster = at >> self.cluster_bits
        entry = self._l2_entry(cluster)
        compressed = bool(entry & COMPRESSED)
        host = 0 if compressed else entry & OFFSET_MASK
        zeroed = self.version == 3 and bool(entry & ZERO)
        if host and not entry & COPIED:
            raise OSError(errno.EIO, "a cluster shared with another reference (a snapshot?) would need copying")
        if host and not zeroed:
            pwritev_all(self.fd, views, host + within)  # this image's own cluster: in place
            return
        # The whole cluster: what the guest saw there, with the write laid over it, in a cluster of
        # this image's own (a preallocated zero cluster's, or a new one).
        length = sum(len(view) for view in views)
        content = bytearray(self.cluster_size)
        if within or length < self.cluster_size:
            self._read_piece(cluster << self.cluster_bits, 0, [memoryview(content)])
        _gather(views, memoryview(content)[within : within + length])
        target = host or self._allocate()
        os.pwrite(self.fd, content, target)
        self._set_l2_entry(cluster, target | COPIED)
        if compressed:
            self._release_compressed(entry)

    def _release_compressed(self, entry: int) -> None:
        """A compressed cluster no longer referenced: one reference less on each host cluster it lay in."""
        host, length = self._compressed_extent(entry)
        last = host + length - 1
        for cluster_offset in range(host & ~(self.cluster_size - 1), last + 1, self.cluster_size):
            self._set_refcount(cluster_offset, max(0, self._refcount(cluster_offset) - 1))

    def _set_l2_entry(self, cluster: int, value: int) -> None:
        index = cluster // self.l2_entries
        table_offset = self.l1[index] & OFFSET_MASK
        if not table_offset:
            table_offset = self._allocate()
            os.pwrite(self.fd, bytes(self.cluster_size), table_offset)
            self._l2[table_offset] = bytearray(self.cluster_size)
            self.l1[index] = table_offset | COPIED
            os.pwrite(self.fd, struct.pack(">Q", self.l1[index]), self.l1_offset + index * 8)
        elif not self.l1[index] & COPIED:
            raise OSError(errno.EIO, "an L2 table shared with another reference (a snapshot?) would need copying")
        table = self._l2_table(table_offset)
        at = (cluster % self.l2_entries) * 8
        struct.pack_into(">Q", table, at, value)
        os.pwrite(self.fd, table[at : at + 8], table_offset + at)

    def _allocate(self) -> int:
        """A cluster at the end of the file, counted (refcount 1) before anything points at it."""
        offset = self.end
        self.end += self.cluster_size
        self._set_refcount(offset, 1)
        return offset

    def _refcount_block(self, offset: int, create: bool) -> tuple[int, int] | None:
        """(host offset of the refcount block covering the cluster at `offset`, index in it)."""
        index = offset >> self.cluster_bits
        table_index, block_index = divmod(index, self.refcount_entries)
        if table_index >= len(self.refcount_table):
            raise OSError(errno.ENOSPC, "the image's refcount table is full (worldswitch does not grow it; "
                                        "qemu-img convert makes a roomier image)")
        block = self.refcount_table[table_index] & REFCOUNT_OFFSET_MASK
        if not block:
            if not create:
                return None
            block = self.end
            self.end += self.cluster_size
            content = bytearray(self.cluster_size)
            own_table, own_index = divmod(block >> self.cluster_bits, self.refcount_entries)
            if own_table == table_index:  # the new block counts itself
                struct.pack_into(">H", content, own_index * 2, 1)
            os.pwrite(self.fd, content, block)
            self._refcounts[block] = content
            if own_table != table_index:
                self._set_refcount(block, 1)
            self.refcount_table[table_index] = block
            os.pwrite(self.fd, struct.pack(">Q", block), self.refcount_table_offset + table_index * 8)
        return block, block_index

    def _refcount(self, offset: int) -> int:
        found = self._refcount_block(offset, create=False)
        if found is None:
            return 0
        block, index = found
        return int(struct.unpack_from(">H", self._block(block), index * 2)[0])

    def _set_refcount(self, offset: int, value: int) -> None:
        found = self._refcount_block(offset, create=True)
        assert found is not None
        block, index = found
        content = self._block(block)
        struct.pack_into(">H", content, index * 2, value)
        os.pwrite(self.fd, content[index * 2 : index * 2 + 2], block + index * 2)

    def _block(self, offset: int) -> bytearray:
        content = self._refcounts.get(offset)
        if content is None:
            content = self._refcounts[offset] = self._metadata_cluster(offset, "a refcount block")
        return content

    def _metadata_cluster(self, offset: int, what: str) -> bytearray:
        content = bytearray(os.pread(self.fd, self.cluster_size, offset))
        if len(content) != self.cluster_size:
            raise OSError(errno.EIO, f"{what} beyond the end of the image")
        return content

    # --- the rest of the DiskImage protocol ----------------------------------------------------

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int, zero: bool) -> None:
        raise OSError(errno.EOPNOTSUPP, "discard on qcow2")  # never offered: can_discard is False

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1
        if self.backing is not None:
            self.backing.close()
            self.backing = None


def _slices(buffers: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The views covering bytes [start, start + length) of the buffers laid end to end."""
    out = []
    for view in buffers:
        if start >= len(view):
            start -= len(view)
            continue
        piece = view[start : start + length]
        out.append(piece)
        length -= len(piece)
        start = 0
        if not length:
            break
    return out


def _scatter(views: list[memoryview], data: bytes | None) -> None:
    """Copy `data` (None: zeros) into the views, in order."""
    at = 0
    for view in views:
        view[:] = bytes(len(view)) if data is None else data[at : at + len(view)]
        at += len(view)


def _gather(views: list[memoryview], into: memoryview) -> None:
    at = 0
    for view in views:
        into[at : at + len(view)] = view
        at += len(view)


def create_qcow2(path: str, size: int, cluster_bits: int = 16) -> None:
    """A new, empty version 3 image of `size` bytes, laid out as qemu-img lays it out: header,
    refcount table, one refcount block, L1 table. Refuses to replace an existing file."""
    if size <= 0 or size % 512:
        raise ConfigError(f"a disk's size must be a positive multiple of 512 bytes, not {size}")
    cluster = 1 << cluster_bits
    l1_size = -(-size // (cluster * (cluster // 8)))
    l1_clusters = max(1, -(-l1_size * 8 // cluster))
    clusters = 3 + l1_clusters
    if clusters > cluster * 8 // 16:
        raise ConfigError(f"a disk of {size} bytes needs a bigger first refcount block than this writer makes")
    image = bytearray(clusters * cluster)
    HEADER.pack_into(image, 0, MAGIC, 3, 0, 0, cluster_bits, size, 0, l1_size, 3 * cluster, cluster, 1, 0, 0)
    HEADER_V3.pack_into(image, HEADER.size, 0, 0, 0, REFCOUNT_ORDER, V3_HEADER_LENGTH)
    struct.pack_into(">Q", image, cluster, 2 * cluster)  # the refcount table's one block
    for index in range(clusters):
        struct.pack_into(">H", image, 2 * cluster + index * 2, 1)
    try:
        with open(path, "xb") as file:
            file.write(image)
    except FileExistsError:
        raise ConfigError(f"{path} exists; worldswitch does not overwrite it") from None
    except OSError as error:
        raise ConfigError(f"cannot create {path}: {error.strerror}") from None
