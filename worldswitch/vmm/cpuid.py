"""The CPUID a guest is offered: what KVM_GET_SUPPORTED_CPUID says, minus what this host cannot
really execute in guest kernel mode.

On PVM hosts all guest kernel code goes through KVM's instruction emulator, which lacks some
instructions the CPU (and KVM's supported CPUID) advertise; a kernel that sees the feature uses
the instruction and dies with KVM_EXIT_INTERNAL_ERROR. The table below was found by booting
Debian's 6.1 cloud kernel here and hiding each feature it stopped at (see the closing note of the
Linux issue and docs/pvm-cpuid.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..driver import structs as s
from .host import HostKind

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"


@dataclass(frozen=True)
class HiddenFeature:
    leaf: int
    subleaf: int | None  # None: every subleaf
    register: str
    bit: int
    name: str
    why: str


PVM_HIDDEN = (
    HiddenFeature(0x1, None, ECX, 13, "cx16", "CMPXCHG16B: KVM's emulator cannot execute it (internal error, suberror 1)"),
)


# What CPUID cannot hide: this PVM host ORs a fixed set of features into every guest CPUID on
# KVM_SET_CPUID2 (XSAVE, OSXSAVE, AVX and leaf 0xD among them; presumably because guest ring 3 runs
# natively and sees the host's CPUID anyway), while it honours clearing others (CX16). A Linux
# guest that believes in XSAVE uses XRSTOR in ring 0, which KVM's emulator cannot execute, so on
# such hosts the VMM adds the kernel's own switch for it to the command line.
PVM_KERNEL_PARAMETERS = (
    ("noxsave", "XSAVE: forced into the guest's CPUID by this host, and XRSTOR is beyond KVM's emulator"),
)


def hidden_features(host: HostKind) -> tuple[HiddenFeature, ...]:
    return PVM_HIDDEN if host.kernel_code_emulated else ()


def kernel_parameters(host: HostKind, cmdline: str) -> list[tuple[str, str]]:
    """(parameter, reason) pairs a Linux guest needs on this host and its command line lacks."""
    if not host.kernel_code_emulated:
        return []
    present = set(cmdline.split())
    return [(parameter, why) for parameter, why in PVM_KERNEL_PARAMETERS if parameter not in present]


def filter_cpuid(entries: list[s.kvm_cpuid_entry2], hidden: tuple[HiddenFeature, ...]) -> list[s.kvm_cpuid_entry2]:
    """A copy of `entries` with every hidden feature's bit cleared."""
    out = []
    for entry in entries:
        entry = s.kvm_cpuid_entry2.from_buffer_copy(entry)
        for feature in hidden:
            if entry.function == feature.leaf and (feature.subleaf is None or entry.index == feature.subleaf):
                setattr(entry, feature.register, getattr(entry, feature.register) & ~(1 << feature.bit))
        out.append(entry)
    return out
