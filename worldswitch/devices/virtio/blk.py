"""virtio-blk (virtio 1.2, section 5.2) on a raw image file.

Requests are a 16-byte header (type, reserved, sector), data buffers, and a one-byte status the
device writes last. Reads are preadv and writes pwritev straight between the file and guest memory
(zero-copy views through the bounds-checked accessor); FLUSH is fdatasync; DISCARD punches holes
and WRITE_ZEROES zeroes ranges with fallocate. Every sector range is checked against the capacity.
A write is completed only after pwritev returned, and close() syncs the file, so a power-off never
loses a write the guest saw complete.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from dataclasses import asdict, dataclass
from typing import Callable

from ...errors import ConfigError
from ...memory.guest import GuestMemory
from . import BLOCK
from .device import VirtioDevice, VirtioLink
from .image_lock import lock_image
from .queue import Buffer, DescriptorChain, VirtqueueError

SECTOR = 512
HEADER = struct.Struct("<IIQ")
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
SERIAL_LENGTH = 20

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_UNMAP = 1

SEG_MAX = 254
MAX_SEGMENTS = 64  # discard / write-zeroes segments per request
MAX_SECTORS = 1 << 22  # per discard / write-zeroes segment (2 GiB)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class RequestError(Exception):
    """A request the device answers with a status other than OK (the queue itself is fine)."""

    def __init__(self, status: int) -> None:
        self.status = status


@dataclass
class BlockStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0


class VirtioBlock(VirtioDevice):
    device_type = BLOCK
    name = "virtio-blk"
    queue_sizes = (256,)

    def __init__(self, link: VirtioLink, memory: GuestMemory, path: str, read_only: bool = False, serial: str | None = None,
                 warn: Callable[[str], None] | None = None, shared: bool = False) -> None:
        super().__init__(link, memory)
        self.warn = warn or (lambda text: None)
        self.failures = 0  # requests the host refused (each answered IOERR; the first one is reported)
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
            self.fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as error:
            raise ConfigError(f"cannot open disk image {path}: {error.strerror}") from None
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self.fd)
            raise ConfigError(f"disk image {path} is not a file or a block device")
        os.set_blocking(self.fd, True)
        try:
            lock_image(self.fd, path, read_only, share_writes=shared)
        except ConfigError:
            os.close(self.fd)
            raise
        size = os.lseek(self.fd, 0, os.SEEK_END)  # a block device's st_size is 0
        if size % SECTOR:
            os.close(self.fd)
            raise ConfigError(f"disk image {path} is {size} bytes, not a multiple of {SECTOR}")
        self.path = path
        self.read_only = read_only
        self.capacity = size // SECTOR
        self.serial = (serial or os.path.basename(path))[:SERIAL_LENGTH].encode()
        self.stats = BlockStats()
        self.device_features |= (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        if read_only:
            self.device_features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.device_features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)

    def config(self) -> bytes:
        """struct virtio_blk_config up to write_zeroes_may_unmap (5.2.4), 60 bytes."""
        return CONFIG.pack(
            self.capacity, 0, SEG_MAX,  # 0: capacity, 8: size_max, 12: seg_max
            0, 0, 0,  # 16: geometry (cylinders, heads, sectors)
            SECTOR,  # 20: blk_size
            0, 0, 0, 0,  # 24: topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size)
            0, 0, 1,  # 32: writeback, unused0, num_queues
            MAX_SECTORS, MAX_SEGMENTS, 1,  # 36: max_discard_sectors, max_discard_seg, discard_sector_alignment
            MAX_SECTORS, MAX_SEGMENTS, 1,  # 48: max_write_zeroes_sectors, max_write_zeroes_seg; 56: may_unmap
        )

    def counters(self) -> dict[str, int]:
        return {**super().counters(), **asdict(self.stats)}

    def close(self) -> None:
        if self.fd >= 0:
            if not self.read_only:
                os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = -1

    # --- requests ----------------------------------------------------------------------------

    def process(self, index: int) -> None:
        queue = self.queues[index]
        assert queue is not None
        while True:
            while (chain := queue.pop()) is not None:
                written = self._request(chain)
                self.complete(queue, index, chain.head, written)
            if not self.finish_batch(queue, index):
                return

    def _request(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written to the driver's buffers."""
        if not chain.writable or chain.writable[-1].length < 1:
            raise VirtqueueError("a block request without room for its status byte")
        status_buffer = chain.writable[-1]
        status_at = status_buffer.gpa + status_buffer.length - 1
        if chain.readable and chain.readable[0].length >= HEADER.size:  # the usual layout: one header buffer
            kind, _reserved, sector = self.memory.unpack(HEADER, chain.readable[0].gpa)
        else:
            header = b"".join(bytes(self.memory.view(b.gpa, b.length)) for b in chain.readable)[: HEADER.size]
            if len(header) < HEADER.size:
                raise VirtqueueError("a block request shorter than its 16-byte header")
            kind, _reserved, sector = HEADER.unpack(header)
        data_in = self._views(chain.readable, skip=HEADER.size)  # what the driver gives
        data_out = self._views(chain.writable, limit=chain.writable_length - 1)  # what it gets
        written = 0
        try:
            if kind == T_IN:
                written = self._read(sector, data_out)
            elif kind == T_OUT:
                self._write(sector, data_in)
            elif kind == T_FLUSH:
                if not self.read_only:
                    os.fdatasync(self.fd)
                self.stats.flushes += 1
            elif kind == T_GET_ID:
                written = self._copy_out(self.serial.ljust(SERIAL_LENGTH, b"\0"), data_out)
            elif kind in (T_DISCARD, T_WRITE_ZEROES):
                self._discard_or_zero(kind, b"".join(bytes(v) for v in data_in))
            else:
                raise RequestError(S_UNSUPP)
            status = S_OK
        except RequestError as error:
            status, written = error.status, 0
            self.stats.errors += 1
        except OSError as error:  # the host refused (a full disk, EIO): the guest gets the error, the VM goes on
            status, written = S_IOERR, 0
            self.stats.errors += 1
            self.failures += 1
            if self.failures == 1:
                self.warn(f"{self.name} ({self.path}): the host refused a request: {error.strerror or error}; "
                          "the guest gets I/O errors for this and any like it")
        self.memory.write_int(status_at, 1, status)
        return written + 1

    def _views(self, buffers: list[Buffer], skip: int = 0, limit: int | None = None) -> list[memoryview]:
        views, budget = [], limit
        for buffer in buffers:
            view = self.memory.view(buffer.gpa, buffer.length)
            if skip:
                cut = min(skip, len(view))
                view, skip = view[cut:], skip - cut
            if budget is not None:
                view, budget = view[:budget], budget - min(budget, len(view))
            if len(view):
                views.append(view)
        return views

    def _check(self, sector: int, length: int) -> int:
        if length % SECTOR:
            raise RequestError(S_IOERR)
        if sector > self.capacity or length // SECTOR > self.capacity - sector:
            raise RequestError(S_IOERR)
        return sector * SECTOR

    def _read(self, sector: int, buffers: list[memoryview]) -> int:
        length = sum(len(b) for b in buffers)
        offset = self._check(sector, length)
        done = 0
        while done < length:
            got = os.preadv(self.fd, self._tail(buffers, done), offset + done)
            if got == 0:
                raise RequestError(S_IOERR)
            done += got
        self.stats.reads += 1
        self.stats.bytes_read += length
        return length

    def _write(self, sector: int, buffers: list[memoryview]) -> None:
        if self.read_only:
            raise RequestError(S_IOERR)
        length = sum(len(b) for b in buffers)
        offset = self._check(sector, length)
        done = 0
        while done < length:
            done += os.pwritev(self.fd, self._tail(buffers, done), offset + done)
        self.stats.writes += 1
        self.stats.bytes_written += length

    @staticmethod
    def _tail(buffers: list[memoryview], skip: int) -> list[memoryview]:
        """The buffers after the first `skip` bytes (a short preadv/pwritev resumes here)."""
        out = []
        for view in buffers:
            if skip >= len(view):
                skip -= len(view)
                continue
            out.append(view[skip:])
            skip = 0
        return out

    @staticmethod
    def _copy_out(data: bytes, buffers: list[memoryview]) -> int:
        done = 0
        for view in buffers:
            chunk = data[done : done + len(view)]
            view[: len(chunk)] = chunk
            done += len(chunk)
            if done == len(data):
                break
        return done

    def _discard_or_zero(self, kind: int, payload: bytes) -> None:
        if self.read_only:
            raise RequestError(S_IOERR)
        if not payload or len(payload) % SEGMENT.size or len(payload) // SEGMENT.size > MAX_SEGMENTS:
            raise RequestError(S_UNSUPP)
        for at in range(0, len(payload), SEGMENT.size):
            sector, count, flags = SEGMENT.unpack_from(payload, at)
            if count > MAX_SECTORS or flags & ~WRITE_ZEROES_UNMAP or (kind == T_DISCARD and flags):
                raise RequestError(S_UNSUPP)
            offset = self._check(sector, count * SECTOR)
            if kind == T_DISCARD or flags & WRITE_ZEROES_UNMAP:
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            else:
                mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            if _libc.fallocate(self.fd, mode, offset, count * SECTOR) != 0:
                if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise OSError(ctypes.get_errno(), "fallocate")
                os.pwrite(self.fd, bytes(count * SECTOR), offset)  # a file system without holes
