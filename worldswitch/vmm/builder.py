"""Assembling a Vmm from a MachineConfig: KVM objects, memory, the in-kernel irqchip and PIT,
devices wired in an explicit order, the guest loaded, every vCPU set up. Nothing registers
itself; reading this file tells you the whole machine."""

from __future__ import annotations

from typing import Callable

from ..boot import acpi
from ..boot.elf import load_elf, read_image
from ..boot.firmware import ROM_TOP, FirmwareKernel, firmware_kernel, low_copy, read_rom
from ..boot.linux import kernel_parameters, load_linux
from ..boot.longmode import LINUX_GDT, LongModeLayout
from ..boot.program import configure_program, reserved_ranges
from ..devices.acpi_pm import BLOCK_SIZE as PM_BLOCK_SIZE
from ..devices.acpi_pm import AcpiPm, AcpiPmState, ResetRegister
from ..devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from ..devices.i8042 import COMMAND_PORT, DATA_PORT, I8042, I8042State
from ..devices.pci import PciFunction
from ..devices.serial import COM1_BASE, COM1_IRQ, REGISTER_COUNT, Serial, SerialState
from ..devices.testdev import (TESTDEV_MMIO, TESTDEV_MMIO_SIZE, TESTDEV_PORT, TESTDEV_PORT_SIZE, SequenceRegister,
                               SequenceState)
from ..devices.ucall import UCALL_PORT, UCALL_PORT_SIZE, UcallPort
from ..devices.virtio.blk import VirtioBlock
from ..devices.virtio.console import VirtioConsole, open_backend
from ..devices.virtio.device import VirtioDevice, VirtioLink
from ..devices.virtio.net import TapBackend, VirtioNet, parse_mac
from ..devices.virtio.pci import VirtioPciState
from ..devices.virtio.rng import VirtioRng
from ..driver import structs as s
from ..driver.constants import KVM_PIT_SPEAKER_DUMMY, Cap
from ..driver.kvm import Kvm, Vcpu
from ..errors import ConfigError, WorldswitchError
from ..memory.guest import GuestMemory
from ..memory.layout import ECAM_BASE, PCI_MMIO_END, PCI_MMIO_START, MemoryMap
from ..memory.rom import Rom
from .config import DiskConfig, MachineConfig, NetConfig
from .host import detect_host_kind
from .kick import install_kick_handler
from .machine import Vmm
from .platform import pc
from .platform.bus import MmioBus, PioBus
from .platform.irq import KvmIrqLine
from .platform.pci_platform import PciPlatform
from .result import MachineResult, StopReason
from .runloop import VcpuRunner
from .x86.cpu import cpuid_for_vcpu, set_lint
from .x86.cpuid import filter_cpuid, forced_features, hidden_features
from .x86.emulate import TrapEmulator
from .x86.longmode import program_registers, setup_long_mode
from .x86.user_syscall import MSR_LSTAR, UserSyscall

# Addresses the VMX (Intel real-mode support) needs below 4 GiB, inside the PCI hole.
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000

ACPI_BASE = 0xE0000  # in the ROM area, where an OS scans for the RSDP (ACPI 6.4, 5.2.5.1)


def build_for_boot(config: MachineConfig, serial_sink: Callable[[bytes], None],
                   warn: Callable[[str], None] | None = None, kvm_path: str = "/dev/kvm") -> Vmm:
    """A machine ready to start() its program, kernel or firmware from the beginning. On failure
    everything it had opened is closed again."""
    name, path = check_config(config)
    # Read the user's files before touching /dev/kvm: a typo should not need KVM.
    if config.boots_firmware:
        rom, image = read_rom(path), (read_image(config.kernel, "kernel") if config.kernel else b"")
    else:
        rom, image = None, read_image(path, "kernel" if config.kernel else "guest program")
    initrd = read_image(config.initrd, "initrd") if config.initrd else None
    machine = _create_machine(config, warn, kvm_path)
    try:
        kernel = None
        if rom is not None and config.kernel:
            kernel = firmware_kernel(image, config.kernel, initrd, config.append, pc.ram_below_4g(machine.memory_map))
        tables = _assemble_platform(machine, serial_sink, rom, kernel)
        if rom is not None:
            address, low = low_copy(rom)
            machine.memory.write(address, low)  # the vCPUs stay at the reset vector, in the ROM
        else:
            _load_program(machine, name, image, initrd, tables)
    except BaseException:
        machine.close()
        raise
    return machine


