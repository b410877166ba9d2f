"""The driver binding on the real /dev/kvm: every state ioctl pair round-trips on a live VM."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from worldswitch.driver import requests as rq
from worldswitch.driver import structs as s
from worldswitch.driver.constants import (KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_MP_STATE_RUNNABLE, Cap,
                                          ExitReason)
from worldswitch.driver.exits import IoOut, MmioWrite, decode_exit
from worldswitch.driver.ioctl import ioctl
from worldswitch.driver.kvm import PIO_DATA_OFFSET, Kvm
from worldswitch.errors import KvmError, KvmUnavailableError
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.x86.longmode import setup_long_mode

pytestmark = pytest.mark.kvm

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_STAR = 0xC0000081
MSR_EFER = 0xC0000080
EFER_SCE = 1 << 0


@pytest.fixture
def vm():
    kvm = Kvm.open()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.create_irqchip()
    vm.create_pit2()
    memory = GuestMemory([(0, 2 << 20)])
    memory.register(vm)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    yield kvm, vm, vcpu, memory
    vcpu.close()
    vm.close()
    kvm.close()
    memory.close()


def test_system_queries(vm) -> None:
    kvm, _, _, _ = vm
    assert kvm.get_api_version() == 12
    assert kvm.get_vcpu_mmap_size() >= 4096 * 2
    cpuid = kvm.get_supported_cpuid()
    assert any(entry.function == 0 for entry in cpuid)
    assert kvm.check_extension(Cap.USER_MEMORY) == 1
    msrs = kvm.get_msr_index_list()
    assert MSR_STAR in msrs


def test_regs_sregs_and_msrs_round_trip(vm) -> None:
    _, _, vcpu, memory = vm
    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rip, regs.rflags = 0x1234, 0xFEDC, 0x100000, 0x2
    vcpu.set_regs(regs)
    again = vcpu.get_regs()
    assert (again.rax, again.r15, again.rip) == (0x1234, 0xFEDC, 0x100000)
    sregs = vcpu.get_sregs()
    setup_long_mode(memory, sregs)
    vcpu.set_sregs(sregs)
    back = vcpu.get_sregs()
    assert back.cr3 == sregs.cr3 and back.efer & 0x500 == 0x500 and back.cs.l == 1
    vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10})
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS]) == {MSR_IA32_SYSENTER_CS: 0x10}


def test_a_refused_msr_names_itself(vm) -> None:
    _, _, vcpu, _ = vm
    with pytest.raises(KvmError, match="0xdeadbeef"):
        vcpu.set_msrs({0xDEADBEEF: 1})


def test_fpu_lapic_events_debugregs_xsave_xcrs_round_trip(vm) -> None:
    _, _, vcpu, _ = vm
    fpu = vcpu.get_fpu()
    fpu.mxcsr = 0x1F80
    fpu.xmm[3][0] = 0xAB
    vcpu.set_fpu(fpu)
    assert vcpu.get_fpu().xmm[3][0] == 0xAB
    lapic = vcpu.get_lapic()
    vcpu.set_lapic(lapic)
    assert bytes(vcpu.get_lapic().regs)[0x20:0x24] == bytes(lapic.regs)[0x20:0x24]  # APIC ID
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    debug = vcpu.get_debugregs()
    debug.db[0] = 0x1000
    vcpu.set_debugregs(debug)
    assert vcpu.get_debugregs().db[0] == 0x1000
    area = vcpu.get_xsave()
    assert len(area) == vcpu.xsave_size()
    vcpu.set_xsave(area)
    xcrs = vcpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1  # XCR0.x87 is always set
    vcpu.set_xcrs(xcrs)
    assert vcpu.get_mp_state() == KVM_MP_STATE_RUNNABLE
    assert len(vcpu.get_cpuid2()) > 10


def test_vm_state_round_trips(vm) -> None:
    _, kvm_vm, _, _ = vm
    pic = kvm_vm.get_irqchip(KVM_IRQCHIP_PIC_MASTER)
    kvm_vm.set_irqchip(pic)
    ioapic = kvm_vm.get_irqchip(KVM_IRQCHIP_IOAPIC)
    assert ioapic.chip.ioapic.base_address == 0xFEC00000
    kvm_vm.set_irqchip(ioapic)
    pit = kvm_vm.get_pit2()
    kvm_vm.set_pit2(pit)
    clock = kvm_vm.get_clock()
    assert clock.clock > 0
    kvm_vm.irq_line(4, 1)
    kvm_vm.irq_line(4, 0)


def test_one_world_switch_decoded(vm) -> None:
    _, _, vcpu, memory = vm
    sregs = vcpu.get_sregs()
    setup_long_mode(memory, sregs)
    vcpu.set_sregs(sregs)
    # mov $0x2a, %al; out %al, $0x10; movl $0x99, 0x40000000 (above this VM's 2 MiB of RAM)
    code = bytes.fromhex("b02a e610 c7042500 000040 99000000".replace(" ", ""))
    memory.write(0x100000, code)
    vcpu.set_regs(s.kvm_regs(rip=0x100000, rflags=2, rsp=0x80000))
    assert vcpu.run() == ExitReason.IO
    assert decode_exit(ExitReason.IO, vcpu.kvm_run, vcpu.run_mmap) == IoOut(0x10, 1, 1, b"\x2a")
    assert vcpu.run() == ExitReason.MMIO
    assert decode_exit(ExitReason.MMIO, vcpu.kvm_run, vcpu.run_mmap) == MmioWrite(0x40000000, (0x99).to_bytes(4, "little"))


def kvm_regs_by_ioctl(vcpu) -> s.kvm_regs:
    """What KVM holds, asked past the binding (which may answer from the kvm_run page)."""
    regs = s.kvm_regs()
    ioctl(vcpu.fd, rq.KVM_GET_REGS, regs)
    return regs


def test_shared_registers_are_kvms_at_each_exit_and_reach_the_guest(vm) -> None:
    _, _, vcpu, memory = vm
    if not vcpu.can_share_registers:
        pytest.skip("this host's KVM has no KVM_CAP_SYNC_REGS for regs and sregs")
    sregs = vcpu.get_sregs()
    setup_long_mode(memory, sregs)
    vcpu.set_sregs(sregs)
    # out %al, $0x10; inc %rax; out %al, $0x10; inc %rax; out %al, $0x10
    memory.write(0x100000, bytes.fromhex("e610 48ffc0 e610 48ffc0 e610".replace(" ", "")))
    vcpu.set_regs(s.kvm_regs(rip=0x100000, rflags=2, rsp=0x80000, rax=0x2A))
    vcpu.share_registers(True)
    assert vcpu.get_regs().rax == 0x2A and vcpu.get_sregs().cr3 == sregs.cr3  # read in when sharing starts

    assert vcpu.run() == ExitReason.IO
    assert bytes(vcpu.get_regs()) == bytes(kvm_regs_by_ioctl(vcpu))  # stored by KVM at the exit
    regs = vcpu.get_regs()
    regs.rax = 0x55
    vcpu.set_regs(regs)
    assert kvm_regs_by_ioctl(vcpu).rax == 0x2A  # in the page only: no ioctl was made for it
    assert vcpu.run() == ExitReason.IO
    assert vcpu.run_mmap[PIO_DATA_OFFSET] == 0x56  # loaded by KVM_RUN: the guest's inc saw 0x55

    regs = vcpu.get_regs()
    regs.rax = 0x70
    vcpu.set_regs(regs)
    vcpu.get_vcpu_events()  # any other ioctl: KVM has the page's registers before it
    assert kvm_regs_by_ioctl(vcpu).rax == 0x70
    regs.rax = 0x99
    ioctl(vcpu.fd, rq.KVM_SET_REGS, regs)  # changed behind the page's back, as an ioctl may
    efer = vcpu.get_sregs().efer
    vcpu.set_msrs({MSR_EFER: efer | EFER_SCE})  # a register set changed by another ioctl
    assert vcpu.get_regs().rax == 0x99 and vcpu.get_sregs().efer == efer | EFER_SCE  # read again after it

    regs.rax = 0x80
    vcpu.set_regs(regs)
    vcpu.share_registers(False)  # what the page held reaches KVM when sharing ends
    assert vcpu.kvm_run.kvm_valid_regs == 0 and kvm_regs_by_ioctl(vcpu).rax == 0x80
    assert vcpu.run() == ExitReason.IO and vcpu.run_mmap[PIO_DATA_OFFSET] == 0x81


def test_immediate_exit_returns_intr_without_entering(vm) -> None:
    _, _, vcpu, _ = vm
    vcpu.kvm_run.immediate_exit = 1
    rip_before = vcpu.get_regs().rip
    assert vcpu.run() == ExitReason.INTR
    assert vcpu.get_regs().rip == rip_before


def test_missing_device_node_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))
    not_kvm = tmp_path / "file"
    not_kvm.write_bytes(b"")
    with pytest.raises(KvmError) as raised:
        Kvm(str(not_kvm))
    assert raised.value.errno == errno.ENOTTY


def test_permission_denied_is_one_clear_error(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(KvmUnavailableError, match="add your user to the 'kvm' group"):
        Kvm()


def test_structures_are_plain_ctypes() -> None:
    assert ctypes.sizeof(s.kvm_run) > 2048
