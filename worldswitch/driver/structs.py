"""ctypes mirrors of the x86 KVM structures, named and laid out as in <linux/kvm.h> and <asm/kvm.h>.

tests/test_driver_layout.py compiles a C program against the installed headers and compares every
size and field offset here with the C compiler's answer.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_int16, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64

KVM_NR_INTERRUPTS = 256
KVM_IOAPIC_NUM_PINS = 24
KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16
KVM_XSAVE_LEGACY_SIZE = 4096  # struct kvm_xsave without its flexible tail
KVM_MAX_CPUID_ENTRIES = 256  # what we allocate for KVM_GET_SUPPORTED_CPUID


class Struct(ctypes.Structure):
    """A structure that prints its fields, for debugging and error messages."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_ if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


# --- memory, interrupts, devices (VM fd) -------------------------------------------------------


class kvm_userspace_memory_region(Struct):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_irq_level(Struct):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]  # irq is a union with __s32 status


class kvm_pic_state(Struct):
    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
            "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode",
            "init4", "elcr", "elcr_mask",
        )
    ]


class kvm_ioapic_state(Struct):
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),  # union of bits / bitfields: we use bits
    ]


class _kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Struct):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _kvm_irqchip_chip)]


class kvm_pit_config(Struct):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_pit_channel_state(Struct):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class kvm_pit_state2(Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_uint32), ("reserved", c_uint32 * 9)]


class kvm_clock_data(Struct):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class kvm_irqfd(Struct):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_coalesced_mmio_zone(Struct):
    """A range whose guest writes KVM queues in the coalesced ring instead of exiting; `pio`: port
    I/O rather than MMIO (KVM_CAP_COALESCED_PIO)."""
    _fields_ = [
        ("addr", c_uint64),
        ("size", c_uint32),
        ("pio", c_uint32),
    ]


class kvm_coalesced_mmio(Struct):
    """One queued write in the ring."""
    _fields_ = [
        ("phys_addr", c_uint64),
        ("len", c_uint32),
        ("pio", c_uint32),
        ("data", c_uint8 * 8),
    ]


class kvm_coalesced_mmio_ring(Struct):
    """The ring's header, at KVM_CAP_COALESCED_MMIO's page in every vCPU's mapping (one ring per VM):
    KVM adds at `last`, the VMM takes from `first`; its entries follow, as many as fill the page."""
    _fields_ = [
        ("first", c_uint32),
        ("last", c_uint32),
    ]


class kvm_ioeventfd(Struct):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class kvm_msi(Struct):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class kvm_irq_routing_irqchip(Struct):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(Struct):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32), ("devid", c_uint32)]


class _kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", c_uint32 * 8)]


class kvm_irq_routing_entry(Struct):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _kvm_irq_routing_entry_u),
    ]


class kvm_irq_routing(Struct):
    """Header only; entries follow (see irq_routing_with)."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


def irq_routing_with(entries: list[kvm_irq_routing_entry]) -> ctypes.Structure:
    """A kvm_irq_routing followed by its entries, in one buffer."""

    class kvm_irq_routing_n(Struct):
        _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * len(entries))]

    table = kvm_irq_routing_n(nr=len(entries))
    for i, entry in enumerate(entries):
        table.entries[i] = entry
    return table


class kvm_enable_cap(Struct):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_msr_filter_range(Struct):
    _fields_ = [("flags", c_uint32), ("nmsrs", c_uint32), ("base", c_uint32), ("bitmap", c_uint64)]  # __u8 *bitmap


class kvm_msr_filter(Struct):
    _fields_ = [("flags", c_uint32), ("ranges", kvm_msr_filter_range * 16)]


class kvm_dirty_log(Struct):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_stats_header(Struct):
    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


class kvm_stats_desc(Struct):
    """Header only; a name of kvm_stats_header.name_size bytes follows."""

    _fields_ = [
        ("flags", c_uint32),
        ("exponent", c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    ]


# --- vCPU state ---------------------------------------------------------------------------------


class kvm_regs(Struct):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]


class kvm_segment(Struct):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(Struct):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(Struct):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(Struct):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(Struct):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(Struct):
    """Header only; entries follow (see msrs_with)."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def msrs_with(count: int) -> ctypes.Structure:
    class kvm_msrs_n(Struct):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * count)]

    return kvm_msrs_n(nmsrs=count)