def build_for_restore(config: MachineConfig, serial_sink: Callable[[bytes], None],
                      warn: Callable[[str], None] | None = None, kvm_path: str = "/dev/kvm") -> Vmm:
    """A machine of the same make as `config`, with nothing loaded: a snapshot gives it memory and
    CPU state (restore_machine)."""
    _name, path = check_config(config)
    rom = read_rom(path) if config.boots_firmware else None
    machine = _create_machine(config, warn, kvm_path)
    try:
        _assemble_platform(machine, serial_sink, rom)
    except BaseException:
        machine.close()
        raise
    return machine


def check_config(config: MachineConfig) -> tuple[str, str]:
    """What the machine boots, (display name, path), once the description holds together."""
    if config.cpus < 1:
        raise ConfigError("a machine needs at least one vCPU")
    if config.cpus > acpi.MAX_XAPIC_ID + 1:
        raise ConfigError(f"at most {acpi.MAX_XAPIC_ID + 1} vCPUs: the MADT gives each an 8-bit APIC ID")
    try:
        config.args.encode()
    except UnicodeEncodeError:
        raise ConfigError("--args must be UTF-8 text") from None
    return config.program()


def _create_machine(config: MachineConfig, warn: Callable[[str], None] | None, kvm_path: str) -> Vmm:
    """The VM and its guest memory, empty."""
    memory_map = MemoryMap.for_memory(config.memory_bytes)
    install_kick_handler()
    kvm = Kvm.open(kvm_path)
    max_vcpus = kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS)
    if config.cpus > max_vcpus:
        kvm.close()
        raise ConfigError(f"this host's KVM supports at most {max_vcpus} vCPUs per VM")
    vm = None
    try:
        vm = kvm.create_vm()
        memory = GuestMemory(memory_map.backed_ranges())
    except BaseException:  # the host refused (no memory to map, ...): nothing may stay open
        if vm is not None:
            vm.close()
        kvm.close()
        raise
    return Vmm(kvm, vm, memory_map, memory, PioBus(), MmioBus(warn), config.absolute(), detect_host_kind(),
               warn or (lambda text: None))


def _assemble_platform(machine: Vmm, serial_sink: Callable[[bytes], None], rom: bytes | None,
                       kernel: FirmwareKernel | None = None) -> acpi.AcpiTables:
    """Everything but the program: the in-kernel irqchip and PIT, the legacy devices, PCI and the
    virtio devices, the ACPI tables, the vCPUs and their runners. With a firmware `rom`, the PC
    parts a BIOS expects too (chipset, CMOS, fw_cfg), and the ROM at the top of 4 GiB."""
    vm, config = machine.vm, machine.config
    machine.memory.register(vm)
    vm.set_tss_addr(KVM_TSS_ADDR)
    vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
    vm.create_irqchip()  # PIC, IOAPIC and a LAPIC per vCPU, all in the kernel
    vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)
    _attach_devices(machine, serial_sink)
    pci_host = acpi.PciHost(ECAM_BASE, PCI_MMIO_START, PCI_MMIO_END)
    if rom is None:
        _attach_pci(machine, config, chipset=[])
        tables = acpi.build(ACPI_BASE, config.cpus, pci=pci_host)
        machine.memory.write(tables.base, tables.blob)
    else:
        _attach_pci(machine, config, pc.chipset(bool(config.cdrom)))
        tables = acpi.build(0, config.cpus, pci=pci_host, cmos_rtc=True)  # the firmware places them
        pc.attach_pc_devices(machine, tables, kernel)
        firmware = Rom(ROM_TOP - len(rom), rom)
        firmware.register(vm, slot=len(machine.memory.regions))
        machine.devices["rom"] = firmware
    _create_vcpus(machine)
    return tables


