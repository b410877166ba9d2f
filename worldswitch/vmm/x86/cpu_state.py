"""Everything KVM holds about a vCPU and a VM, captured and put back: what a snapshot stores.

A vCPU: general and special registers, FPU and the XSAVE area, XCRs, every MSR KVM lists as
saveable that reads back, the LAPIC, pending events, debug registers, the multiprocessing state
and its CPUID. A VM: both PICs and the IOAPIC, the PIT, and the kvmclock.

Restoring follows the order KVM needs (as QEMU does it): CPUID before anything that depends on
features, special registers before general ones, MSRs and the LAPIC after, events and MP state last.
The TSC deadline comes after the LAPIC: KVM drops a write of it while the LAPIC's timer is not in
TSC-deadline mode, which a new vCPU's is not until its LAPIC state is set (QEMU's
kvm_put_tscdeadline_msr has the same order).
"""

from __future__ import annotations

import ctypes

from ...driver import structs as s
from ...driver.constants import KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MP_STATE_RUNNABLE
from ...driver.kvm import Kvm, Vcpu, Vm
from ...errors import KvmError
from ...memory.guest import GuestMemory
from ...record import record
from .emulate import EmulationRefused, read_virtual

IRQCHIPS = (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)
MSR_TSC_DEADLINE = 0x6E0  # IA32_TSC_DEADLINE (SDM vol. 4, table 2-2)
BREAKPOINT, OVERFLOW = 3, 4  # the vectors of the software exceptions: int3 (and int 3), into
SOFTWARE_EXCEPTION_ENDINGS = ((b"\xcc", BREAKPOINT), (b"\xcd\x03", BREAKPOINT), (b"\xce", OVERFLOW))


@record
class VcpuState:
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    msrs: dict[int, int]
    lapic: bytes
    events: bytes
    debugregs: bytes
    mp_state: int
    cpuid: list[bytes]

    def as_json(self) -> dict[str, object]:
        return {
            "regs": self.regs.hex(), "sregs": self.sregs.hex(), "fpu": self.fpu.hex(), "xsave": self.xsave.hex(),
            "xcrs": self.xcrs.hex(), "msrs": {f"{index:#x}": value for index, value in self.msrs.items()},
            "lapic": self.lapic.hex(), "events": self.events.hex(), "debugregs": self.debugregs.hex(),
            "mp_state": self.mp_state, "cpuid": [entry.hex() for entry in self.cpuid],
        }

    @classmethod
    def from_json(cls, data: dict) -> "VcpuState":  # type: ignore[type-arg]
        raw = {key: bytes.fromhex(data[key]) for key in ("regs", "sregs", "fpu", "xsave", "xcrs", "lapic", "events", "debugregs")}
        for key, struct_type in (("regs", s.kvm_regs), ("sregs", s.kvm_sregs), ("fpu", s.kvm_fpu), ("xcrs", s.kvm_xcrs),
                                 ("lapic", s.kvm_lapic_state), ("events", s.kvm_vcpu_events),
                                 ("debugregs", s.kvm_debugregs)):
            if len(raw[key]) != ctypes.sizeof(struct_type):
                raise ValueError(f"vCPU {key} has {len(raw[key])} bytes, not {ctypes.sizeof(struct_type)}")
        return cls(
            msrs={int(index, 16): int(value) for index, value in data["msrs"].items()},
            mp_state=int(data["mp_state"]), cpuid=[bytes.fromhex(entry) for entry in data["cpuid"]], **raw,
        )


