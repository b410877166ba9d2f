"""Privileges the VMX gives up after set-up: a jail (chroot and another user) when started as root,
every capability, and the right to gain any back (no_new_privs). Each step is one Linux call made
through libc (capabilities(7), prctl(2), chroot(2)); Python's os module has all but capset and prctl.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from .libseccomp import SandboxError

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_CAPSET = 126  # x86-64
CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")

_libc = ctypes.CDLL(None, use_errno=True)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, argument: int = 0, third: int = 0) -> int:
    result = _libc.prctl(option, ctypes.c_ulong(argument), ctypes.c_ulong(third), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(result)


def drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets of every thread's
    future: after this not even a setuid-root program could give one back (with no_new_privs)."""
    last = int(CAP_LAST_CAP.read_text()) if CAP_LAST_CAP.exists() else 40
    for capability in range(last + 1):
        try:
            _prctl(PR_CAPBSET_DROP, capability)
        except OSError as refused:  # EPERM without CAP_SETPCAP: an unprivileged VMX has nothing to drop
            if refused.errno not in (errno.EPERM, errno.EINVAL):
                raise
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    if _libc.syscall(SYS_CAPSET, ctypes.byref(header), data) != 0:
        raise SandboxError(f"cannot drop capabilities: {os.strerror(ctypes.get_errno())}")


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def check_jail(directory: str, uid: int | None, gid: int | None) -> None:
    """Before set-up: refuse a jail that cannot be entered, with the reason."""
    if os.geteuid() != 0:
        raise SandboxError("--jail needs worldswitch started as root (it chroots and changes user)")
    if not os.path.isdir(directory):
        raise SandboxError(f"--jail {directory}: not a directory")
    if uid is None or gid is None:
        raise SandboxError("--jail needs --uid and --gid: the user the jailed VMX runs as")
    if uid == 0 or gid == 0:
        raise SandboxError("--jail: --uid and --gid must not be root's (0): the jail is for giving root up")


def enter_jail(directory: str, uid: int, gid: int) -> None:
    """chroot into `directory` and become uid:gid with no supplementary groups. The files the VM
    uses are already open; paths named later (snapshots) are inside the jail."""
    try:
        os.chroot(directory)
        os.chdir("/")
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as error:
        raise SandboxError(f"cannot enter the jail {directory} as {uid}:{gid}: {error.strerror}") from None