def _create_vcpus(machine: Vmm) -> None:
    vm, memory, host = machine.vm, machine.memory, machine.host
    hidden = hidden_features(host)
    supported = filter_cpuid(machine.kvm.get_supported_cpuid(), hidden)
    vcpus = []
    for index in range(machine.config.cpus):
        vcpu = vm.create_vcpu(index)
        vcpu.set_cpuid2(cpuid_for_vcpu(supported, index))
        set_lint(vcpu)
        vcpus.append(vcpu)
    # What the host put back into the CPUID despite us (see cpuid.py): a kernel must be told.
    machine.forced_cpuid = forced_features(vcpus[0].get_cpuid2(), hidden)

    # Where KVM leaves a guest's user-mode SYSCALL in ring 3 (PVM), the VMX completes it; it needs
    # the guest's WRMSR to LSTAR, which an MSR filter sends here.
    complete_syscalls = host.kernel_code_emulated and all(
        vm.check_extension(cap) for cap in (Cap.X86_USER_SPACE_MSR, Cap.X86_MSR_FILTER))
    for vcpu in vcpus:
        emulator = TrapEmulator(memory)
        machine.runners.append(VcpuRunner(vcpu, machine.pio, machine.mmio, machine.request_exit,
                                          _code_fetcher(machine, vcpu), emulator,
                                          UserSyscall(vcpu, emulator) if complete_syscalls else None))
    if complete_syscalls:
        vm.deny_msr_writes([MSR_LSTAR])


def _load_program(machine: Vmm, name: str, image: bytes, initrd: bytes | None, tables: acpi.AcpiTables) -> None:
    """The kernel or program in guest memory, and the boot vCPU at its entry in long mode."""
    config, memory, host = machine.config, machine.memory, machine.host
    if config.kernel:
        layout = LongModeLayout(selectors=LINUX_GDT)
        added = kernel_parameters(config.append, machine.forced_cpuid, host.kernel_code_emulated)
        cmdline = " ".join([config.append, *(parameter for parameter, _ in added)]).strip()
        boot = load_linux(memory, machine.memory_map, image, name, initrd, config.initrd or "", cmdline,
                          config.decompress, host.kernel_code_emulated, tables.rsdp_address)
        boot.notes.extend(f"added {parameter}: {why}" for parameter, why in added)
        machine.boot = boot
        # The 64-bit boot protocol: long mode, __BOOT_CS/__BOOT_DS, interrupts off, RSI = zero page.
        bsp_regs = s.kvm_regs(rip=boot.entry, rsi=boot.zero_page, rsp=layout.stack_top, rflags=0x2)
    else:
        layout = LongModeLayout()
        loaded = load_elf(memory, image, name, reserved=reserved_ranges(layout))
        bsp_regs = program_registers(configure_program(memory, loaded.entry, config.args, config.cpus, layout))

    # The bootstrap processor enters the program; the others wait for INIT/SIPI from it, which the
    # in-kernel LAPIC delivers (KVM starts them in the wait-for-SIPI state).
    bsp = machine.runners[0].vcpu
    sregs = bsp.get_sregs()
    setup_long_mode(memory, sregs, layout)
    bsp.set_sregs(sregs)
    bsp.set_regs(bsp_regs)


def _attach_devices(machine: Vmm, serial_sink: Callable[[bytes], None]) -> None:
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

    pm = AcpiPm(on_power_off=machine.guest_power_off)
    pio.register("ACPI PM1/timer", acpi.PM_BASE, PM_BLOCK_SIZE, pm.read, pm.write)
    reset = ResetRegister(on_reset=machine.guest_reset)  # a byte at 0xcf9: the PCI platform routes it

    ucall = UcallPort(machine.memory, machine.handle_ucall)
    pio.register("ucall", UCALL_PORT, UCALL_PORT_SIZE, ucall.read, ucall.write)

    pio_sequence, mmio_sequence = SequenceRegister(), SequenceRegister()
    pio.register("testdev (port)", TESTDEV_PORT, TESTDEV_PORT_SIZE, pio_sequence.read, pio_sequence.write)
    mmio.register("testdev (MMIO)", TESTDEV_MMIO, TESTDEV_MMIO_SIZE, mmio_sequence.read, mmio_sequence.write)

    machine.devices.update(
        serial=serial, i8042=i8042, debug_exit=debug_exit, acpi_pm=pm, reset=reset, ucall=ucall,
        testdev_pio=pio_sequence, testdev_mmio=mmio_sequence,
    )
    machine.register_state("serial", serial.state, serial.restore, SerialState)  # type: ignore[arg-type]
    machine.register_state("i8042", i8042.state, i8042.restore, I8042State)  # type: ignore[arg-type]
    machine.register_state("acpi_pm", pm.state, pm.restore, AcpiPmState)  # type: ignore[arg-type]
    for name, register in (("testdev_pio", pio_sequence), ("testdev_mmio", mmio_sequence)):
        machine.register_state(name, register.state, register.restore, SequenceState)  # type: ignore[arg-type]


