"""Instructions the VMX emulates when KVM's emulator gives up (KVM_EXIT_INTERNAL_ERROR, suberror
EMULATION): trap-and-emulate, in the VMM.

On PVM hosts all guest ring-0 code runs through KVM's instruction emulator, and that emulator
delivers software interrupts (INT3, INT n, INT1) only in real mode. Linux executes INT3 in ring 0
during boot (its alternatives self-test, text_poke_bp), so the VMX delivers those interrupts itself,
exactly as the CPU would in 64-bit mode (Intel SDM vol. 3, 6.14): read the gate from the guest's
IDT, switch to the IST stack if the gate names one, align the stack to 16 bytes, push SS, RSP,
RFLAGS, CS and the return RIP, clear TF/NT/RF (and IF for an interrupt gate), and enter the
handler. The handler's IRETQ is something this host's KVM does execute.

Only the case a kernel needs is handled: the interrupt raised in 64-bit ring 0 through a present
ring-0 gate. Anything else is left to fail as before, with its instruction named.

FWAIT is the other instruction found this way (Debian's kernel executes it in its FPU set-up): it
only raises a pending unmasked x87 exception, so with none pending it is a one-byte no-op.
"""

from __future__ import annotations

import struct

from ...driver import structs as s
from ...driver.kvm import Vcpu
from ...memory.guest import GuestMemory
from ...record import record

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF
TSS_IST1 = 0x24
EFER_LMA = 1 << 10
FWAIT = b"\x9b"
FSW_ES = 1 << 7  # x87 status word: an unmasked exception is pending


@record(frozen=True)
class SoftwareInterrupt:
    vector: int
    length: int  # of the instruction: the return RIP points past it


def software_interrupt(code: bytes) -> SoftwareInterrupt | None:
    """INT3 (CC), INT1/ICEBP (F1) and INT n (CD ib); prefixes are not allowed on them."""
    if code[:1] == b"\xcc":
        return SoftwareInterrupt(3, 1)
    if code[:1] == b"\xf1":
        return SoftwareInterrupt(1, 1)
    if code[:1] == b"\xcd" and len(code) >= 2:
        return SoftwareInterrupt(code[1], 2)
    return None


@record(frozen=True)
class Gate:
    """A 64-bit IDT entry (Intel SDM vol. 3, 6.14.1)."""

    target: int
    selector: int
    ist: int
    present: bool
    kind: int  # GATE_INTERRUPT or GATE_TRAP for the ones a 64-bit IDT may hold


class EmulationRefused(Exception):
    """The instruction is one we emulate, but not in this state; the original failure stands."""


def physical_address(vcpu: Vcpu, memory: GuestMemory, address: int, length: int) -> int:
    """Guest-physical address of the guest-virtual [address, address+length), which must not cross a
    page; EmulationRefused where the vCPU's tables map no RAM there."""
    translation = vcpu.translate(address)
    if not translation.valid:
        raise EmulationRefused(f"{address:#x} is not mapped")
    physical = translation.physical_address
    if not memory.contains(physical, length):
        raise EmulationRefused(f"{address:#x} is not RAM")
    return physical


def read_virtual(vcpu: Vcpu, memory: GuestMemory, address: int, length: int) -> bytes:
    """Guest-virtual read, translated page by page."""
    out = b""
    while length:
        chunk = min(length, 4096 - address % 4096)
        out += memory.read(physical_address(vcpu, memory, address, chunk), chunk)
        address, length = address + chunk, length - chunk
    return out