def saveable_msrs(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """MSRs KVM lists for saving that this vCPU can actually read (some are listed but absent)."""
    readable = []
    for index in kvm.get_msr_index_list():
        try:
            if index in vcpu.get_msrs([index]):
                readable.append(index)
        except KvmError:
            continue
    return readable


def software_exception_in_flight(vcpu: Vcpu, memory: GuestMemory) -> bool:
    """Whether the vCPU may hold an int3 or into that it executed in ring 3 and has not delivered yet,
    which KVM_GET_VCPU_EVENTS does not show (docs/pvm.md, section 8). Where RIP stays on the
    instruction (VT-x, AMD-V) it comes again; on PVM RIP is past it. The queue itself cannot be read,
    and the last vector KVM reports may be long delivered: so "may", when that vector is a software
    exception's, the vCPU is in ring 3 and not halted, and the bytes just before RIP are its
    instruction. A snapshot lets such a vCPU run on a little before it saves it."""
    events = vcpu.get_vcpu_events()
    if events.exception.nr not in (BREAKPOINT, OVERFLOW) or vcpu.get_mp_state() != KVM_MP_STATE_RUNNABLE:
        return False
    sregs = vcpu.get_sregs()
    if sregs.cs.dpl != 3:
        return False
    end = sregs.cs.base + vcpu.get_regs().rip
    for ending, vector in SOFTWARE_EXCEPTION_ENDINGS:
        if vector != events.exception.nr or end < len(ending):
            continue
        try:
            if read_virtual(vcpu, memory, end - len(ending), len(ending)) == ending:
                return True
        except (EmulationRefused, KvmError):
            continue  # not the guest's code: no instruction of its ends there
    return False


def save_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    # The MP state first: reading it makes KVM take the INIT and SIPI pending at the vCPU's LAPIC
    # (kvm_apic_accept_events), which set its registers. Read after them, it said RUNNABLE of an AP
    # whose registers were still the reset state's (CS:IP f000:fff0): restored, that AP ran the reset
    # vector and never its code (8 snapshots in 10 of the `count` guest taken as its APs started).
    mp_state = vcpu.get_mp_state()
    return VcpuState(
        regs=bytes(vcpu.get_regs()), sregs=bytes(vcpu.get_sregs()), fpu=bytes(vcpu.get_fpu()),
        xsave=vcpu.get_xsave(), xcrs=bytes(vcpu.get_xcrs()), msrs=vcpu.get_msrs(msr_indices),
        lapic=bytes(vcpu.get_lapic()), events=bytes(vcpu.get_vcpu_events()), debugregs=bytes(vcpu.get_debugregs()),
        mp_state=mp_state, cpuid=[bytes(entry) for entry in vcpu.get_cpuid2()],
    )


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Put `state` into a new vCPU, one that has not run."""
    vcpu.set_cpuid2([s.kvm_cpuid_entry2.from_buffer_copy(entry) for entry in state.cpuid])
    restore_running_vcpu(vcpu, state)


def restore_running_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Put `state` back into the vCPU it was saved from: all of it but the CPUID, which KVM refuses
    to change once a vCPU has run."""
    vcpu.set_sregs(s.kvm_sregs.from_buffer_copy(state.sregs))
    vcpu.set_regs(s.kvm_regs.from_buffer_copy(state.regs))
    vcpu.set_xsave(state.xsave)
    vcpu.set_xcrs(s.kvm_xcrs.from_buffer_copy(state.xcrs))
    vcpu.set_fpu(s.kvm_fpu.from_buffer_copy(state.fpu))
    for index, value in state.msrs.items():  # one at a time: a refused MSR names itself
        if index != MSR_TSC_DEADLINE:
            vcpu.set_msrs({index: value})
    vcpu.set_lapic(s.kvm_lapic_state.from_buffer_copy(state.lapic))
    if MSR_TSC_DEADLINE in state.msrs:  # armed only now that the LAPIC's timer is in its mode
        vcpu.set_msrs({MSR_TSC_DEADLINE: state.msrs[MSR_TSC_DEADLINE]})
    vcpu.set_vcpu_events(s.kvm_vcpu_events.from_buffer_copy(state.events))
    vcpu.set_debugregs(s.kvm_debugregs.from_buffer_copy(state.debugregs))
    vcpu.set_mp_state(state.mp_state)


@record
class VmState:
    irqchips: list[bytes]
    pit: bytes
    clock: int

    def as_json(self) -> dict[str, object]:
        return {"irqchips": [chip.hex() for chip in self.irqchips], "pit": self.pit.hex(), "clock": self.clock}

    @classmethod
    def from_json(cls, data: dict) -> "VmState":  # type: ignore[type-arg]
        chips = [bytes.fromhex(chip) for chip in data["irqchips"]]
        if len(chips) != len(IRQCHIPS) or any(len(c) != ctypes.sizeof(s.kvm_irqchip) for c in chips):
            raise ValueError("the irqchip state is malformed")
        pit = bytes.fromhex(data["pit"])
        if len(pit) != ctypes.sizeof(s.kvm_pit_state2):
            raise ValueError("the PIT state is malformed")
        return cls(chips, pit, int(data["clock"]))


def save_vm(vm: Vm, clock: int | None = None) -> VmState:
    """`clock`: the kvmclock to record instead of the running one (where the machine was paused)."""
    return VmState([bytes(vm.get_irqchip(chip)) for chip in IRQCHIPS], bytes(vm.get_pit2()),
                   vm.get_clock().clock if clock is None else clock)


def restore_vm(vm: Vm, state: VmState) -> None:
    for chip in state.irqchips:
        vm.set_irqchip(s.kvm_irqchip.from_buffer_copy(chip))
    vm.set_pit2(s.kvm_pit_state2.from_buffer_copy(state.pit))
    vm.set_clock(s.kvm_clock_data(clock=state.clock))
