"""World-switch accounting: per vCPU, how many times KVM_RUN returned and why, how long the vCPU
spent inside KVM_RUN (guest, plus what KVM handled in the kernel) and how long in the VMX
handling exits. Numbers are copied out of the run loops into plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..driver.constants import ExitReason


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


@dataclass(frozen=True)
class VcpuStats:
    vcpu: int
    exits: dict[str, int]  # exit reason name -> world switches that ended with it
    guest_ns: int  # time inside KVM_RUN
    vmx_ns: int  # time in the VMX between two KVM_RUNs, handling exits (parked time excluded)
    kicks: int  # host events that asked this vCPU to come back (the interrupt path)
    kick_latency_ns_max: int  # longest time from a kick to the vCPU being back in the VMX
    kvm: dict[str, int] = field(default_factory=dict)  # KVM's own counters (KVM_GET_STATS_FD)
    vmx_emulated: dict[str, int] = field(default_factory=dict)  # instructions the VMX emulated for KVM

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
        }


@dataclass(frozen=True)
class MachineStats:
    vcpus: list[VcpuStats]
    wall_ns: int
    unmapped_mmio: int = 0
    unmapped_pio: int = 0
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    vmx_resident_kib: int = 0  # the whole VMX process (VmRSS)
    guest_resident_kib: int = 0  # of which guest RAM

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
        }

    def summary(self) -> str:
        """One line: the short report `worldswitch run` prints at the end."""
        switches = self.world_switches
        guest = sum(v.guest_ns for v in self.vcpus)
        vmx = sum(v.vmx_ns for v in self.vcpus)
        parts = ", ".join(f"{count} {name}" for name, count in sorted(self.exits.items(), key=lambda kv: -kv[1]))
        per_exit = f", {(guest + vmx) / switches / 1000:.1f} us per round trip" if switches else ""
        return (
            f"world switches: {switches} ({parts or 'none'}) in {self.wall_ns / 1e6:.1f} ms; "
            f"guest+KVM {guest / 1e6:.1f} ms, VMX {vmx / 1e6:.1f} ms{per_exit}"
        )

    def table(self) -> str:
        """The full per-vCPU, per-reason table of `worldswitch run --stats`."""
        reasons = sorted({name for v in self.vcpus for name in v.exits}, key=lambda n: -self.exits.get(n, 0))
        lines = [f"world-switch statistics ({self.wall_ns / 1e6:.1f} ms wall)"]
        header = f"{'exit reason':<16}" + "".join(f"{'vcpu' + str(v.vcpu):>12}" for v in self.vcpus) + f"{'total':>12}"
        lines.append(header)
        for name in reasons:
            row = f"{name:<16}" + "".join(f"{v.exits.get(name, 0):>12}" for v in self.vcpus)
            lines.append(row + f"{self.exits[name]:>12}")
        lines.append(f"{'all':<16}" + "".join(f"{v.world_switches:>12}" for v in self.vcpus) + f"{self.world_switches:>12}")

        def ms(ns: int) -> str:
            return f"{ns / 1e6:.3f} ms"

        lines.append(f"{'in KVM_RUN':<16}" + "".join(f"{ms(v.guest_ns):>12}" for v in self.vcpus))
        lines.append(f"{'in VMX':<16}" + "".join(f"{ms(v.vmx_ns):>12}" for v in self.vcpus))
        for v in self.vcpus:
            if v.world_switches:
                lines.append(
                    f"vcpu{v.vcpu}: {(v.guest_ns + v.vmx_ns) / v.world_switches / 1000:.2f} us per world switch "
                    f"({v.guest_ns / v.world_switches / 1000:.2f} in KVM_RUN, {v.vmx_ns / v.world_switches / 1000:.2f} in VMX); "
                    f"{v.kicks} kicks, slowest back in {v.kick_latency_ns_max / 1000:.0f} us"
                )
        if any(v.kvm for v in self.vcpus):
            lines.append("KVM's own counters (kernel side; exits it handled itself never reach the VMX):")
            names = [n for n in KVM_VCPU_COUNTERS if any(v.kvm.get(n) for v in self.vcpus)]
            for name in names:
                lines.append(f"  {name:<20}" + "".join(f"{v.kvm.get(name, 0):>12}" for v in self.vcpus))
            for v in self.vcpus:
                if v.kvm.get("exits") is not None:
                    in_kernel = v.kvm["exits"] - v.world_switches
                    lines.append(f"  vcpu{v.vcpu}: {max(0, in_kernel)} of KVM's {v.kvm['exits']} exits were handled in the kernel")
        for v in self.vcpus:
            if v.vmx_emulated:
                done = ", ".join(f"{count} {name}" for name, count in v.vmx_emulated.items())
                lines.append(f"vcpu{v.vcpu}: the VMX emulated (trap-and-emulate) what KVM left undone: {done}")
        if self.vmx_resident_kib:
            lines.append(
                f"memory: VMX resident {self.vmx_resident_kib / 1024:.1f} MiB, of which guest RAM "
                f"{self.guest_resident_kib / 1024:.1f} MiB; VMX overhead {self.vmx_overhead_kib / 1024:.1f} MiB"
            )
        if self.unmapped_mmio or self.unmapped_pio:
            lines.append(f"unmapped accesses: {self.unmapped_mmio} MMIO, {self.unmapped_pio} port I/O")
        for name, counters in sorted(self.devices.items()):
            done = ", ".join(f"{key} {value}" for key, value in counters.items() if value)
            lines.append(f"{name}: {done or 'idle'}")
        return "\n".join(lines)
