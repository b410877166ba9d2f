from __future__ import annotations

import pytest

from worldswitch.boot.linux import kernel_parameters
from worldswitch.driver import structs as s
from worldswitch.vmm.host import HostKind
from worldswitch.vmm.x86.cpu import cpuid_for_vcpu
from worldswitch.vmm.x86.cpuid import (MONITOR_HIDDEN, PROTECTION_KEYS, PVM_HIDDEN, TSC_DEADLINE_BIT,
                                       features_to_refuse, filter_cpuid, forced_features, hidden_features,
                                       with_tsc_deadline)

PVM = HostKind("pvm", False, "")
PVM_PKE = HostKind("pvm", False, "", ring3_protection_keys=True)  # its user mode runs with CR4.PKE
VTX = HostKind("vmx", True, "")
BY_NAME = {f.name: f for f in PVM_HIDDEN}


def table(ecx1: int, ebx7: int = 0) -> list[s.kvm_cpuid_entry2]:
    return [s.kvm_cpuid_entry2(function=1, ecx=ecx1, ebx=0x00020800), s.kvm_cpuid_entry2(function=7, index=0, ebx=ebx7)]


def test_linux_feature_numbers_follow_the_kernels_words() -> None:
    assert BY_NAME["popcnt"].linux_feature == 151  # X86_FEATURE_POPCNT (4*32+23)
    assert BY_NAME["cx16"].linux_feature == 141
    assert BY_NAME["avx2"].linux_feature == 293  # X86_FEATURE_AVX2 (9*32+5)
    assert BY_NAME["rdseed"].linux_feature == 306


def test_only_emulating_hosts_hide_anything() -> None:
    assert hidden_features(VTX, monitor=False) == ()
    assert hidden_features(PVM, monitor=False) == PVM_HIDDEN
    # under the monitor the kernel's code runs natively in ring 3: only what faults there stays hidden
    assert [f.name for f in hidden_features(PVM_PKE, monitor=True)] == [
        "xsaves", "xsavec", "fsgsbase", "smap", "pcid", "invpcid", "rdtscp", "rdpid", "shstk", "ibt"]
    # protection keys, where the host's ring 3 runs without them: X86_FEATURE_PKU, X86_FEATURE_OSPKE
    assert hidden_features(PVM, monitor=True) == MONITOR_HIDDEN + PROTECTION_KEYS
    assert [(f.name, f.leaf, f.subleaf, f.register, f.bit, f.linux_feature) for f in PROTECTION_KEYS] == [
        ("pku", 7, 0, "ecx", 3, 16 * 32 + 3), ("ospke", 7, 0, "ecx", 4, 16 * 32 + 4)]
    assert hidden_features(PVM, monitor=False) == hidden_features(PVM_PKE, monitor=False) == PVM_HIDDEN
    # XSAVE itself stays under the monitor (its user mode's AVX state needs it); what the monitor does
    # not give (XSAVES, CR4.PCIDE, INVPCID, TSC_AUX) is hidden only there
    assert {f.name for f in set(MONITOR_HIDDEN) - set(PVM_HIDDEN)} == {"xsaves", "xsavec", "pcid", "invpcid", "rdtscp",
                                                                       "rdpid", "shstk", "ibt"}
    assert {(f.leaf, f.subleaf, f.register, f.bit, f.linux_feature) for f in MONITOR_HIDDEN if f.name not in BY_NAME} == {
        (0xD, 1, "eax", 3, 10 * 32 + 3), (0xD, 1, "eax", 1, 10 * 32 + 1),  # X86_FEATURE_XSAVES, X86_FEATURE_XSAVEC
        (1, None, "ecx", 17, 4 * 32 + 17), (7, 0, "ebx", 10, 9 * 32 + 10),  # X86_FEATURE_PCID, X86_FEATURE_INVPCID
        (0x80000001, None, "edx", 27, 1 * 32 + 27), (7, 0, "ecx", 22, 16 * 32 + 22),  # RDTSCP, RDPID
        (7, 0, "ecx", 7, 16 * 32 + 7), (7, 0, "edx", 20, 18 * 32 + 20)}  # X86_FEATURE_SHSTK, X86_FEATURE_IBT