def _attach_pci(machine: Vmm, config: MachineConfig, chipset: list[PciFunction]) -> None:
    """The PCI host bridge (and what goes with it) and the virtio devices the user asked for, in slot order."""
    reset = machine.devices["reset"]
    pci = PciPlatform(machine.vm, machine.pio, machine.mmio, (reset.read, reset.write),  # type: ignore[attr-defined]
                      lambda message: machine.request_exit(MachineResult.of(StopReason.VMX_ERROR, message)), machine.warn,
                      chipset)
    machine.pci = pci

    def add(name: str, make_device: Callable[[VirtioLink], VirtioDevice]) -> None:
        function = pci.add_virtio(make_device, packed=config.packed_queues)
        machine.devices[name] = function
        machine.register_state(name, function.state, function.restore, VirtioPciState)  # type: ignore[arg-type]

    memory, warn = machine.memory, machine.warn

    def block(disk: DiskConfig) -> Callable[[VirtioLink], VirtioDevice]:
        return lambda link: VirtioBlock(link, memory, disk.path, disk.read_only, disk.serial, warn, disk.shared,
                                         disk.format)

    def network(net: NetConfig) -> Callable[[VirtioLink], VirtioDevice]:
        mac = parse_mac(net.mac) if net.mac else None
        return lambda link: VirtioNet(link, memory, TapBackend(net.tap), mac)

    for index, disk in enumerate(config.disk):
        add(f"virtio-blk{index}", block(disk))
    for index, net in enumerate(config.net):
        add(f"virtio-net{index}", network(net))
    if config.rng:
        add("virtio-rng", lambda link: VirtioRng(link, memory))
    if config.vconsole:
        backend = open_backend(config.vconsole)
        add("virtio-console", lambda link: VirtioConsole(link, memory, backend))


def restore_machine(
    path: str,
    serial_sink: Callable[[bytes], None],
    warn: Callable[[str], None] | None = None,
    kvm_path: str = "/dev/kvm",
    progress: Callable[[str, int, int], None] | None = None,
) -> Vmm:
    """A machine rebuilt from a snapshot's description and put back into the snapshot's state,
    ready to start() where it stopped."""
    from . import snapshot

    saved = snapshot.open_snapshot(path)
    try:
        config = MachineConfig.from_dict(saved.config)
    except (TypeError, KeyError) as error:
        raise snapshot.SnapshotError(f"the snapshot's machine description is malformed: {error}") from None
    machine = build_for_restore(config, serial_sink, warn, kvm_path)
    try:
        snapshot.restore(machine, saved, progress)
        for runner in machine.runners:
            if runner.user_syscall is not None:
                runner.user_syscall.arm()  # a kernel that set LSTAR before the snapshot
    except BaseException:
        machine.close()
        raise
    return machine


def _code_fetcher(machine: Vmm, vcpu: Vcpu) -> Callable[[int], bytes]:
    """Instruction bytes at a guest virtual address, for error reports (through KVM_TRANSLATE)."""

    def fetch(rip: int) -> bytes:
        translation = vcpu.translate(rip)
        if not translation.valid:
            raise WorldswitchError(f"rip {rip:#x} is not mapped")
        return machine.memory.read(translation.physical_address, 15)

    return fetch
