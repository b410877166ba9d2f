"""The CPUID a guest is offered: what KVM_GET_SUPPORTED_CPUID says, minus what this host cannot
really execute in guest kernel mode, and what to tell a Linux guest about the rest.

On PVM hosts all guest kernel code goes through KVM's instruction emulator (arch/x86/kvm/emulate.c),
which implements the base integer instruction set, MOVBE, CMPXCHG8B and a few SSE moves, and none
of the extensions below. A kernel that believes in one of them uses its instruction in ring 0 and
the guest dies with KVM_EXIT_INTERNAL_ERROR (suberror 1, emulation). Debian's 6.1 cloud kernel, booted
here, stopped at CMPXCHG16B, XRSTOR, POPCNT, then CLAC (docs/pvm.md has the log).

Hiding a feature takes two steps on this host, because its KVM ORs a fixed set of features into
every guest CPUID on KVM_SET_CPUID2 (presumably because guest ring 3 runs natively and sees the
host's CPUID anyway) while honouring others being cleared:
  1. clear each feature in the CPUID given to KVM;
  2. read the table back (KVM_GET_CPUID2), and for each feature the host forced back on, give a
     Linux guest `clearcpuid=<feature number>` (or `noxsave`) so that the kernel leaves it alone.
"""

from __future__ import annotations

from ...driver import structs as s
from ...record import record
from ..host import HostKind

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"


@record(frozen=True)
class HiddenFeature:
    leaf: int
    subleaf: int | None  # None: every subleaf
    register: str
    bit: int
    name: str
    linux_feature: int  # X86_FEATURE_* number (word * 32 + bit), for clearcpuid=

    def present(self, entries: list[s.kvm_cpuid_entry2]) -> bool:
        return any(
            e.function == self.leaf and (self.subleaf is None or e.index == self.subleaf)
            and getattr(e, self.register) >> self.bit & 1
            for e in entries
        )


def _leaf1(bit: int, name: str) -> HiddenFeature:
    return HiddenFeature(0x1, None, ECX, bit, name, 4 * 32 + bit)  # Linux's word 4 is CPUID.1:ECX


def _leaf7(bit: int, name: str) -> HiddenFeature:
    return HiddenFeature(0x7, 0, EBX, bit, name, 9 * 32 + bit)  # word 9 is CPUID.(7,0):EBX


def _leaf7_ecx(bit: int, name: str) -> HiddenFeature:
    return HiddenFeature(0x7, 0, ECX, bit, name, 16 * 32 + bit)  # word 16 is CPUID.(7,0):ECX


def _leaf7_edx(bit: int, name: str) -> HiddenFeature:
    return HiddenFeature(0x7, 0, EDX, bit, name, 18 * 32 + bit)  # word 18 is CPUID.(7,0):EDX


def _xsave_leaf(bit: int, name: str) -> HiddenFeature:
    return HiddenFeature(0xD, 1, EAX, bit, name, 10 * 32 + bit)  # word 10 is CPUID.(0DH,1):EAX


def _extended1_edx(bit: int, name: str) -> HiddenFeature:
    return HiddenFeature(0x80000001, None, EDX, bit, name, 1 * 32 + bit)  # word 1 is CPUID.80000001H:EDX


# Extensions KVM's instruction emulator does not implement (what a PVM host cannot run in ring 0).
PVM_HIDDEN = (
    _leaf1(0, "pni"),  # SSE3
    _leaf1(1, "pclmulqdq"),
    _leaf1(9, "ssse3"),
    _leaf1(12, "fma"),
    _leaf1(13, "cx16"),  # CMPXCHG16B: where Debian's kernel first stopped
    _leaf1(19, "sse4_1"),
    _leaf1(20, "sse4_2"),
    _leaf1(23, "popcnt"),
    _leaf1(25, "aes"),
    _leaf1(26, "xsave"),  # XRSTOR in the kernel's FPU code
    _leaf1(28, "avx"),
    _leaf1(29, "f16c"),
    _leaf1(30, "rdrand"),
    _leaf7(0, "fsgsbase"),  # RDFSBASE/WRFSBASE in every context switch
    _leaf7(3, "bmi1"),
    _leaf7(5, "avx2"),
    _leaf7(8, "bmi2"),
    _leaf7(18, "rdseed"),
    _leaf7(19, "adx"),
    _leaf7(20, "smap"),  # CLAC/STAC on every kernel entry
    _leaf7(29, "sha_ni"),
)