class TrapEmulator:
    """Emulates, for one vCPU, what KVM's emulator would not. Counts what it did."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.emulated: dict[str, int] = {}

    def try_emulate(self, vcpu: Vcpu, code: bytes) -> bool:
        if code[:1] == FWAIT:
            return self._fwait(vcpu)
        interrupt = software_interrupt(code)
        if interrupt is None:
            return False
        try:
            self._deliver(vcpu, interrupt)
        except EmulationRefused:
            return False
        name = {3: "int3", 1: "int1"}.get(interrupt.vector, f"int {interrupt.vector:#x}")
        self.emulated[name] = self.emulated.get(name, 0) + 1
        return True

    def _fwait(self, vcpu: Vcpu) -> bool:
        if vcpu.get_fpu().fsw & FSW_ES:
            return False  # a pending x87 exception: #MF is due, which we do not deliver
        regs = vcpu.get_regs()
        regs.rip += 1
        vcpu.set_regs(regs)
        self.emulated["fwait"] = self.emulated.get("fwait", 0) + 1
        return True

    # --- 64-bit interrupt delivery ------------------------------------------------------------

    def read_virtual(self, vcpu: Vcpu, address: int, length: int) -> bytes:
        return read_virtual(vcpu, self.memory, address, length)

    def read_gate(self, vcpu: Vcpu, sregs: s.kvm_sregs, vector: int) -> Gate:
        if vector * 16 + 15 > sregs.idt.limit:
            raise EmulationRefused("vector beyond the IDT limit")
        entry = self.read_virtual(vcpu, sregs.idt.base + vector * 16, 16)
        offset_low, selector, ist, attributes, offset_mid, offset_high = struct.unpack_from("<HHBBHI", entry)
        return Gate(offset_low | (offset_mid << 16) | (offset_high << 32), selector, ist & 7, bool(attributes >> 7),
                    attributes & 0xF)

    def _push(self, vcpu: Vcpu, rsp: int, value: int) -> int:
        rsp = (rsp - 8) & 0xFFFFFFFFFFFFFFFF
        self.memory.write(physical_address(vcpu, self.memory, rsp, 8), struct.pack("<Q", value))  # 8-aligned: one page
        return rsp

    def _deliver(self, vcpu: Vcpu, interrupt: SoftwareInterrupt) -> None:
        sregs = vcpu.get_sregs()
        regs = vcpu.get_regs()
        if not sregs.efer & EFER_LMA or not sregs.cs.l or sregs.cs.dpl != 0:
            raise EmulationRefused("only 64-bit ring-0 software interrupts are emulated")
        gate = self.read_gate(vcpu, sregs, interrupt.vector)
        kind, ist, target = gate.kind, gate.ist, gate.target  # the gate's DPL binds outer rings only
        if not gate.present or kind not in (GATE_INTERRUPT, GATE_TRAP):
            raise EmulationRefused("not a present 64-bit interrupt or trap gate")
        code_segment = self._code_segment(vcpu, sregs, gate.selector)
        if code_segment.dpl != 0 or not code_segment.l:
            raise EmulationRefused("the gate's code segment is not 64-bit ring 0")

        rsp = regs.rsp
        if ist:
            rsp = struct.unpack("<Q", self.read_virtual(vcpu, sregs.tr.base + TSS_IST1 + 8 * (ist - 1), 8))[0]
        rsp &= ~0xF  # the CPU aligns the stack before the frame (SDM 6.14.2)
        for value in (sregs.ss.selector, regs.rsp, regs.rflags, sregs.cs.selector, regs.rip + interrupt.length):
            rsp = self._push(vcpu, rsp, value)

        flags = regs.rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if kind == GATE_INTERRUPT:
            flags &= ~RFLAGS_IF
        regs.rsp, regs.rip, regs.rflags = rsp, target, flags
        if code_segment.selector != sregs.cs.selector:
            sregs.cs = code_segment
            vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)

    def _code_segment(self, vcpu: Vcpu, sregs: s.kvm_sregs, selector: int) -> s.kvm_segment:
        if selector & ~3 == sregs.cs.selector & ~3:
            return sregs.cs
        index = selector & ~7
        if selector & 4 or index + 7 > sregs.gdt.limit:
            raise EmulationRefused("the gate's selector is not in the GDT")
        (descriptor,) = struct.unpack("<Q", self.read_virtual(vcpu, sregs.gdt.base + index, 8))
        access, flags = (descriptor >> 40) & 0xFF, (descriptor >> 52) & 0xF
        return s.kvm_segment(
            base=0, limit=0xFFFFFFFF, selector=selector & ~3, type=access & 0xF, present=access >> 7,
            dpl=(access >> 5) & 3, db=(flags >> 2) & 1, s=(access >> 4) & 1, l=(flags >> 1) & 1, g=flags >> 3,
        )
