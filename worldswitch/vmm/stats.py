"""World-switch accounting: per vCPU, how many times KVM_RUN returned and why, how long the vCPU
spent inside KVM_RUN (guest, plus what KVM handled in the kernel) and how long in the VMX
handling exits. Numbers are copied out of the run loops into plain records."""

from __future__ import annotations

from ..driver.constants import ExitReason
from ..record import field, record

# KVM's per-vCPU counters shown beside ours: the kernel sees every exit, including those it handles
# itself (in-kernel LAPIC, PIC, IOAPIC and PIT, ioeventfd) and its own instruction emulation.
KVM_VCPU_COUNTERS = (
    "exits", "io_exits", "mmio_exits", "irq_exits", "halt_exits", "signal_exits", "irq_window_exits",
    "irq_injections", "insn_emulation", "insn_emulation_fail", "pf_taken", "pf_fixed", "halt_wakeup",
)


def reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name.lower()
    except ValueError:
        return f"reason{reason}"


@record(frozen=True)
class VcpuStats:
    vcpu: int
    exits: dict[str, int]  # exit reason name -> world switches that ended with it
    guest_ns: int  # time inside KVM_RUN
    vmx_ns: int  # time in the VMX between two KVM_RUNs, handling exits (parked time excluded)
    kicks: int  # host events that asked this vCPU to come back (the interrupt path)
    kick_latency_ns_max: int  # longest time from a kick to the vCPU being back in the VMX
    kvm: dict[str, int] = field(default_factory=dict)  # KVM's own counters (KVM_GET_STATS_FD)
    vmx_emulated: dict[str, int] = field(default_factory=dict)  # instructions the VMX emulated for KVM
    copies: dict[str, int] = field(default_factory=dict)  # a boot loader's copies the VMM ran for KVM: calls, bytes

    @property
    def world_switches(self) -> int:
        return sum(self.exits.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "vcpu": self.vcpu,
            "world_switches": self.world_switches,
            "exits": dict(self.exits),
            "guest_ns": self.guest_ns,
            "vmx_ns": self.vmx_ns,
            "kicks": self.kicks,
            "kick_latency_ns_max": self.kick_latency_ns_max,
            "kvm": dict(self.kvm),
            "vmx_emulated": dict(self.vmx_emulated),
            "copies": dict(self.copies),
        }


@record(frozen=True)
class MachineStats:
    vcpus: list[VcpuStats]
    wall_ns: int
    unmapped_mmio: int = 0
    unmapped_pio: int = 0
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    vmx_resident_kib: int = 0  # the whole VMX process (VmRSS)
    guest_resident_kib: int = 0  # of which guest RAM
    monitor: dict[str, int] = field(default_factory=dict)  # the in-guest monitor's traps by kind (--monitor)
    coalesced: dict[str, int] = field(default_factory=dict)  # port writes KVM queued instead of exiting

    @property
    def vmx_overhead_kib(self) -> int:
        """Resident memory of the VMX beyond the guest RAM it backs."""
        return max(0, self.vmx_resident_kib - self.guest_resident_kib)

    @property
    def world_switches(self) -> int:
        return sum(v.world_switches for v in self.vcpus)

    @property
    def exits(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for v in self.vcpus:
            for name, count in v.exits.items():
                total[name] = total.get(name, 0) + count
        return total

    def as_dict(self) -> dict[str, object]:
        return {
            "world_switches": self.world_switches,
            "exits": self.exits,
            "wall_ns": self.wall_ns,
            "unmapped_mmio": self.unmapped_mmio,
            "unmapped_pio": self.unmapped_pio,
            "vmx_resident_kib": self.vmx_resident_kib,
            "guest_resident_kib": self.guest_resident_kib,
            "vmx_overhead_kib": self.vmx_overhead_kib,
            "vcpus": [v.as_dict() for v in self.vcpus],
            "devices": self.devices,
            "monitor": self.monitor,
            "coalesced": self.coalesced,
        }
