"""kvm_run decoded into small typed exits.

The run loop's hot path reads the few kvm_run fields it needs directly (vmm/runloop.py); everything
else (tracing, error reports, tests, rare exits) uses decode_exit, which names each exit explicitly.
The exits are frozen records (worldswitch/record.py): defining one costs about 15 us, where a
frozen dataclass cost 0.7 ms and a typing.NamedTuple 50 us (it compiles each field's annotation), and
every `worldswitch run` defines these twelve before its guest's first instruction.
"""

from __future__ import annotations

from ..record import record
from . import structs as s
from .constants import (KVM_EXIT_IO_OUT, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, ExitReason, InternalError,
                        SystemEvent)


@record(frozen=True)
class IoIn:
    port: int
    size: int
    rep_count: int  # kvm_run's io.count: accesses of `size` bytes (a rep ins makes several)


@record(frozen=True)
class IoOut:
    port: int
    size: int
    rep_count: int
    data: bytes


@record(frozen=True)
class MmioRead:
    addr: int
    len: int


@record(frozen=True)
class MmioWrite:
    addr: int
    data: bytes


@record(frozen=True)
class Hlt:
    pass


@record(frozen=True)
class Shutdown:
    """Triple fault (or a guest shutdown KVM could not turn into a system event)."""


@record(frozen=True)
class SystemEventExit:
    type: int
    data: tuple[int, ...]

    @property
    def name(self) -> str:
        try:
            return SystemEvent(self.type).name.lower()
        except ValueError:
            return f"event {self.type}"


@record(frozen=True)
class FailEntry:
    hardware_entry_failure_reason: int
    cpu: int


@record(frozen=True)
class InternalErrorExit:
    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes  # empty unless KVM reported the failing instruction

    @property
    def name(self) -> str:
        try:
            return InternalError(self.suberror).name.lower()
        except ValueError:
            return f"suberror {self.suberror}"


@record(frozen=True)
class Intr:
    """KVM_RUN returned EINTR: a signal or immediate_exit brought the vCPU back to the VMX."""


@record(frozen=True)
class DebugExit:
    exception: int
    pc: int
    dr6: int
    dr7: int


@record(frozen=True)
class UnknownExit:
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
