"""kvm_run decoded into small typed exits.

The run loop's hot path reads the few kvm_run fields it needs directly (vmm/runloop.py); everything
else (tracing, error reports, tests, rare exits) uses decode_exit, which names each exit explicitly.
The exits are NamedTuples, not frozen dataclasses: on CPython 3.11 a frozen dataclass costs about
0.7 ms to define (six generated methods, each compiled), and these twelve were the largest part of
importing the run loop, which every `worldswitch run` pays before its guest's first instruction.
"""

from __future__ import annotations

from typing import NamedTuple

from . import structs as s
from .constants import (KVM_EXIT_IO_OUT, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, ExitReason, InternalError,
                        SystemEvent)


class IoIn(NamedTuple):
    port: int
    size: int
    rep_count: int  # kvm_run's io.count: accesses of `size` bytes (a rep ins makes several)


class IoOut(NamedTuple):
    port: int
    size: int
    rep_count: int
    data: bytes


class MmioRead(NamedTuple):
    addr: int
    len: int


class MmioWrite(NamedTuple):
    addr: int
    data: bytes


class Hlt(NamedTuple):
    pass


class Shutdown(NamedTuple):
    """Triple fault (or a guest shutdown KVM could not turn into a system event)."""


class SystemEventExit(NamedTuple):
    type: int
    data: tuple[int, ...]

    @property
    def name(self) -> str:
        try:
            return SystemEvent(self.type).name.lower()
        except ValueError:
            return f"event {self.type}"


class FailEntry(NamedTuple):
    hardware_entry_failure_reason: int
    cpu: int


class InternalErrorExit(NamedTuple):
    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes  # empty unless KVM reported the failing instruction

    @property
    def name(self) -> str:
        try:
            return InternalError(self.suberror).name.lower()
        except ValueError:
            return f"suberror {self.suberror}"


class Intr(NamedTuple):
    """KVM_RUN returned EINTR: a signal or immediate_exit brought the vCPU back to the VMX."""


class DebugExit(NamedTuple):
    exception: int
    pc: int
    dr6: int
    dr7: int


class UnknownExit(NamedTuple):
    reason: int
    hardware_exit_reason: int


Exit = (
    IoIn | IoOut | MmioRead | MmioWrite | Hlt | Shutdown | SystemEventExit | FailEntry | InternalErrorExit | Intr
    | DebugExit | UnknownExit
)


def decode_exit(reason: int, run: s.kvm_run, run_page: memoryview | bytes) -> Exit:
    """Decode the exit KVM just reported. `run_page` is the whole kvm_run mapping (port I/O data
    lives at io.data_offset inside it)."""
    if reason == ExitReason.IO:
        io = run.io
        if io.direction == KVM_EXIT_IO_OUT:
            start = io.data_offset
            return IoOut(io.port, io.size, io.count, bytes(run_page[start : start + io.size * io.count]))
        return IoIn(io.port, io.size, io.count)
    if reason == ExitReason.MMIO:
        mmio = run.mmio
        length = min(mmio.len, 8)
        if mmio.is_write:
            return MmioWrite(mmio.phys_addr, bytes(mmio.data[:length]))
        return MmioRead(mmio.phys_addr, length)
    if reason == ExitReason.HLT:
        return Hlt()
    if reason == ExitReason.SHUTDOWN:
        return Shutdown()
    if reason == ExitReason.SYSTEM_EVENT:
        event = run.system_event
        return SystemEventExit(event.type, tuple(event.data[: min(event.ndata, 16)]))
    if reason == ExitReason.FAIL_ENTRY:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == ExitReason.INTERNAL_ERROR:
        internal = run.internal
        ndata = min(internal.ndata, 16)
        insn = b""
        failure = run.emulation_failure
        if (
            internal.suberror == InternalError.EMULATION
            and ndata >= 3
            and failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        ):
            insn = bytes(failure.insn_bytes[: min(failure.insn_size, 15)])
        return InternalErrorExit(internal.suberror, tuple(internal.data[:ndata]), insn)
    if reason == ExitReason.INTR:
        return Intr()
    if reason == ExitReason.DEBUG:
        arch = run.debug.arch
        return DebugExit(arch.exception, arch.pc, arch.dr6, arch.dr7)
    return UnknownExit(reason, run.hw.hardware_exit_reason)