# Under the in-guest monitor the kernel's code runs natively in ring 3: only what faults there, or needs
# a CR4 bit the monitor keeps, stays hidden. The rest (CMPXCHG16B above all: without it Linux's per-CPU
# cmpxchg falls back to PUSHF; CLI; POPF, and a POPF in ring 3 cannot set IF again) is the CPU's.
MONITOR_HIDDEN = (
    # XSAVE stays: its user processes run on the host's XCR0 (AVX-512's state on an EPYC host; this
    # PVM host does not load the guest's XCR0 for ring 3), which only a kernel that saves the extended
    # state with XSAVE keeps apart between processes. Hidden: XSAVES (XSAVES and XRSTORS are ring-0
    # instructions) and XSAVEC, without which Linux uses XSAVE's standard format, whose size it
    # checks against the CPU's (with XSAVES hidden alone it computed 2,472 bytes where CPUID said
    # 2,432, and gave XSAVE up).
    _xsave_leaf(3, "xsaves"),
    _xsave_leaf(1, "xsavec"),
    _leaf7(0, "fsgsbase"),  # CR4.FSGSBASE, which the monitor does not give
    _leaf7(20, "smap"),  # CLAC/STAC are ring-0 instructions
    # A kernel that sees PCID sets CR4.PCIDE, which the monitor does not give, and flushes with
    # INVPCID, a ring-0 instruction it does not emulate.
    _leaf1(17, "pcid"),
    _leaf7(10, "invpcid"),
    # RDTSCP and RDPID read TSC_AUX, which a kernel that sees either writes at boot (its CPU number,
    # for getcpu): KVM refuses that write where its own table lacks them, and in ring 3 both
    # instructions read the host's TSC_AUX anyway. Without them Linux's getcpu uses LSL.
    _extended1_edx(27, "rdtscp"),
    _leaf7_ecx(22, "rdpid"),
    # CET: a kernel that sees shadow stacks (Linux 6.6 on, for user mode) or indirect-branch tracking
    # (5.18 on, its own) sets CR4.CET, which the monitor does not give. This EPYC host has neither;
    # AMD's Zen 3 on has shadow stacks, Intel's Tiger Lake on both.
    _leaf7_ecx(7, "shstk"),
    _leaf7_edx(20, "ibt"),
)

# Protection keys under the monitor. Where the host's own ring 3 runs with CR4.PKE (its processes'
# CPUID shows OSPKE), its XCR0 has PKRU (0x207 on the EPYC host of 2026-12-05), whose size ring 3's
# CPUID counts, and a kernel without keys leaves PKRU out of its XSAVE: Debian's 7.2, told no PKU (or
# `nopku`), computed 832 bytes where CPUID said 2,440, gave XSAVE up and crashed in fpstate_reset. So
# there the kernel keeps them: it sets CR4.PKE, which the monitor takes as its view (monitor.c), and
# its WRPKRU runs natively in ring 3. What they fence is less than on hardware: KVM's shadow paging
# gives no real page a key, so the CPU checks PKRU against key 0 alone, and a page's own key is
# enforced only by Linux at its page faults (docs/monitor.md). Where the host runs ring 3 without
# CR4.PKE, both are refused: the kernel's WRPKRU would fault, and Linux checks OSPKE, which CPUID in
# ring 3 reads from the host's CR4, at run time.
PROTECTION_KEYS = (
    _leaf7_ecx(3, "pku"),
    _leaf7_ecx(4, "ospke"),
)


def hidden_features(host: HostKind, monitor: bool) -> tuple[HiddenFeature, ...]:
    if not host.kernel_code_emulated:
        return ()
    if not monitor:
        return PVM_HIDDEN
    return MONITOR_HIDDEN if host.ring3_protection_keys else MONITOR_HIDDEN + PROTECTION_KEYS


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


TSC_DEADLINE_BIT = 24  # CPUID.1:ECX: the LAPIC timer's TSC-deadline mode


def with_tsc_deadline(entries: list[s.kvm_cpuid_entry2]) -> list[s.kvm_cpuid_entry2]:
    """`entries` with the TSC-deadline timer offered. KVM's in-kernel LAPIC emulates that mode wherever
    it has KVM_CAP_TSC_DEADLINE_TIMER, but it takes the mode only from a guest whose CPUID has the
    bit, and KVM_GET_SUPPORTED_CPUID leaves the bit out on VT-x and AMD-V: the VMM adds it (as QEMU
    does). This PVM host's KVM reports it already."""
    out = []
    for entry in entries:
        entry = s.kvm_cpuid_entry2.from_buffer_copy(entry)
        if entry.function == 1:
            entry.ecx |= 1 << TSC_DEADLINE_BIT
        out.append(entry)
    return out


def forced_features(effective: list[s.kvm_cpuid_entry2], hidden: tuple[HiddenFeature, ...]) -> list[HiddenFeature]:
    """Hidden features the host put back: present in the vCPU's CPUID as KVM reports it after
    KVM_SET_CPUID2."""
    return [feature for feature in hidden if feature.present(effective)]


def features_to_refuse(effective: list[s.kvm_cpuid_entry2], hidden: tuple[HiddenFeature, ...],
                       monitor: bool) -> list[HiddenFeature]:
    """The hidden features a Linux guest must be told not to use (boot/linux.py kernel_parameters):
    those the host put back into the CPUID KVM gives; under the in-guest monitor, every one. Its
    kernel runs in ring 3, where CPUID executes natively on this host and shows the host CPU's
    features, not KVM's table: on an AMD EPYC host with PCID, Debian's kernel under the monitor saw
    PCID, which the table had cleared and KVM had not put back, and set CR4.PCIDE (2026-12-02)."""
    return list(hidden) if monitor else forced_features(effective, hidden)
