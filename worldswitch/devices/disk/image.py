"""What every disk image offers a device (DiskImage), and opening an image file."""


from __future__ import annotations

import os
import stat
from typing import Protocol

from ...errors import ConfigError
from .image_lock import lock_image

QCOW2_MAGIC = b"QFI\xfb"


class DiskImage(Protocol):
    path: str
    format: str
    size: int  # bytes the guest sees
    read_only: bool
    can_discard: bool  # discard and write-zeroes are offered (the image can punch holes)

    def readv(self, buffers: list[memoryview], offset: int) -> None:
        """Fill `buffers` from the guest's view of the disk at `offset` (all of them, or OSError)."""

    def writev(self, buffers: list[memoryview], offset: int) -> None:
        """Write `buffers` at `offset`: done once this returns, durable after flush()."""

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int, zero: bool) -> None:
        """Make the range read as zeros: kept allocated (zero=True) or let go (zero=False, a hole)."""

    def close(self) -> None:
        """Make completed writes durable and let the image go."""


def open_file(path: str, read_only: bool, shared: bool = False) -> int:
    """A descriptor on a regular file or block device, locked the way QEMU locks images."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise ConfigError(f"cannot open disk image {path}: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ConfigError(f"disk image {path} is not a file or a block device")
        os.set_blocking(fd, True)
        lock_image(fd, path, read_only, share_writes=shared)
    except ConfigError:
        os.close(fd)
        raise
    return fd


def probe(fd: int) -> str:
    """The format an image's first bytes announce."""
    return "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"