class kvm_msr_list(Struct):
    _fields_ = [("nmsrs", c_uint32)]


def msr_list_with(count: int) -> ctypes.Structure:
    class kvm_msr_list_n(Struct):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * count)]

    return kvm_msr_list_n(nmsrs=count)


class kvm_cpuid_entry2(Struct):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(Struct):
    """Header only; entries follow (see cpuid2_with)."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def cpuid2_with(count: int) -> ctypes.Structure:
    class kvm_cpuid2_n(Struct):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * count)]

    return kvm_cpuid2_n(nent=count)


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class kvm_lapic_state(Struct):
    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", c_uint32)]


class kvm_signal_mask(Struct):
    """Header only; the sigset bytes follow (see signal_mask_with)."""

    _fields_ = [("len", c_uint32)]


def signal_mask_with(sigset: bytes) -> ctypes.Structure:
    class kvm_signal_mask_n(Struct):
        _fields_ = [("len", c_uint32), ("sigset", c_uint8 * len(sigset))]

    mask = kvm_signal_mask_n(len=len(sigset))
    ctypes.memmove(mask.sigset, sigset, len(sigset))
    return mask


class _kvm_vcpu_events_exception(Struct):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _kvm_vcpu_events_interrupt(Struct):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(Struct):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(Struct):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8), ("latched_init", c_uint8)]


class _kvm_vcpu_events_triple_fault(Struct):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(Struct):
    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_debugregs(Struct):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_xsave(Struct):
    """The legacy 4 KiB area; KVM_GET_XSAVE2 may need more (see Vcpu.get_xsave)."""

    _fields_ = [("region", c_uint32 * (KVM_XSAVE_LEGACY_SIZE // 4))]


def xsave_with(size: int) -> ctypes.Structure:
    class kvm_xsave_n(Struct):
        _fields_ = [("region", c_uint32 * (size // 4))]

    return kvm_xsave_n()


class kvm_xcr(Struct):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(Struct):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_translation(Struct):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_guest_debug_arch(Struct):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(Struct):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


class kvm_interrupt(Struct):
    _fields_ = [("irq", c_uint32)]


# --- kvm_run: the page shared with KVM at every world switch -------------------------------------


class kvm_run_hw(Struct):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_fail_entry(Struct):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_ex(Struct):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_io(Struct):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_debug_exit_arch(Struct):
    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64), ("dr7", c_uint64)]


class kvm_run_debug(Struct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_mmio(Struct):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_hypercall(Struct):
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("longmode", c_uint32),
        ("pad", c_uint32),
    ]


class kvm_run_internal(Struct):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_emulation_failure(Struct):
    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    ]


class kvm_run_system_event(Struct):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_msr(Struct):
    _fields_ = [
        ("error", c_uint8),
        ("pad", c_uint8 * 7),
        ("reason", c_uint32),
        ("index", c_uint32),
        ("data", c_uint64),
    ]


class kvm_run_eoi(Struct):
    _fields_ = [("vector", c_uint8)]


class _kvm_run_exit_union(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("internal", kvm_run_internal),
        ("emulation_failure", kvm_run_emulation_failure),
        ("system_event", kvm_run_system_event),
        ("eoi", kvm_run_eoi),
        ("msr", kvm_run_msr),
        ("padding", c_char * 256),
    ]


class kvm_sync_regs(Struct):
    """What KVM_CAP_SYNC_REGS shares through kvm_run on x86: the sets kvm_valid_regs names are stored
    there at every exit, the sets kvm_dirty_regs names are loaded from there at the next KVM_RUN."""

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class _kvm_run_sync_union(ctypes.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * 2048)]  # SYNC_REGS_SIZE_BYTES


class kvm_run(Struct):
    """The fixed part of the kvm_run page (the mmap of a vCPU fd). Port I/O data lives in the same
    mapping at io.data_offset, usually the next page."""

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("u", _kvm_run_exit_union),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", _kvm_run_sync_union),
    ]
