"""A raw image: the guest's disk byte for byte, in a regular file or a block device. Reads are
preadv and writes pwritev straight between the file and the guest's buffers; discards punch holes
and write-zeroes zero ranges with fallocate."""

from __future__ import annotations

import ctypes
import errno
import os

from ...errors import ConfigError
from .image import QCOW2_MAGIC

SECTOR = 512
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SIGNATURES = (QCOW2_MAGIC,)  # what a probed raw image's guest may not write at offset 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def tail(buffers: list[memoryview], skip: int) -> list[memoryview]:
    """The buffers after their first `skip` bytes (a short preadv/pwritev resumes here)."""
    out = []
    for view in buffers:
        if skip >= len(view):
            skip -= len(view)
            continue
        out.append(view[skip:])
        skip = 0
    return out


def preadv_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    length = sum(map(len, buffers))
    done = 0
    while done < length:  # the buffers themselves the first time (256 of them for a 1 MiB request)
        got = os.preadv(fd, tail(buffers, done) if done else buffers, offset + done)
        if got == 0:
            raise OSError(errno.EIO, "the image ends early")
        done += got


def pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    length = sum(map(len, buffers))
    done = 0
    while done < length:
        done += os.pwritev(fd, tail(buffers, done) if done else buffers, offset + done)


class RawImage:
    format = "raw"
    can_discard = True

    def __init__(self, fd: int, path: str, read_only: bool, probed: bool) -> None:
        """`probed`: nobody said the image is raw, so its guest may not make it look like another format."""
        size = os.lseek(fd, 0, os.SEEK_END)  # a block device's st_size is 0
        if size % SECTOR:
            raise ConfigError(f"disk image {path} is {size} bytes, not a multiple of {SECTOR}")
        self.fd = fd
        self.path = path
        self.read_only = read_only
        self.probed = probed
        self.size = size

    def readv(self, buffers: list[memoryview], offset: int) -> None:
        preadv_all(self.fd, buffers, offset)

    def writev(self, buffers: list[memoryview], offset: int) -> None:
        if self.probed and offset == 0:
            head = b"".join(bytes(view[:8]) for view in buffers[:8])
            if any(head.startswith(signature) for signature in SIGNATURES):
                raise OSError(errno.EPERM, "a guest may not write an image format's signature into the first "
                                           "sector of a raw image whose format was probed (name it: format=raw)")
        pwritev_all(self.fd, buffers, offset)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int, zero: bool) -> None:
        mode = (FALLOC_FL_ZERO_RANGE if zero else FALLOC_FL_PUNCH_HOLE) | FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, offset, length) != 0:
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(ctypes.get_errno(), "fallocate")
            os.pwrite(self.fd, bytes(length), offset)  # a file system without holes

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1
