"""Numeric constants of the KVM API (<linux/kvm.h>), grouped as the header groups them."""

from __future__ import annotations

from enum import IntEnum

KVM_API_VERSION = 12


class ExitReason(IntEnum):
    """kvm_run.exit_reason (KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


EXIT_REASON_LIMIT = 64  # dispatch tables are indexed by exit reason up to this bound

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class InternalError(IntEnum):
    """kvm_run.internal.suberror (KVM_INTERNAL_ERROR_*)."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class SystemEvent(IntEnum):
    """kvm_run.system_event.type (KVM_SYSTEM_EVENT_*)."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class Cap(IntEnum):
    """KVM_CAP_* numbers for the capabilities worldswitch probes."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    MCE = 31
    IRQFD = 32
    PIT2 = 33
    SET_BOOT_CPU_ID = 34
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    X86_ROBUST_SINGLESTEP = 51
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    SYNC_REGS = 74
    KVMCLOCK_CTRL = 76
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    IOEVENTFD_NO_LENGTH = 100
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    IOEVENTFD_ANY_LENGTH = 122
    COALESCED_PIO = 162
    EXCEPTION_PAYLOAD = 164
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    XSAVE2 = 208
    BINARY_STATS_FD = 203
    EXIT_ON_EMULATION_FAILURE = 204
    X86_TRIPLE_FAULT_EVENT = 218


# Capabilities the VMM cannot work without; `worldswitch info` marks them and Kvm.open checks them.
REQUIRED_CAPS = (
    Cap.USER_MEMORY,
    Cap.IRQCHIP,
    Cap.PIT2,
    Cap.IMMEDIATE_EXIT,
    Cap.EXT_CPUID,
    Cap.SET_TSS_ADDR,
)

# Capabilities later features use when the host has them.
USEFUL_CAPS = (
    Cap.IOEVENTFD,
    Cap.IRQFD,
    Cap.IRQ_ROUTING,
    Cap.SIGNAL_MSI,
    Cap.VCPU_EVENTS,
    Cap.DEBUGREGS,
    Cap.XSAVE,
    Cap.XSAVE2,
    Cap.XCRS,
    Cap.ADJUST_CLOCK,
    Cap.KVMCLOCK_CTRL,
    Cap.INTERNAL_ERROR_DATA,
    Cap.BINARY_STATS_FD,
    Cap.EXIT_ON_EMULATION_FAILURE,
    Cap.MP_STATE,
    Cap.TSC_DEADLINE_TIMER,
    Cap.NR_VCPUS,
    Cap.MAX_VCPUS,
    Cap.NR_MEMSLOTS,
)

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_PIT_SPEAKER_DUMMY = 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000

KVM_SYNC_X86_REGS = 1 << 0  # kvm_run.kvm_valid_regs and kvm_dirty_regs (KVM_CAP_SYNC_REGS)
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_MSR_EXIT_REASON_FILTER = 1 << 2  # KVM_CAP_X86_USER_SPACE_MSR: exit on accesses a filter denies
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1

KVM_CLOCK_TSC_STABLE = 2
