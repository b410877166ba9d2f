"""Assembling a Machine from a MachineConfig: KVM objects, memory, the in-kernel irqchip and PIT,
devices wired in an explicit order, the guest loaded, every vCPU set up. Nothing registers
itself; reading this file tells you the whole machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..boot.elf import load_elf, read_image
from ..boot.program import configure_program, reserved_ranges
from ..devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from ..devices.i8042 import COMMAND_PORT, DATA_PORT, I8042
from ..devices.serial import COM1_BASE, COM1_IRQ, REGISTER_COUNT, Serial
from ..devices.testdev import TESTDEV_MMIO, TESTDEV_MMIO_SIZE, TESTDEV_PORT, TESTDEV_PORT_SIZE, SequenceRegister
from ..devices.ucall import UCALL_PORT, UCALL_PORT_SIZE, UcallPort
from ..driver.constants import KVM_PIT_SPEAKER_DUMMY, Cap
from ..driver.kvm import Kvm
from ..errors import ConfigError, WorldswitchError
from ..guests import DEFAULT_GUEST, builtin_path
from .bus import MmioBus, PioBus
from .cpu import cpuid_for_vcpu, set_lint
from .irq import KvmIrqLine
from .kick import install_kick_handler
from .longmode import LongModeLayout, setup_long_mode
from .machine import Machine
from .memmap import MIB, MemoryMap
from .memory import GuestMemory
from .runloop import VcpuRunner

# Addresses the VMX (Intel real-mode support) needs below 4 GiB, inside the PCI hole.
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000

DEFAULT_MEMORY = 128 * MIB


@dataclass
class MachineConfig:
    memory: int = DEFAULT_MEMORY
    cpus: int = 1
    elf: str | None = None  # a user's bare-metal ELF64 program
    guest: str | None = None  # or a built-in guest by name (the default when neither is given)
    args: str = ""  # the program's argument string

    def program(self) -> tuple[str, str]:
        """(display name, path) of the program to boot."""
        if self.elf and self.guest:
            raise ConfigError("give either a built-in guest or an ELF program, not both")
        if self.elf:
            return self.elf, self.elf
        name = self.guest or DEFAULT_GUEST
        return f"built-in guest '{name}'", str(builtin_path(name))


def build_machine(
    config: MachineConfig,
    serial_sink: Callable[[bytes], None],
    warn: Callable[[str], None] | None = None,
    kvm_path: str = "/dev/kvm",
) -> Machine:
    """Build a machine ready to start(). On failure everything opened so far is closed again."""
    if config.cpus < 1:
        raise ConfigError("a machine needs at least one vCPU")
    name, path = config.program()
    image = read_image(path, "guest program")  # before /dev/kvm: a typo should not need KVM
    memory_map = MemoryMap.for_memory(config.memory)

    install_kick_handler()
    kvm = Kvm.open(kvm_path)
    max_vcpus = kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS)
    if config.cpus > max_vcpus:
        kvm.close()
        raise ConfigError(f"this host's KVM supports at most {max_vcpus} vCPUs per VM")
    vm = kvm.create_vm()
    memory = GuestMemory(memory_map.backed_ranges())
    machine = Machine(kvm, vm, memory_map, memory, PioBus(), MmioBus(warn))
    try:
        _assemble(machine, config, name, image, serial_sink)
    except BaseException:
        machine.close()
        raise
    return machine


def _assemble(machine: Machine, config: MachineConfig, name: str, image: bytes, serial_sink: Callable[[bytes], None]) -> None:
    vm, memory = machine.vm, machine.memory
    memory.register(vm)
    vm.set_tss_addr(KVM_TSS_ADDR)
    vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
    vm.create_irqchip()  # PIC, IOAPIC and a LAPIC per vCPU, all in the kernel
    vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)

    _attach_devices(machine, serial_sink)

    layout = LongModeLayout()
    loaded = load_elf(memory, image, name, reserved=reserved_ranges(layout))
    entry = configure_program(memory, loaded.entry, config.args, config.cpus, layout)

    supported = machine.kvm.get_supported_cpuid()
    for index in range(config.cpus):
        vcpu = vm.create_vcpu(index)
        vcpu.set_cpuid2(cpuid_for_vcpu(supported, index))
        set_lint(vcpu)
        if index == 0:
            # The bootstrap processor enters the program; the others wait for INIT/SIPI from it,
            # which the in-kernel LAPIC delivers (KVM starts them in the wait-for-SIPI state).
            sregs = vcpu.get_sregs()
            setup_long_mode(memory, sregs, layout)
            vcpu.set_sregs(sregs)
            vcpu.set_regs(entry.regs())
        machine.runners.append(
            VcpuRunner(vcpu, machine.pio, machine.mmio, machine.request_exit, _code_fetcher(machine, vcpu))
        )


def _attach_devices(machine: Machine, serial_sink: Callable[[bytes], None]) -> None:
    pio, mmio = machine.pio, machine.mmio

    serial = Serial(KvmIrqLine(machine.vm, COM1_IRQ), serial_sink)
    pio.register("serial0 (16550A)", COM1_BASE, REGISTER_COUNT, serial.read, serial.write)

    i8042 = I8042(on_reset=machine.guest_reset)
    pio.register("i8042 data", DATA_PORT, 1, lambda _o, size: i8042.read(0, size), lambda _o, size, v: i8042.write(0, size, v))
    pio.register(
        "i8042 command", COMMAND_PORT, 1,
        lambda _o, size: i8042.read(COMMAND_PORT - DATA_PORT, size),
        lambda _o, size, v: i8042.write(COMMAND_PORT - DATA_PORT, size, v),
    )

    debug_exit = DebugExit(on_exit=machine.guest_exit)
    pio.register("debug-exit", DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, debug_exit.read, debug_exit.write)

    ucall = UcallPort(machine.memory, machine.handle_ucall)
    pio.register("ucall", UCALL_PORT, UCALL_PORT_SIZE, ucall.read, ucall.write)

    pio_sequence, mmio_sequence = SequenceRegister(), SequenceRegister()
    pio.register("testdev (port)", TESTDEV_PORT, TESTDEV_PORT_SIZE, pio_sequence.read, pio_sequence.write)
    mmio.register("testdev (MMIO)", TESTDEV_MMIO, TESTDEV_MMIO_SIZE, mmio_sequence.read, mmio_sequence.write)

    machine.devices.update(
        serial=serial, i8042=i8042, debug_exit=debug_exit, ucall=ucall,
        testdev_pio=pio_sequence, testdev_mmio=mmio_sequence,
    )


def _code_fetcher(machine: Machine, vcpu: "Vcpu") -> Callable[[int], bytes]:  # type: ignore[name-defined]  # noqa: F821
    """Instruction bytes at a guest virtual address, for error reports (through KVM_TRANSLATE)."""

    def fetch(rip: int) -> bytes:
        translation = vcpu.translate(rip)
        if not translation.valid:
            raise WorldswitchError(f"rip {rip:#x} is not mapped")
        return machine.memory.read(translation.physical_address, 15)

    return fetch
