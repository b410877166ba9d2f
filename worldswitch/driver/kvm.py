"""The VMM driver binding: one class per KVM file descriptor (Kvm -> Vm -> Vcpu).

Methods are the ioctls in snake_case and carry no policy; the VMM (worldswitch.vmm) decides what to
call and when. Structures come back as the ctypes mirrors in structs.py.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from typing import Any, Iterable, Sequence

from ..errors import KvmError, KvmUnavailableError
from . import requests as rq
from . import structs as s
from .constants import (KVM_API_VERSION, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_FILTER_WRITE, KVM_SYNC_X86_REGS,
                        KVM_SYNC_X86_SREGS, REQUIRED_CAPS, Cap, ExitReason)
from .ioctl import Ioctl, ioctl, kvm_run_call, last_errno, libc_ioctl

KVM_DEVICE = "/dev/kvm"
PAGE_SIZE = 4096
PIO_DATA_OFFSET = PAGE_SIZE  # KVM_PIO_PAGE_OFFSET * PAGE_SIZE on x86: where port I/O data sits in kvm_run
SHARED_SETS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS  # what share_registers puts in kvm_run


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: load the kvm module, or run on a host with hardware virtualisation"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {path}: add your user to the 'kvm' group (or run as root)"
            ) from None
        except OSError as error:
            raise KvmUnavailableError(f"cannot open {path}: {error.strerror}") from None
        self.path = path
        version = self.get_api_version()
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(f"{path} speaks KVM API version {version}, worldswitch needs {KVM_API_VERSION}")

    @classmethod
    def open(cls, path: str = KVM_DEVICE) -> "Kvm":
        """Open /dev/kvm and check for every capability the VMM cannot do without."""
        kvm = cls(path)
        missing = [cap.name for cap in REQUIRED_CAPS if not kvm.check_extension(cap)]
        if missing:
            kvm.close()
            raise KvmUnavailableError(f"{path} lacks required capabilities: {', '.join(missing)}")
        return kvm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_api_version(self) -> int:
        return ioctl(self.fd, rq.KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, rq.KVM_CHECK_EXTENSION, int(cap))

    def get_vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, rq.KVM_GET_VCPU_MMAP_SIZE, 0)

    def _get_cpuid(self, request: rq.Ioctl) -> list[s.kvm_cpuid_entry2]:  # type: ignore[name-defined]
        count = s.KVM_MAX_CPUID_ENTRIES
        while True:
            table = s.cpuid2_with(count)
            try:
                ioctl(self.fd, request, table)
            except KvmError as error:
                if error.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return [s.kvm_cpuid_entry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def get_supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        return self._get_cpuid(rq.KVM_GET_SUPPORTED_CPUID)

    def get_emulated_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        return self._get_cpuid(rq.KVM_GET_EMULATED_CPUID)

    def _get_msr_list(self, request: rq.Ioctl) -> list[int]:  # type: ignore[name-defined]
        probe = s.msr_list_with(0)
        try:
            ioctl(self.fd, request, probe)
        except KvmError as error:
            if error.errno != errno.E2BIG:
                raise
        table = s.msr_list_with(probe.nmsrs)
        ioctl(self.fd, request, table)
        return list(table.indices[: table.nmsrs])

    def get_msr_index_list(self) -> list[int]:
        return self._get_msr_list(rq.KVM_GET_MSR_INDEX_LIST)

    def get_msr_feature_index_list(self) -> list[int]:
        return self._get_msr_list(rq.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def create_vm(self, machine_type: int = 0) -> "Vm":
        return Vm(self, ioctl(self.fd, rq.KVM_CREATE_VM, machine_type))


class Vm:
    """A VM file descriptor (KVM_CREATE_VM)."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, rq.KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        ioctl(self.fd, rq.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, address: int) -> None:
        ioctl(self.fd, rq.KVM_SET_TSS_ADDR, address)

    def set_identity_map_addr(self, address: int) -> None:
        ioctl(self.fd, rq.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(address))

    def deny_msr_writes(self, indices: Sequence[int]) -> None:
        """Guest WRMSRs to these MSRs exit to user space (KVM_EXIT_X86_WRMSR) instead of taking
        effect; everything else stays allowed. The VMM completes them with set_msrs()."""
        self.enable_cap(Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
        request = s.kvm_msr_filter(flags=0)  # KVM_MSR_FILTER_DEFAULT_ALLOW
        denied = ctypes.c_uint8(0)  # a one-MSR bitmap whose bit says "deny"; KVM copies it
        for i, index in enumerate(indices):
            request.ranges[i] = s.kvm_msr_filter_range(KVM_MSR_FILTER_WRITE, 1, index, ctypes.addressof(denied))
        ioctl(self.fd, rq.KVM_X86_SET_MSR_FILTER, request)

    def create_irqchip(self) -> None:
        ioctl(self.fd, rq.KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self.fd, rq.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, rq.KVM_IRQ_LINE, s.kvm_irq_level(irq, level))

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        chip = s.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, rq.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        ioctl(self.fd, rq.KVM_SET_IRQCHIP, chip)

    def set_gsi_routing(self, entries: list[s.kvm_irq_routing_entry]) -> None:
        ioctl(self.fd, rq.KVM_SET_GSI_ROUTING, s.irq_routing_with(entries))

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        ioctl(self.fd, rq.KVM_IRQFD, s.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd))

    def ioeventfd(self, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0) -> None:
        ioctl(self.fd, rq.KVM_IOEVENTFD, s.kvm_ioeventfd(datamatch=datamatch, addr=addr, len=length, fd=fd, flags=flags))

    def register_coalesced_pio(self, port: int, length: int) -> None:
        """Guest writes inside [port, port + length) go to the coalesced ring, without an exit."""
        ioctl(self.fd, rq.KVM_REGISTER_COALESCED_MMIO, s.kvm_coalesced_mmio_zone(port, length, 1))

    def unregister_coalesced_pio(self, port: int, length: int) -> None:
        """Writes there exit again (KVM drops every zone inside the range)."""
        ioctl(self.fd, rq.KVM_UNREGISTER_COALESCED_MMIO, s.kvm_coalesced_mmio_zone(port, length, 1))

    def signal_msi(self, address: int, data: int) -> int:
        msi = s.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, rq.KVM_SIGNAL_MSI, msi)

    def get_clock(self) -> s.kvm_clock_data:
        clock = s.kvm_clock_data()
        ioctl(self.fd, rq.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: s.kvm_clock_data) -> None:
        ioctl(self.fd, rq.KVM_SET_CLOCK, clock)

    def get_pit2(self) -> s.kvm_pit_state2:
        pit = s.kvm_pit_state2()
        ioctl(self.fd, rq.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: s.kvm_pit_state2) -> None:
        ioctl(self.fd, rq.KVM_SET_PIT2, pit)

    def enable_cap(self, cap: int, *args: int) -> None:
        request = s.kvm_enable_cap(cap=int(cap))
        for i, value in enumerate(args):
            request.args[i] = value
        ioctl(self.fd, rq.KVM_ENABLE_CAP, request)

    def get_stats_fd(self) -> int:
        return ioctl(self.fd, rq.KVM_GET_STATS_FD, 0)

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        fd = ioctl(self.fd, rq.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(self, fd, vcpu_id)


def run_failed() -> int:
    """What a KVM_RUN that returned -1 means: a kick (EINTR, or EAGAIN with immediate_exit) is
    ExitReason.INTR, KVM having left exit_reason stale; anything else is an error. The run loop's
    inlined KVM_RUN and Vcpu.run() both end here."""
    code = last_errno()
    if code == errno.EINTR or code == errno.EAGAIN:
        return int(ExitReason.INTR)
    raise KvmError("KVM_RUN", code)


class Vcpu:
    """A vCPU file descriptor, with its kvm_run page mapped once."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        size = vm.kvm.get_vcpu_mmap_size()
        self.run_mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = s.kvm_run.from_buffer(self.run_mmap)
        self._exit_reason = ctypes.c_uint32.from_buffer(self.run_mmap, s.kvm_run.exit_reason.offset)
        self.run_request = rq.KVM_RUN.number
        # KVM_CAP_SYNC_REGS: the registers and special registers in the page, both ways
        self.can_share_registers = vm.kvm.check_extension(Cap.SYNC_REGS) & SHARED_SETS == SHARED_SETS
        self.sharing_registers = False
        self._shared = self.kvm_run.s.regs

    def close(self) -> None:
        if self.fd < 0:
            return
        del self.kvm_run, self._exit_reason, self._shared  # release the buffer exports before unmapping
        try:
            self.run_mmap.close()
        except BufferError:
            pass  # someone still holds a view; the mapping goes when they do
        os.close(self.fd)
        self.fd = -1

    # The world switch. Kept minimal: it is on the hot path of every exit.
    def run(self) -> int:
        """Enter the guest until it exits; return the exit reason. A signal or immediate_exit gives
        ExitReason.INTR (KVM leaves exit_reason stale in that case, so we say it ourselves)."""
        if kvm_run_call(self.fd, self.run_request, None) < 0:
            return run_failed()
        return int(self._exit_reason.value)

    def get_regs(self) -> s.kvm_regs:
        if self.sharing_registers:
            return s.kvm_regs.from_buffer_copy(self._shared.regs)
        regs = s.kvm_regs()
        ioctl(self.fd, rq.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        if self.sharing_registers:
            self._shared.regs = regs
            self.kvm_run.kvm_dirty_regs |= KVM_SYNC_X86_REGS
            return
        ioctl(self.fd, rq.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        if self.sharing_registers:
            return s.kvm_sregs.from_buffer_copy(self._shared.sregs)
        sregs = s.kvm_sregs()
        ioctl(self.fd, rq.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        if self.sharing_registers:
            self._shared.sregs = sregs
            self.kvm_run.kvm_dirty_regs |= KVM_SYNC_X86_SREGS
            return
        ioctl(self.fd, rq.KVM_SET_SREGS, sregs)

    def share_registers(self, on: bool) -> None:
        """Whether the registers and special registers go through the kvm_run page
        (KVM_CAP_SYNC_REGS) rather than four ioctls of about 7 µs each on PVM: for a VMM that reads
        and writes them at most exits of a stretch (the firmware handoff's debug exits). KVM then
        stores both sets at every exit, which other stretches need not pay for. A host without the
        capability keeps the ioctls. The page is kept equal to KVM's state at all times: what a
        set_regs wrote there reaches KVM before any other ioctl, and is read back after one."""
        if on == self.sharing_registers or (on and not self.can_share_registers):
            return
        if on:
            self.kvm_run.kvm_valid_regs = SHARED_SETS
            self._read_shared()
        else:
            self._write_shared()
            self.kvm_run.kvm_valid_regs = 0
        self.sharing_registers = on

    def _write_shared(self) -> None:
        """The registers set_regs and set_sregs left in the page, given to KVM now."""
        dirty = self.kvm_run.kvm_dirty_regs
        if dirty & KVM_SYNC_X86_SREGS:
            ioctl(self.fd, rq.KVM_SET_SREGS, self._shared.sregs)
        if dirty & KVM_SYNC_X86_REGS:
            ioctl(self.fd, rq.KVM_SET_REGS, self._shared.regs)
        self.kvm_run.kvm_dirty_regs = 0

    def _read_shared(self) -> None:
        ioctl(self.fd, rq.KVM_GET_REGS, self._shared.regs)
        ioctl(self.fd, rq.KVM_GET_SREGS, self._shared.sregs)

    def _ioctl(self, request: Ioctl, arg: Any) -> int:
        """Any vCPU ioctl but KVM_RUN and the registers' own. While the registers are shared, KVM
        gets what was written to the page first (the call may depend on it: KVM_TRANSLATE on CR3),
        and the page is read again after (the call may change them: KVM_SET_MSRS of EFER,
        KVM_SET_MP_STATE, KVM_SET_GUEST_DEBUG's TF)."""
        if not self.sharing_registers:
            return ioctl(self.fd, request, arg)
        self._write_shared()
        result = ioctl(self.fd, request, arg)
        self._read_shared()
        return result

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        self._ioctl(rq.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        self._ioctl(rq.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        table = s.msrs_with(len(indices))
        for i, index in enumerate(indices):
            table.entries[i].index = index
        done = self._ioctl(rq.KVM_GET_MSRS, table)
        return {table.entries[i].index: table.entries[i].data for i in range(done)}

    def set_msrs(self, values: dict[int, int]) -> int:
        table = s.msrs_with(len(values))
        for i, (index, data) in enumerate(values.items()):
            table.entries[i].index = index
            table.entries[i].data = data
        done = self._ioctl(rq.KVM_SET_MSRS, table)
        if done != len(values):
            failed = list(values)[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {failed:#x} was refused")
        return done

    def set_cpuid2(self, entries: Iterable[s.kvm_cpuid_entry2]) -> None:
        entries = list(entries)
        table = s.cpuid2_with(len(entries))
        for i, entry in enumerate(entries):
            table.entries[i] = entry
        self._ioctl(rq.KVM_SET_CPUID2, table)

    def get_cpuid2(self) -> list[s.kvm_cpuid_entry2]:
        table = s.cpuid2_with(s.KVM_MAX_CPUID_ENTRIES)
        self._ioctl(rq.KVM_GET_CPUID2, table)
        return [s.kvm_cpuid_entry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def get_lapic(self) -> s.kvm_lapic_state:
        lapic = s.kvm_lapic_state()
        self._ioctl(rq.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        self._ioctl(rq.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        state = s.kvm_mp_state()
        self._ioctl(rq.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        self._ioctl(rq.KVM_SET_MP_STATE, s.kvm_mp_state(mp_state))

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        events = s.kvm_vcpu_events()
        self._ioctl(rq.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        self._ioctl(rq.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> s.kvm_debugregs:
        regs = s.kvm_debugregs()
        self._ioctl(rq.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: s.kvm_debugregs) -> None:
        self._ioctl(rq.KVM_SET_DEBUGREGS, regs)

    def xsave_size(self) -> int:
        """Bytes the XSAVE area takes: KVM_CAP_XSAVE2 on the VM fd (0 if absent), at least 4096."""
        return max(self.vm.check_extension(Cap.XSAVE2), s.KVM_XSAVE_LEGACY_SIZE)

    def get_xsave(self) -> bytes:
        size = self.xsave_size()
        area = s.xsave_with(size)
        request = rq.KVM_GET_XSAVE2 if self.vm.check_extension(Cap.XSAVE2) else rq.KVM_GET_XSAVE
        self._ioctl(request, area)
        return bytes(area)

    def set_xsave(self, data: bytes) -> None:
        area = s.xsave_with(max(len(data), s.KVM_XSAVE_LEGACY_SIZE))
        ctypes.memmove(ctypes.addressof(area), data, len(data))
        self._ioctl(rq.KVM_SET_XSAVE, area)

    def get_xcrs(self) -> s.kvm_xcrs:
        xcrs = s.kvm_xcrs()
        self._ioctl(rq.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        self._ioctl(rq.KVM_SET_XCRS, xcrs)

    def set_signal_mask(self, sigset: bytes | None) -> None:
        """Signals blocked while the vCPU is inside KVM_RUN; None removes the mask."""
        if sigset is None:
            libc_ioctl(self.fd, rq.KVM_SET_SIGNAL_MASK.number, None)
            return
        self._ioctl(rq.KVM_SET_SIGNAL_MASK, s.signal_mask_with(sigset))

    def translate(self, linear_address: int) -> s.kvm_translation:
        translation = s.kvm_translation(linear_address=linear_address)
        self._ioctl(rq.KVM_TRANSLATE, translation)
        return translation

    def interrupt(self, vector: int) -> None:
        self._ioctl(rq.KVM_INTERRUPT, s.kvm_interrupt(vector))

    def nmi(self) -> None:
        self._ioctl(rq.KVM_NMI, 0)

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        request = s.kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg):
            request.arch.debugreg[i] = value
        self._ioctl(rq.KVM_SET_GUEST_DEBUG, request)

    def get_tsc_khz(self) -> int:
        return self._ioctl(rq.KVM_GET_TSC_KHZ, 0)

    def kvmclock_ctrl(self) -> None:
        self._ioctl(rq.KVM_KVMCLOCK_CTRL, 0)

    def get_stats_fd(self) -> int:
        return self._ioctl(rq.KVM_GET_STATS_FD, 0)


_COALESCED_ENTRY = struct.Struct("<QII8s")  # struct kvm_coalesced_mmio: phys_addr, len, pio, data
assert _COALESCED_ENTRY.size == ctypes.sizeof(s.kvm_coalesced_mmio)


class CoalescedRing:
    """The ring of coalesced writes, one per VM, at KVM_CAP_COALESCED_MMIO's page of a vCPU's
    mapping. KVM adds a write at `last`; the VMM takes them from `first`, in order, and moves it on
    (KVM counts the ring full when `last` + 1 reaches `first`, and then exits for the write instead)."""

    def __init__(self, vcpu: Vcpu) -> None:
        page = vcpu.vm.check_extension(Cap.COALESCED_MMIO)
        if not page:
            raise KvmError("KVM_CHECK_EXTENSION", errno.ENOTTY, "this host's KVM has no coalesced writes")
        offset = page * PAGE_SIZE
        header = ctypes.sizeof(s.kvm_coalesced_mmio_ring)
        self.capacity = (PAGE_SIZE - header) // ctypes.sizeof(s.kvm_coalesced_mmio)
        mapping = vcpu.run_mmap
        self.first = ctypes.c_uint32.from_buffer(mapping, offset + s.kvm_coalesced_mmio_ring.first.offset)
        self.last = ctypes.c_uint32.from_buffer(mapping, offset + s.kvm_coalesced_mmio_ring.last.offset)
        self._page = memoryview(mapping)
        self._entries_at = offset + header

    def take(self) -> list[tuple[int, int, int, int]]:
        """The queued writes in order, each (address, length, pio, value: pio non-zero for port
        I/O), taken out of the ring."""
        capacity, first, last = self.capacity, self.first, self.last
        taken = []
        while first.value != last.value:
            index = first.value % capacity  # KVM's index, kept inside the ring whatever the page holds
            address, length, pio, data = _COALESCED_ENTRY.unpack_from(self._page, self._entries_at + index * _COALESCED_ENTRY.size)
            length = min(length, 8)
            taken.append((address, length, pio, int.from_bytes(data[:length], "little")))
            first.value = (index + 1) % capacity
        return taken

    def release(self) -> None:
        """Drop the views into the vCPU's mapping so that it can be unmapped."""
        self._page.release()
        del self.first, self.last, self._page
