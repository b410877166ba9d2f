"""The world-switch statistics as text: the one line `worldswitch run` ends with and the table of
`--stats` (the numbers themselves are the VMM's: vmm/stats.py)."""

from __future__ import annotations

from ..vmm.stats import KVM_VCPU_COUNTERS, MachineStats


def summary(stats: MachineStats) -> str:
    """One line: the short report `worldswitch run` prints at the end."""
    switches = stats.world_switches
    guest = sum(v.guest_ns for v in stats.vcpus)
    vmx = sum(v.vmx_ns for v in stats.vcpus)
    parts = ", ".join(f"{count} {name}" for name, count in sorted(stats.exits.items(), key=lambda kv: -kv[1]))
    per_exit = f", {(guest + vmx) / switches / 1000:.1f} us per round trip" if switches else ""
    return (
        f"world switches: {switches} ({parts or 'none'}) in {stats.wall_ns / 1e6:.1f} ms; "
        f"guest+KVM {guest / 1e6:.1f} ms, VMX {vmx / 1e6:.1f} ms{per_exit}"
    )


def table(stats: MachineStats) -> str:
    """The full per-vCPU, per-reason table of `worldswitch run --stats`."""
    reasons = sorted({name for v in stats.vcpus for name in v.exits}, key=lambda n: -stats.exits.get(n, 0))
    lines = [f"world-switch statistics ({stats.wall_ns / 1e6:.1f} ms wall)"]
    header = f"{'exit reason':<16}" + "".join(f"{'vcpu' + str(v.vcpu):>12}" for v in stats.vcpus) + f"{'total':>12}"
    lines.append(header)
    for name in reasons:
        row = f"{name:<16}" + "".join(f"{v.exits.get(name, 0):>12}" for v in stats.vcpus)
        lines.append(row + f"{stats.exits[name]:>12}")
    lines.append(f"{'all':<16}" + "".join(f"{v.world_switches:>12}" for v in stats.vcpus) + f"{stats.world_switches:>12}")

    def ms(ns: int) -> str:
        return f"{ns / 1e6:.3f} ms"

    lines.append(f"{'in KVM_RUN':<16}" + "".join(f"{ms(v.guest_ns):>12}" for v in stats.vcpus))
    lines.append(f"{'in VMX':<16}" + "".join(f"{ms(v.vmx_ns):>12}" for v in stats.vcpus))
    for v in stats.vcpus:
        if v.world_switches:
            lines.append(
                f"vcpu{v.vcpu}: {(v.guest_ns + v.vmx_ns) / v.world_switches / 1000:.2f} us per world switch "
                f"({v.guest_ns / v.world_switches / 1000:.2f} in KVM_RUN, {v.vmx_ns / v.world_switches / 1000:.2f} in VMX); "
                f"{v.kicks} kicks, slowest back in {v.kick_latency_ns_max / 1000:.0f} us"
            )
    if any(v.kvm for v in stats.vcpus):
        lines.append("KVM's own counters (kernel side; exits it handled itself never reach the VMX):")
        names = [n for n in KVM_VCPU_COUNTERS if any(v.kvm.get(n) for v in stats.vcpus)]
        for name in names:
            lines.append(f"  {name:<20}" + "".join(f"{v.kvm.get(name, 0):>12}" for v in stats.vcpus))
        for v in stats.vcpus:
            if v.kvm.get("exits") is not None:
                in_kernel = v.kvm["exits"] - v.world_switches
                lines.append(f"  vcpu{v.vcpu}: {max(0, in_kernel)} of KVM's {v.kvm['exits']} exits were handled in the kernel")
    for v in stats.vcpus:
        if v.vmx_emulated:
            done = ", ".join(f"{count} {name}" for name, count in v.vmx_emulated.items())
            lines.append(f"vcpu{v.vcpu}: the VMX emulated (trap-and-emulate) what KVM left undone: {done}")
        if v.copies:
            lines.append(f"vcpu{v.vcpu}: the VMX made {v.copies['calls']} of the boot loader's copies ({v.copies['bytes']} "
                         "bytes) where KVM would have emulated each instruction (vmm/x86/copyloop.py)")
    if stats.monitor:
        traps = ", ".join(f"{count} {kind}" for kind, count in stats.monitor.items() if count)
        lines.append(f"monitor: {stats.monitor.get('events', 0)} traps into the in-guest monitor ({traps or 'none'})")
    if stats.coalesced.get("writes"):
        lines.append(f"coalesced port writes: {stats.coalesced['writes']} without a world switch, "
                     f"applied in {stats.coalesced['drains']} drains")
    if stats.vmx_resident_kib:
        lines.append(
            f"memory: VMX resident {stats.vmx_resident_kib / 1024:.1f} MiB, of which guest RAM "
            f"{stats.guest_resident_kib / 1024:.1f} MiB; VMX overhead {stats.vmx_overhead_kib / 1024:.1f} MiB"
        )
    if stats.unmapped_mmio or stats.unmapped_pio:
        lines.append(f"unmapped accesses: {stats.unmapped_mmio} MMIO, {stats.unmapped_pio} port I/O")
    for name, counters in sorted(stats.devices.items()):
        done = ", ".join(f"{key} {value}" for key, value in counters.items() if value)
        lines.append(f"{name}: {done or 'idle'}")
    return "\n".join(lines)
