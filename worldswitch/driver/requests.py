"""Every KVM ioctl worldswitch issues, encoded as <linux/kvm.h> encodes it (_IO/_IOR/_IOW/_IOWR)."""

from __future__ import annotations

import ctypes

from . import structs as s
from .ioctl import IO, IOR, IOW, IOWR

_u64 = ctypes.c_uint64

# /dev/kvm (system) ioctls
KVM_GET_API_VERSION = IO("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = IO("KVM_CREATE_VM", 0x01)
KVM_GET_MSR_INDEX_LIST = IOWR("KVM_GET_MSR_INDEX_LIST", 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION = IO("KVM_CHECK_EXTENSION", 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO("KVM_GET_VCPU_MMAP_SIZE", 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR("KVM_GET_SUPPORTED_CPUID", 0x05, s.kvm_cpuid2)
KVM_GET_EMULATED_CPUID = IOWR("KVM_GET_EMULATED_CPUID", 0x09, s.kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = IOWR("KVM_GET_MSR_FEATURE_INDEX_LIST", 0x0A, s.kvm_msr_list)

# VM ioctls
KVM_CREATE_VCPU = IO("KVM_CREATE_VCPU", 0x41)
KVM_GET_DIRTY_LOG = IOW("KVM_GET_DIRTY_LOG", 0x42, s.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = IOW("KVM_SET_USER_MEMORY_REGION", 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO("KVM_SET_TSS_ADDR", 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW("KVM_SET_IDENTITY_MAP_ADDR", 0x48, _u64)
KVM_CREATE_IRQCHIP = IO("KVM_CREATE_IRQCHIP", 0x60)
KVM_IRQ_LINE = IOW("KVM_IRQ_LINE", 0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP = IOWR("KVM_GET_IRQCHIP", 0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = IOR("KVM_SET_IRQCHIP", 0x63, s.kvm_irqchip)  # sic: the header declares it _IOR
KVM_REGISTER_COALESCED_MMIO = IOW("KVM_REGISTER_COALESCED_MMIO", 0x67, s.kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = IOW("KVM_UNREGISTER_COALESCED_MMIO", 0x68, s.kvm_coalesced_mmio_zone)
KVM_IRQ_LINE_STATUS = IOWR("KVM_IRQ_LINE_STATUS", 0x67, s.kvm_irq_level)
KVM_SET_GSI_ROUTING = IOW("KVM_SET_GSI_ROUTING", 0x6A, s.kvm_irq_routing)
KVM_IRQFD = IOW("KVM_IRQFD", 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = IOW("KVM_CREATE_PIT2", 0x77, s.kvm_pit_config)
KVM_SET_BOOT_CPU_ID = IO("KVM_SET_BOOT_CPU_ID", 0x78)
KVM_IOEVENTFD = IOW("KVM_IOEVENTFD", 0x79, s.kvm_ioeventfd)
KVM_SET_CLOCK = IOW("KVM_SET_CLOCK", 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = IOR("KVM_GET_CLOCK", 0x7C, s.kvm_clock_data)
KVM_GET_PIT2 = IOR("KVM_GET_PIT2", 0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = IOW("KVM_SET_PIT2", 0xA0, s.kvm_pit_state2)
KVM_ENABLE_CAP = IOW("KVM_ENABLE_CAP", 0xA3, s.kvm_enable_cap)
KVM_SIGNAL_MSI = IOW("KVM_SIGNAL_MSI", 0xA5, s.kvm_msi)
KVM_GET_STATS_FD = IO("KVM_GET_STATS_FD", 0xCE)

# vCPU ioctls
KVM_RUN = IO("KVM_RUN", 0x80)
KVM_GET_REGS = IOR("KVM_GET_REGS", 0x81, s.kvm_regs)
KVM_SET_REGS = IOW("KVM_SET_REGS", 0x82, s.kvm_regs)
KVM_GET_SREGS = IOR("KVM_GET_SREGS", 0x83, s.kvm_sregs)
KVM_SET_SREGS = IOW("KVM_SET_SREGS", 0x84, s.kvm_sregs)
KVM_TRANSLATE = IOWR("KVM_TRANSLATE", 0x85, s.kvm_translation)
KVM_INTERRUPT = IOW("KVM_INTERRUPT", 0x86, s.kvm_interrupt)
KVM_GET_MSRS = IOWR("KVM_GET_MSRS", 0x88, s.kvm_msrs)
KVM_SET_MSRS = IOW("KVM_SET_MSRS", 0x89, s.kvm_msrs)
KVM_SET_SIGNAL_MASK = IOW("KVM_SET_SIGNAL_MASK", 0x8B, s.kvm_signal_mask)
KVM_GET_FPU = IOR("KVM_GET_FPU", 0x8C, s.kvm_fpu)
KVM_SET_FPU = IOW("KVM_SET_FPU", 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = IOR("KVM_GET_LAPIC", 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = IOW("KVM_SET_LAPIC", 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = IOW("KVM_SET_CPUID2", 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = IOWR("KVM_GET_CPUID2", 0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = IOR("KVM_GET_MP_STATE", 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = IOW("KVM_SET_MP_STATE", 0x99, s.kvm_mp_state)
KVM_NMI = IO("KVM_NMI", 0x9A)
KVM_SET_GUEST_DEBUG = IOW("KVM_SET_GUEST_DEBUG", 0x9B, s.kvm_guest_debug)
KVM_GET_VCPU_EVENTS = IOR("KVM_GET_VCPU_EVENTS", 0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW("KVM_SET_VCPU_EVENTS", 0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = IOR("KVM_GET_DEBUGREGS", 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = IOW("KVM_SET_DEBUGREGS", 0xA2, s.kvm_debugregs)
KVM_GET_XSAVE = IOR("KVM_GET_XSAVE", 0xA4, s.kvm_xsave)
KVM_SET_XSAVE = IOW("KVM_SET_XSAVE", 0xA5, s.kvm_xsave)
KVM_GET_XCRS = IOR("KVM_GET_XCRS", 0xA6, s.kvm_xcrs)
KVM_SET_XCRS = IOW("KVM_SET_XCRS", 0xA7, s.kvm_xcrs)
KVM_GET_TSC_KHZ = IO("KVM_GET_TSC_KHZ", 0xA3)
KVM_KVMCLOCK_CTRL = IO("KVM_KVMCLOCK_CTRL", 0xAD)
KVM_X86_SET_MSR_FILTER = IOW("KVM_X86_SET_MSR_FILTER", 0xC6, s.kvm_msr_filter)
KVM_GET_XSAVE2 = IOR("KVM_GET_XSAVE2", 0xCF, s.kvm_xsave)

ALL = {name: value for name, value in globals().items() if name.startswith("KVM_")}
