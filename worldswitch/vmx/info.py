"""`worldswitch info`: what this host's KVM is and what it can do for worldswitch.

The kind of host decides everything about performance: with VT-x or AMD-V all guest code runs on
the CPU; on a PVM host (KVM's software switcher for machines without either) guest user mode runs
natively but guest kernel mode and real mode are emulated. Module names tell us which driver is
loaded; a measurement with the `probe` guest tells us how fast ring-0 and ring-3 code really run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..devices.ucall import Ucall, UcallCommand
from ..record import asdict, field, record
from ..sandbox import available as sandbox_unavailable
from ..sandbox.seccomp_filter import binding_name as seccomp_binding_name
from ..vmm.builder import build_for_boot
from ..vmm.config import MachineConfig
from ..vmm.host import HostKind, detect_host_kind, probe_kvm, required_capabilities
from ..vmm.result import StopReason

PROBE_ITERATIONS = {"ring0": 100_000, "ring3": 2_000_000}
MONITOR_ITERATIONS = 2_000_000  # ring 0 under the in-guest monitor, where it applies: as fast as ring 3


@record
class HostInfo:
    kvm_path: str
    api_version: int
    cpu_model: str
    host_cpus: int
    kind: HostKind
    capabilities: dict[str, int]
    required_missing: list[str]
    max_vcpus: int
    recommended_vcpus: int
    memory_slots: int
    measured: dict[str, float] = field(default_factory=dict)  # loop iterations per second, by ring
    syscall_ring: int | None = None  # the ring a guest's SYSCALL from ring 3 lands in (0 on hardware)
    kernel_syscall_ring: int | None = None  # the same with LSTAR in kernel pages, as Linux has it
    sandbox: str = ""  # what confines a VMX started here (worldswitch/sandbox/)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)  # the kind a table of its own, as JSON has it


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def measure_rings(monitor: bool = False) -> dict[str, float]:
    """Loop iterations per second in ring 0 and ring 3, timed between the probe guest's SYNC and
    DONE ucalls (so set-up and world switches are not counted); with `monitor`, also ring 0 under
    the in-guest monitor ("ring0_monitor")."""
    rates: dict[str, float] = {}
    runs = [(ring, ring, iterations, False) for ring, iterations in PROBE_ITERATIONS.items()]
    if monitor:
        runs.append(("ring0_monitor", "ring0", MONITOR_ITERATIONS, True))
    for name, ring, iterations, under_monitor in runs:
        stamps: list[int] = []

        def stamp(call: Ucall) -> None:
            if call.command in (UcallCommand.SYNC, UcallCommand.DONE):
                stamps.append(time.perf_counter_ns())

        config = MachineConfig(guest="probe", args=f"{ring} {iterations}", monitor=under_monitor)
        machine = build_for_boot(config, lambda _b: None)
        with machine:
            machine.outcome.listen_to_ucalls(stamp)
            machine.start()
            result = machine.wait(60)
            if result is None or result.reason is not StopReason.GUEST_DONE or len(stamps) != 2:
                continue
        rates[name] = iterations / ((stamps[1] - stamps[0]) / 1e9)
    return rates


def measure_syscall(kernel_pages: bool = False) -> int | None:
    """The ring in which the probe guest's SYSCALL handler ran: 0 where KVM implements SYSCALL
    from guest user mode as the CPU does; None if the probe did not report. With `kernel_pages`
    the handler is in a supervisor-only page, as a kernel's is: where the host leaves SYSCALL in
    ring 3, that is the case the VMX completes (vmm/x86/user_syscall.py)."""
    args = "syscall kernel" if kernel_pages else "syscall"
    machine = build_for_boot(MachineConfig(guest="probe", args=args), lambda _b: None)
    with machine:
        machine.start()
        result = machine.wait(30)
        if result is None:
            machine.stop()
            return None
    ucall = result.details.get("ucall")
    return int(ucall.args[0]) if result.reason is StopReason.GUEST_DONE and ucall is not None else None  # type: ignore[attr-defined]


def gather(kvm_path: str = "/dev/kvm", measure: bool = True) -> HostInfo:
    model = _cpu_model()
    kvm = probe_kvm(kvm_path)
    caps = kvm.capabilities
    info = HostInfo(
        kvm_path=kvm_path,
        api_version=kvm.api_version,
        cpu_model=model,
        host_cpus=os.cpu_count() or 1,
        kind=detect_host_kind(),
        capabilities=caps,
        required_missing=kvm.required_missing,
        max_vcpus=caps["MAX_VCPUS"],
        recommended_vcpus=caps["NR_VCPUS"],
        memory_slots=caps["NR_MEMSLOTS"],
        sandbox=sandbox_summary(),
    )
    if measure and not info.required_missing:
        info.measured = measure_rings(monitor=info.kind.kernel_code_emulated)
        info.syscall_ring = measure_syscall()
        info.kernel_syscall_ring = measure_syscall(kernel_pages=True) if info.syscall_ring else info.syscall_ring
    return info


def sandbox_summary() -> str:
    """What `worldswitch run` will confine its VMX with here, or why it cannot."""
    missing = sandbox_unavailable()
    if missing is not None:
        return f"unavailable: {missing}"
    jail = "; --jail DIR --uid --gid also chroots and changes user" if os.geteuid() == 0 else ""
    return (f"on by default (--no-sandbox turns it off): seccomp allow-list through {seccomp_binding_name()}, "
            f"no capabilities, no_new_privs{jail}")


def _rate(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f}G"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.0f}k"


def format_info(info: HostInfo) -> str:
    lines = [
        f"KVM          {info.kvm_path}, API version {info.api_version}",
        f"host CPU     {info.cpu_model} ({info.host_cpus} logical CPUs)",
        f"host kind    {info.kind.driver}: {info.kind.description}",
    ]
    if info.measured:
        r0, r3 = info.measured.get("ring0"), info.measured.get("ring3")
        parts = []
        if r0:
            parts.append(f"ring 0 {_rate(r0)} loop iterations/s")
        if r3:
            parts.append(f"ring 3 {_rate(r3)} loop iterations/s")
        monitored = info.measured.get("ring0_monitor")
        if monitored:
            parts.append(f"ring 0 under --monitor {_rate(monitored)}/s")
        verdict = ""
        if r0 and r3:
            verdict = (" -> guest kernel code is EMULATED here" if r3 / r0 > 50 else " -> guest kernel code runs natively")
        lines.append(f"measured     {', '.join(parts)}{verdict}")
    if info.syscall_ring == 0:
        lines.append("syscall      a guest's SYSCALL from ring 3 enters ring 0, as on hardware")
    elif info.syscall_ring is not None and info.kernel_syscall_ring == 0:
        lines.append(f"syscall      this KVM leaves a guest's SYSCALL from ring 3 in ring {info.syscall_ring} (it expects a "
                     "PVM-aware guest kernel); worldswitch completes it into ring 0 for a stock kernel by "
                     "trap-and-emulate, checked just now (docs/pvm.md)")
    elif info.syscall_ring is not None:
        lines.append(f"syscall      a guest's SYSCALL from ring 3 stays in ring {info.syscall_ring}: this KVM expects a "
                     "PVM-aware guest kernel, so a stock Linux boots here but its first user process cannot make "
                     "a system call (docs/pvm.md)")
    if info.kind.kernel_code_emulated:
        lines.append("monitor      applies here: --monitor runs a program's ring 0, or Linux (--kernel, "
                     "or one its firmware boots), natively in ring 3 under worldswitch's in-guest monitor (--cpus above 1 "
                     "for Linux; docs/monitor.md)")
    else:
        lines.append("monitor      not here: this host runs guest kernel code natively, the monitor's job (--monitor is refused)")
    lines.append(f"sandbox      {info.sandbox}")
    lines.append(f"vCPUs        up to {info.max_vcpus} per VM ({info.recommended_vcpus} recommended); {info.memory_slots} memory slots")
    lines.append("capabilities (* = required by worldswitch)")
    required = required_capabilities()
    for name, value in info.capabilities.items():
        mark = "*" if name in required else " "
        state = "yes" if value else "NO"
        extra = f" ({value})" if value not in (0, 1) else ""
        lines.append(f"  {mark} {name:<26} {state}{extra}")
    if info.required_missing:
        lines.append(f"worldswitch cannot run here: missing {', '.join(info.required_missing)}")
    return "\n".join(lines)


def info_json(info: HostInfo) -> str:
    return json.dumps(info.as_dict(), indent=2)
