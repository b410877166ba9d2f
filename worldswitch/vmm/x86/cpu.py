"""Per-vCPU set-up that firmware would do on real hardware: CPUID (with each vCPU's APIC ID) and
the LAPIC's local interrupt pins (LINT0 as ExtINT for the 8259 PIC, LINT1 as NMI)."""

from __future__ import annotations

import ctypes
import struct

from ...driver import structs as s
from ...driver.kvm import Vcpu

CPUID_FEATURES = 0x1
CPUID_EXT_TOPOLOGY = 0xB
CPUID_EXT_TOPOLOGY_V2 = 0x1F
CPUID_1_ECX_HYPERVISOR = 1 << 31

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4 << 8
APIC_MODE_EXTINT = 0x7 << 8
APIC_LVT_MASKED = 1 << 16


def cpuid_for_vcpu(entries: list[s.kvm_cpuid_entry2], apic_id: int) -> list[s.kvm_cpuid_entry2]:
    """A copy of `entries` that tells vCPU `apic_id` who it is."""
    out = []
    for entry in entries:
        entry = s.kvm_cpuid_entry2.from_buffer_copy(entry)
        if entry.function == CPUID_FEATURES:
            entry.ebx = (entry.ebx & 0x00FFFFFF) | (apic_id << 24)
            entry.ecx |= CPUID_1_ECX_HYPERVISOR
        elif entry.function in (CPUID_EXT_TOPOLOGY, CPUID_EXT_TOPOLOGY_V2):
            entry.edx = apic_id  # the x2APIC ID of this logical processor
        out.append(entry)
    return out


def set_lint(vcpu: Vcpu) -> None:
    """Route the legacy PIC through LINT0 and NMIs through LINT1, as a PC BIOS does (the same
    set-up Firecracker and QEMU give the in-kernel LAPIC)."""
    lapic = vcpu.get_lapic()
    raw = bytearray(lapic.regs)
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", raw, offset)[0]
        value = (value & ~(0x700 | APIC_LVT_MASKED)) | mode
        struct.pack_into("<I", raw, offset, value)
    ctypes.memmove(lapic.regs, bytes(raw), len(raw))
    vcpu.set_lapic(lapic)
