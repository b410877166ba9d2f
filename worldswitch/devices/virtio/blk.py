"""virtio-blk (virtio 1.2, section 5.2) on a disk image (devices/disk/: raw or qcow2).

Requests are a 16-byte header (type, reserved, sector), data buffers, and a one-byte status the
device writes last. Data moves straight between the image and guest memory (zero-copy views through
the bounds-checked accessor); FLUSH is the image's flush (fdatasync); DISCARD and WRITE_ZEROES are
offered where the image can punch holes (raw). Every sector range is checked against the capacity.
A write is completed only after the image took it, and close() syncs the image, so a power-off never
loses a write the guest saw complete.
"""

from __future__ import annotations

import os
import struct
from typing import Callable

from ...memory.guest import GuestMemory
from ...record import asdict, record
from ..disk.opener import open_disk
from . import BLOCK
from .device import VirtioDevice, VirtioLink
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


class RequestError(Exception):
    """A request the device answers with a status other than OK (the queue itself is fine)."""

    def __init__(self, status: int) -> None:
        self.status = status


@record
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

    def __init__(self, link: VirtioLink, memory: GuestMemory, path: str, read_only: bool = False,
                 serial: str | None = None, warn: Callable[[str], None] | None = None, shared: bool = False,
                 format: str | None = None) -> None:
        super().__init__(link, memory)
        self.warn = warn or (lambda text: None)
        self.failures = 0  # requests the host refused (each answered IOERR; the first one is reported)
        self.image = open_disk(path, read_only, shared, format)
        self.path = path
        self.read_only = read_only
        self.capacity = self.image.size // SECTOR
        self.serial = (serial or os.path.basename(path))[:SERIAL_LENGTH].encode()
        self.stats = BlockStats()
        self.device_features |= (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        if read_only:
            self.device_features |= 1 << VIRTIO_BLK_F_RO
        elif self.image.can_discard:
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
        self.image.close()

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
        # what the driver gives, and what it gets; in Linux's layout the header and the status byte
        # are buffers of their own, and the data's buffers are taken whole
        readable, writable = chain.readable, chain.writable
        data_in = (self._views(readable[1:]) if readable and readable[0].length == HEADER.size
                   else self._views(readable, skip=HEADER.size))
        data_out = (self._views(writable[:-1]) if writable[-1].length == 1
                    else self._views(writable, limit=chain.writable_length - 1))
        written = 0
        try:
            if kind == T_IN:
                written = self._read(sector, data_out)
            elif kind == T_OUT:
                self._write(sector, data_in)
            elif kind == T_FLUSH:
                self.image.flush()
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
        if not skip and limit is None:
            make_view = self.memory.view
            return [make_view(gpa, length) for gpa, length in buffers if length]
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
        length = sum(map(len, buffers))
        self.image.readv(buffers, self._check(sector, length))
        self.stats.reads += 1
        self.stats.bytes_read += length
        return length

    def _write(self, sector: int, buffers: list[memoryview]) -> None:
        if self.read_only:
            raise RequestError(S_IOERR)
        length = sum(map(len, buffers))
        self.image.writev(buffers, self._check(sector, length))
        self.stats.writes += 1
        self.stats.bytes_written += length

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
            if not self.image.can_discard:
                raise RequestError(S_UNSUPP)
            keep = kind == T_WRITE_ZEROES and not flags & WRITE_ZEROES_UNMAP  # zeroed in place, not unmapped
            self.image.discard(self._check(sector, count * SECTOR), count * SECTOR, zero=keep)