def test_filtering_clears_the_bits_and_keeps_the_rest() -> None:
    filtered = filter_cpuid(table(0xFFFFFFFF, 0xFFFFFFFF), PVM_HIDDEN)
    assert not forced_features(filtered, PVM_HIDDEN)
    assert filtered[0].ecx & (1 << 31)  # the hypervisor bit stays
    assert filtered[1].ebx & (1 << 1)  # TSC_ADJUST stays


def test_forced_features_become_kernel_parameters() -> None:
    effective = table((1 << 26) | (1 << 23) | (1 << 13), 1 << 5)  # xsave, popcnt, cx16, avx2
    forced = forced_features(effective, PVM_HIDDEN)
    assert [f.name for f in forced] == ["cx16", "popcnt", "xsave", "avx2"]
    params = [p for p, _ in kernel_parameters("console=ttyS0", forced, code_emulated=False)]
    assert params == ["noxsave", "clearcpuid=141,151,293"]
    assert kernel_parameters("console=ttyS0 noxsave clearcpuid=1", forced, False) == []  # the user's own choice wins
    assert kernel_parameters("console=ttyS0", [], False) == []


def test_each_vcpu_gets_its_apic_id() -> None:
    for apic_id in (0, 3, 63):
        leaf1 = [e for e in cpuid_for_vcpu(table(0), apic_id) if e.function == 1][0]
        assert leaf1.ebx >> 24 == apic_id and leaf1.ecx & (1 << 31)


def test_emulated_hosts_skip_the_crypto_self_tests_unless_the_user_said_otherwise() -> None:
    assert [p for p, _ in kernel_parameters("console=ttyS0", [], code_emulated=True)] == ["cryptomgr.notests"]
    assert kernel_parameters("console=ttyS0 cryptomgr.notests=0", [], True) == []
    assert kernel_parameters("console=ttyS0", [], code_emulated=True, monitor=True) == []  # its code runs natively


def test_under_the_monitor_every_hidden_feature_is_refused_whatever_kvms_table_says() -> None:
    """Its kernel's CPUID runs natively in ring 3 and shows the host CPU's features: a table that
    KVM put nothing back into still leaves PCID to refuse (an EPYC host's kernel set CR4.PCIDE)."""
    assert features_to_refuse(table(0), MONITOR_HIDDEN, monitor=True) == list(MONITOR_HIDDEN)
    assert features_to_refuse(table(0), PVM_HIDDEN, monitor=False) == []
    assert [f.name for f in features_to_refuse(table(1 << 13), PVM_HIDDEN, monitor=False)] == ["cx16"]
    added = dict(kernel_parameters("console=ttyS0", features_to_refuse(table(0), MONITOR_HIDDEN, True),
                                   code_emulated=True, monitor=True))
    # xsaves, xsavec, fsgsbase, smap, pcid, invpcid, rdtscp, rdpid, shstk, ibt
    refused = "clearcpuid=323,321,288,308,145,298,59,534,519,596"
    assert list(added) == [refused]  # not noxsave: the kernel keeps XSAVE
    assert "natively in ring 3" in added[refused] and "KVM" not in added[refused]


def test_the_tsc_deadline_timer_is_offered_in_leaf_1_only() -> None:
    offered = with_tsc_deadline(table(0))
    assert offered[0].ecx == 1 << TSC_DEADLINE_BIT and offered[1].ebx == 0
    assert table(0)[0].ecx == 0  # a copy: the table it was given is unchanged


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["deadline", "deadline x2apic"])
def test_the_tsc_deadline_timer_ticks_on_every_host(mode: str) -> None:
    """KVM emulates the LAPIC timer's TSC-deadline mode everywhere (KVM_CAP_TSC_DEADLINE_TIMER), but
    takes the mode only from a guest whose CPUID has it, and on VT-x and AMD-V its supported CPUID
    leaves it out. Before worldswitch added it, the timer guest in this mode got no tick on the
    nested AMD-V host (120 s, not one of 300)."""
    from worldswitch.vmm.result import StopReason
    from worldswitch.vmx.api import Machine

    with Machine(guest="timer", args=f"300 {mode}") as vm:
        result = vm.run(timeout=120)
    assert result.reason is StopReason.GUEST_DONE, result.message
    ticks, user_ticks, is_pit = result.details["ucall"].args[:3]
    assert ticks == 300 and user_ticks > 0 and is_pit == 0
