"""Disk image locks, the way QEMU takes them, so that worldswitch and QEMU (and two worldswitch VMs,
or one VM given the same image twice) never write one image at the same time.

QEMU's file-posix driver (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes) holds a
shared open-file-description lock on byte 100 + i for each permission i it uses, and on byte 200 + i
for each permission it does not let others have. Before that it tests, with an exclusive lock, that
nobody has excluded what it needs (bytes 200 + i) and that nobody uses what it excludes (bytes 100 +
i). OFD locks (fcntl F_OFD_SETLK) belong to the open file, not the process, so two opens in one
process conflict as two processes would, and they go when the descriptor closes.
"""

from __future__ import annotations

import fcntl
import os
import struct

from ...errors import ConfigError

PERM_BASE, SHARED_BASE = 100, 200
# QEMU's BLK_PERM_* bits, in bit order (include/block/block-common.h)
PERMISSIONS = ("consistent read", "write", "write unchanged", "resize")
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 1, 2, 4, 8
ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE
FLOCK = struct.Struct("hhqqi4x")  # struct flock on x86-64: type, whence, start, len, pid


def _lock(fd: int, command: int, kind: int, byte: int) -> int:
    """fcntl on one byte; the lock type fcntl found in the way (F_UNLCK if none) for F_OFD_GETLK."""
    answer = fcntl.fcntl(fd, command, FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return int(FLOCK.unpack(answer)[0])


def lock_image(fd: int, path: str, read_only: bool, share_writes: bool = False) -> None:
    """Take the locks QEMU would for a virtio disk: a writer uses consistent reads and writes and lets
    others only read; a reader lets others write only if `share_writes` (the user's explicit choice)."""
    used = CONSISTENT_READ if read_only else CONSISTENT_READ | WRITE
    shared = CONSISTENT_READ | WRITE_UNCHANGED | ((WRITE | RESIZE) if share_writes else 0)
    try:
        for bit, name in enumerate(PERMISSIONS):
            if used & 1 << bit and _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + bit) != fcntl.F_UNLCK:
                raise ConfigError(f"disk image {path} is in use: another process does not let others {name} it")
            if not shared & 1 << bit and _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + bit) != fcntl.F_UNLCK:
                raise ConfigError(f"disk image {path} is in use: another process may {name} it" +
                                  ("" if not read_only else " (to read it anyway while it changes: ro,shared)"))
        for bit in range(len(PERMISSIONS)):
            if used & 1 << bit:
                _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + bit)
            if not shared & 1 << bit:
                _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + bit)
    except OSError as error:  # a file system without locks (some network ones): say so, do not guess
        raise ConfigError(f"cannot lock disk image {path}: {error.strerror}") from None
