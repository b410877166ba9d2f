"""libseccomp, bound through ctypes: the eight functions the VMX's filters and reports need.

libseccomp compiles rules into the BPF program the kernel runs on every system call, with the
architecture checks, the x86-64/x32 split and 64-bit argument comparisons done right; we never write
BPF by hand. We bind it ourselves, as we bind KVM's ioctls and libc, because both ready-made Python
bindings cost more than they give here:
- `pyseccomp` (pip) finds the library with `ctypes.util.find_library`, which on Linux runs
  `/sbin/ldconfig -p` in a child process, twice per import (libc, then libseccomp): about 6.5 ms of
  every `worldswitch run`, over a tenth of its start-up (measured 2026-12-01);
- `python3-seccomp`, libseccomp's own binding, is built for Debian's system Python only.
The library is loaded by its soname, which the dynamic loader resolves without a child process; its
API (`seccomp.h`, stable since libseccomp 2.0) is what the names and numbers below mirror.
"""

from __future__ import annotations

import ctypes
import os

from ..errors import WorldswitchError
from ..record import record

SONAME = "libseccomp.so.2"


class SandboxError(WorldswitchError):
    """The sandbox asked for cannot be set up on this host: here, libseccomp is missing; the jail and
    the privileges raise it too (privileges.py). Defined at the bottom of the package, so that every
    part raises the one error the session reports."""


# Filter actions (SCMP_ACT_*, seccomp.h): what the kernel does with a call a rule matches.
KILL_PROCESS = 0x80000000
TRAP = 0x00030000
ALLOW = 0x7FFF0000


def errno_action(number: int) -> int:
    """SCMP_ACT_ERRNO: the call fails with this errno."""
    return 0x00050000 | (number & 0xFFFF)


# Argument comparisons (enum scmp_compare).
EQ = 4
MASKED_EQ = 7

# Filter attributes (enum scmp_filter_attr).
ATTR_CTL_NNP = 3  # set no_new_privs when the filter is loaded
ATTR_CTL_TSYNC = 4  # load it on every thread of the process at once

ARCH_NATIVE = 0  # SCMP_ARCH_NATIVE


@record(frozen=True)
class Arg:
    """A condition on one argument (struct scmp_arg_cmp): with MASKED_EQ, (arg & a) == b; with EQ, arg == a."""
    number: int  # which argument, from 0
    op: int
    a: int
    b: int = 0


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _load() -> ctypes.CDLL:
    try:
        library = ctypes.CDLL(SONAME, use_errno=True)
    except OSError as error:
        raise SandboxError(f"cannot load {SONAME} (install libseccomp2, or run with --no-sandbox): "
                                 f"{error}") from None
    library.seccomp_init.argtypes = (ctypes.c_uint32,)
    library.seccomp_init.restype = ctypes.c_void_p
    library.seccomp_release.argtypes = (ctypes.c_void_p,)
    library.seccomp_release.restype = None
    library.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCmp))
    library.seccomp_rule_add_array.restype = ctypes.c_int
    library.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    library.seccomp_attr_set.restype = ctypes.c_int
    library.seccomp_load.argtypes = (ctypes.c_void_p,)
    library.seccomp_load.restype = ctypes.c_int
    library.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    library.seccomp_syscall_resolve_name.restype = ctypes.c_int
    # The name comes back in memory the caller frees: a void pointer, so ctypes does not copy and lose it.
    library.seccomp_syscall_resolve_num_arch.argtypes = (ctypes.c_uint32, ctypes.c_int)
    library.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
    library.seccomp_version.argtypes = ()
    library.seccomp_version.restype = ctypes.c_void_p
    return library


_library: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.free.argtypes = (ctypes.c_void_p,)
_libc.free.restype = None


def library() -> ctypes.CDLL:
    """libseccomp, loaded on first use (a host without it can still run with --no-sandbox)."""
    global _library
    if _library is None:
        _library = _load()
    return _library


def version() -> str:
    """The loaded libseccomp's version, as `major.minor.micro`."""
    pointer = library().seccomp_version()
    major, minor, micro = (ctypes.c_uint * 3).from_address(pointer)
    return f"{major}.{minor}.{micro}"


def _check(result: int, what: str) -> None:
    # libseccomp returns a negative errno on failure
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")


class Filter:
    """One seccomp filter being built (a libseccomp context): rules, attributes, then load()."""

    def __init__(self, default_action: int) -> None:
        self._library = library()
        self._context = self._library.seccomp_init(default_action)
        if not self._context:
            raise OSError(0, "seccomp_init failed")

    def add_rule(self, action: int, call: str, *conditions: Arg) -> None:
        number = self._library.seccomp_syscall_resolve_name(call.encode())
        if number == -1:  # __NR_SCMP_ERROR
            raise ValueError(f"libseccomp does not know the system call {call!r}")
        array = (_ArgCmp * max(1, len(conditions)))(*(_ArgCmp(c.number, c.op, c.a, c.b) for c in conditions))
        _check(self._library.seccomp_rule_add_array(self._context, action, number, len(conditions), array),
               f"seccomp rule for {call}")

    def set_attribute(self, attribute: int, value: int) -> None:
        _check(self._library.seccomp_attr_set(self._context, attribute, value), "seccomp attribute")

    def load(self) -> None:
        """Install the filter in the kernel for this thread (or the process, with ATTR_CTL_TSYNC)."""
        _check(self._library.seccomp_load(self._context), "seccomp_load")

    def __del__(self) -> None:
        context, self._context = getattr(self, "_context", None), None
        if context:
            self._library.seccomp_release(context)


def syscall_name(number: int) -> str | None:
    """The native architecture's name for a system call number, or None if libseccomp knows none."""
    pointer = library().seccomp_syscall_resolve_num_arch(ARCH_NATIVE, number)
    if not pointer:
        return None
    try:
        return ctypes.string_at(pointer).decode()
    finally:
        _libc.free(pointer)
