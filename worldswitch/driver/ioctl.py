"""The ioctl number encoding of <asm-generic/ioctl.h>, and one checked way to call ioctl.

Numbers are built from (direction, type, number, argument size) exactly as the _IO/_IOR/_IOW/_IOWR
macros do, so a wrong structure size shows up as a size mismatch here instead of an EINVAL in KVM.
ioctl goes through libc via ctypes: the call releases the GIL (vCPU threads run in parallel) and a
signal makes it return -1/EINTR instead of being retried behind our back.
"""

from __future__ import annotations

import ctypes

from ..errors import KvmError
from ..record import record

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

KVMIO = 0xAE

_libc = ctypes.CDLL(None, use_errno=True)
libc_ioctl = _libc.ioctl
libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc_ioctl.restype = ctypes.c_int

# KVM_RUN, on the hot path of every world switch, goes through a bare prototype: no argtypes to
# check and no errno swapping (use_errno), which saves measurable time per exit on hosts where
# each exit leaves the VMX with cold caches. Its callers pass exactly (int fd, int request, None)
# and fetch errno with last_errno() only when it returned -1.
_bare_libc = ctypes.CDLL(None, use_errno=False)
kvm_run_call = _bare_libc.ioctl
kvm_run_call.restype = ctypes.c_int
_errno_location = _bare_libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)


def last_errno() -> int:
    """errno of the calling thread, as the last libc call left it."""
    return int(_errno_location().contents.value)


@record(frozen=True)
class Ioctl:
    """One ioctl request: its name (for errors), its number, and the argument type it carries."""

    name: str
    number: int
    argtype: type | None  # a ctypes type, or None for _IO requests that pass an integer

    @property
    def direction(self) -> int:
        return (self.number >> IOC_DIRSHIFT) & 0x3

    @property
    def size(self) -> int:
        return (self.number >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (direction << IOC_DIRSHIFT) | (type_ << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT) | (size << IOC_SIZESHIFT)


def IO(name: str, nr: int, type_: int = KVMIO) -> Ioctl:
    return Ioctl(name, _ioc(IOC_NONE, type_, nr, 0), None)


def IOR(name: str, nr: int, argtype: type, type_: int = KVMIO) -> Ioctl:
    return Ioctl(name, _ioc(IOC_READ, type_, nr, ctypes.sizeof(argtype)), argtype)


def IOW(name: str, nr: int, argtype: type, type_: int = KVMIO) -> Ioctl:
    return Ioctl(name, _ioc(IOC_WRITE, type_, nr, ctypes.sizeof(argtype)), argtype)


def IOWR(name: str, nr: int, argtype: type, type_: int = KVMIO) -> Ioctl:
    return Ioctl(name, _ioc(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(argtype)), argtype)


def ioctl(fd: int, request: Ioctl, arg: object = 0) -> int:
    """Issue `request` on `fd`. `arg` is an int for _IO requests, else a ctypes object of at least
    the encoded size (flexible-array structures such as kvm_cpuid2 carry their entries after it).
    Returns the ioctl's non-negative result; raises KvmError with the errno otherwise."""
    if request.argtype is None:
        if not isinstance(arg, int):
            raise TypeError(f"{request.name} takes an integer argument")
        result = libc_ioctl(fd, request.number, arg)
    else:
        if ctypes.sizeof(arg) < request.size:  # type: ignore[arg-type]
            raise TypeError(
                f"{request.name}: argument of {ctypes.sizeof(arg)} bytes, the ioctl encodes {request.size}"  # type: ignore[arg-type]
            )
        result = libc_ioctl(fd, request.number, ctypes.addressof(arg))  # type: ignore[arg-type]
    if result < 0:
        raise KvmError(request.name, ctypes.get_errno())
    return int(result)
