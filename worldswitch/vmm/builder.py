"""Assembling a Vmm from a MachineConfig: KVM objects, memory, the in-kernel irqchip and PIT,
devices wired in an explicit order, the guest loaded, every vCPU set up. Nothing registers
itself; reading this file tells you the whole machine."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import TYPE_CHECKING, Callable

from ..boot import acpi
from ..boot.elf import load_elf, read_image
from ..boot.longmode import LongModeLayout
from ..boot.program import ap_entry, configure_program, reserved_ranges
from ..devices.acpi_pm import BLOCK_SIZE as PM_BLOCK_SIZE
from ..devices.acpi_pm import AcpiPm, AcpiPmState, ResetRegister
from ..devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from ..devices.i8042 import COMMAND_PORT, DATA_PORT, I8042, I8042State
from ..devices.serial import COM1_BASE, COM1_IRQ, RBR_THR_DLL, REGISTER_COUNT, Serial, SerialState
from ..devices.testdev import (TESTDEV_MMIO, TESTDEV_MMIO_SIZE, TESTDEV_PORT, TESTDEV_PORT_SIZE, SequenceRegister,
                               SequenceState)
from ..devices.ucall import UCALL_PORT, UCALL_PORT_SIZE, UcallPort
from ..driver import structs as s
from ..driver.constants import KVM_PIT_SPEAKER_DUMMY, Cap
from ..driver.kvm import CoalescedRing, Kvm, Vcpu, Vm
from ..errors import ConfigError, GuestImageError, WorldswitchError
from ..guests import MONITOR_IMAGE
from ..memory.guest import GuestMemory
from ..memory.layout import ECAM_BASE, PCI_MMIO_END, PCI_MMIO_START, MemoryMap
from ..record import record
from .config import MachineConfig
from .host import HostKind, detect_host_kind
from .kick import install_kick_handler
from .machine import Parts, Platform, StateBinding, Vmm
from .outcome import Outcome
from .platform.bus import MmioBus, PioBus
from .platform.coalesced import CoalescedDrain, ThrCoalescing
from .platform.irq import KvmIrqLine
from .platform.pci_platform import PciPlatform
from .result import MachineResult, StopReason
from .runloop import VcpuRunner
from .x86.cpu import cpuid_for_vcpu, set_lint
from .x86.cpuid import HiddenFeature, features_to_refuse, filter_cpuid, hidden_features, with_tsc_deadline
from .x86.emulate import TrapEmulator
from .x86.longmode import program_registers, setup_long_mode
from .x86.user_syscall import MSR_LSTAR, UserSyscall

# What only some machines have (virtio devices, firmware and the PC parts it needs, a Linux kernel,
# the monitor, a trace) is imported by the step that adds it, on this (the main) thread: a machine
# pays at start-up only for what it has. Names here are for the types alone.
if TYPE_CHECKING:
    from ..boot.firmware import FirmwareKernel
    from ..boot.linux import LinuxBoot
    from ..boot.monitor import MonitorPlacement
    from ..devices.virtio.device import VirtioDevice, VirtioLink
    from .config import DiskConfig, NetConfig
    from .trace import TraceRequest, TraceWriter

# Addresses the VMX (Intel real-mode support) needs below 4 GiB, inside the PCI hole.
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000

ACPI_BASE = 0xE0000  # in the ROM area, where an OS scans for the RSDP (ACPI 6.4, 5.2.5.1)


class _Meanwhile:
    """A blocking KVM call on a thread of its own while the build goes on (ctypes lets go of the GIL
    during the ioctl); `wait` gives back its error, if it had one."""

    def __init__(self, name: str, call: Callable[[], None], undo: contextlib.ExitStack) -> None:
        self._call = call
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        undo.callback(self._thread.join)  # on failure, before the VM's fd closes: the call uses it

    def _run(self) -> None:
        try:
            self._call()
        except BaseException as error:  # noqa: BLE001 - handed to the builder's thread by wait()
            self._error = error

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


@record(frozen=True)
class _Core:
    """The VM, its guest memory (registered with KVM), what the host is, and whether the VMX completes
    a guest's user-mode SYSCALL (then the LSTAR write filter is being installed meanwhile)."""
    kvm: Kvm
    vm: Vm
    memory_map: MemoryMap
    memory: GuestMemory
    host: HostKind
    msr_filter: _Meanwhile | None
    monitor: MonitorPlacement | None  # where the in-guest monitor's pages are, if the machine runs under it


def build_for_boot(config: MachineConfig, serial_sink: Callable[[bytes], None],
                   warn: Callable[[str], None] | None = None, kvm_path: str = "/dev/kvm",
                   trace: TraceRequest | None = None) -> Vmm:
    """A machine ready to start() its program, kernel or firmware from the beginning. On failure
    everything it had opened is closed again."""
    name, path = check_config(config)
    # Read the user's files before touching /dev/kvm: a typo should not need KVM.
    if config.boots_firmware:
        from ..boot.firmware import read_rom

        rom, image = read_rom(path), (read_image(config.kernel, "kernel") if config.kernel else b"")
    else:
        rom, image = None, read_image(path, "kernel" if config.kernel else "guest program")
    initrd = read_image(config.initrd, "initrd") if config.initrd else None
    # a firmware boot's monitor is read by its handoff (_create_vcpus), which a restore makes too
    monitor_image = read_image(MONITOR_IMAGE, "the monitor") if config.monitor and rom is None else None
    kernel = _firmware_kernel(config, image, initrd) if rom is not None and config.kernel else None

    def load(core: _Core, tables: acpi.AcpiTables, bsp: Vcpu, refused_cpuid: list[HiddenFeature]) -> LinuxBoot | None:
        if rom is None:
            loaded_monitor = (core.monitor, monitor_image) if core.monitor is not None and monitor_image is not None else None
            return _load_program(core, config, name, image, initrd, tables, bsp, refused_cpuid, loaded_monitor)
        from ..boot.firmware import low_copy

        address, low = low_copy(rom)
        core.memory.write(address, low)  # the vCPUs stay at the reset vector, in the ROM
        return None

    return _build(config, serial_sink, warn, kvm_path, trace, rom, kernel, load)


def build_for_restore(config: MachineConfig, serial_sink: Callable[[bytes], None],
                      warn: Callable[[str], None] | None = None, kvm_path: str = "/dev/kvm",
                      trace: TraceRequest | None = None) -> Vmm:
    """A machine of the same make as `config`, with nothing loaded: a snapshot gives it memory and
    CPU state (restore_machine)."""
    _name, path = check_config(config)
    rom = kernel = None
    if config.boots_firmware:
        from ..boot.firmware import read_rom

        rom = read_rom(path)
        if config.kernel:  # fw_cfg offers it again: the firmware may not have loaded it yet
            initrd = read_image(config.initrd, "initrd") if config.initrd else None
            kernel = _firmware_kernel(config, read_image(config.kernel, "kernel"), initrd)
    return _build(config, serial_sink, warn, kvm_path, trace, rom, kernel, None)


def _firmware_kernel(config: MachineConfig, image: bytes, initrd: bytes | None) -> FirmwareKernel:
    """The kernel, initrd and command line as the firmware's Linux loader reads them from fw_cfg."""
    from ..boot.firmware import firmware_kernel
    from .platform import pc

    memory_map, _ = _place_monitor(config, MemoryMap.for_memory(config.memory_bytes))  # the initrd goes below it
    return firmware_kernel(image, config.kernel or "", initrd, config.append, pc.ram_below_4g(memory_map))


if TYPE_CHECKING:
    _Load = Callable[[_Core, acpi.AcpiTables, Vcpu, list[HiddenFeature]], LinuxBoot | None]


def _build(config: MachineConfig, serial_sink: Callable[[bytes], None], warn: Callable[[str], None] | None,
           kvm_path: str, trace: TraceRequest | None, rom: bytes | None, kernel: FirmwareKernel | None,
           load: _Load | None) -> Vmm:
    """The recipe both builders share; `load` puts what the machine boots into it (none to restore)."""
    warn = warn or _quiet
    with contextlib.ExitStack() as undo:
        core = _open_vm(config, kvm_path, undo)
        outcome = Outcome()
        platform, tables = _assemble_platform(core, config, outcome, serial_sink, warn, rom, kernel, undo)
        writer = _open_trace(trace, config, warn, undo)
        runners, refused_cpuid, coalesced = _create_vcpus(core, config, platform, outcome, writer, rom, undo)
        boot = load(core, tables, runners[0].vcpu, refused_cpuid) if load is not None else None
        if load is not None and runners[0].handoff is not None:
            runners[0].handoff.arm()  # a restored machine's is armed once its vCPU state is back
        for runner in runners[1:] if load is not None else []:
            if runner.ap_start is not None:
                runner.ap_start.arm()  # where the boot vCPU's copy of the monitor says (load_monitor)
        if core.msr_filter is not None:
            core.msr_filter.wait()
        machine = Vmm(core.kvm, core.vm, platform, runners, outcome, boot, core.monitor, writer,
                      config.absolute(), core.host, warn, coalesced)
        undo.pop_all()  # the machine owns it all now
    return machine


def _quiet(_text: str) -> None:
    pass


def _place_monitor(config: MachineConfig, memory_map: MemoryMap) -> tuple[MemoryMap, MonitorPlacement | None]:
    """Where the in-guest monitor's pages go, if the machine runs under it, and the memory map with
    them reserved (the guest's e820 leaves them alone; they stay backed)."""
    if not config.monitor:
        return memory_map, None
    from ..boot.monitor import MonitorPlacement

    top = memory_map.top_of_low_ram
    placement = MonitorPlacement.for_map(memory_map, config.cpus)
    # from the monitor's pages to the top: RAM above them (less than a 2 MiB page) would be out of its reach
    return memory_map.reserving(placement.physical_base, top - placement.physical_base, "the in-guest monitor"), placement


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


def _open_vm(config: MachineConfig, kvm_path: str, undo: contextlib.ExitStack) -> _Core:
    """The VM and its guest memory, empty."""
    memory_map, monitor = _place_monitor(config, MemoryMap.for_memory(config.memory_bytes))
    install_kick_handler()
    kvm = Kvm.open(kvm_path)
    undo.callback(kvm.close)
    max_vcpus = kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS)
    if config.cpus > max_vcpus:
        raise ConfigError(f"this host's KVM supports at most {max_vcpus} vCPUs per VM")
    vm = kvm.create_vm()
    undo.callback(vm.close)
    memory = GuestMemory(memory_map.backed_ranges())  # the host may refuse (no memory to map)
    undo.callback(memory.close)
    memory.register(vm)
    host = detect_host_kind()
    if monitor is not None and not host.kernel_code_emulated:
        raise ConfigError("--monitor is for hosts that emulate guest kernel code (PVM); this host runs it "
                          "natively with VT-x/AMD-V, which does the monitor's job")
    # Where KVM leaves a guest's user-mode SYSCALL in ring 3 (PVM), the VMX completes it (under the
    # monitor, the monitor does); it needs the guest's WRMSR to LSTAR, which an MSR filter sends
    # here. Installing one waits for an SRCU grace period in the kernel (about 10 ms on a PVM host),
    # which the rest of the build overlaps.
    msr_filter = None
    if host.kernel_code_emulated and not config.monitor and all(vm.check_extension(cap) for cap in (Cap.X86_USER_SPACE_MSR, Cap.X86_MSR_FILTER)):
        msr_filter = _Meanwhile("msr-filter", lambda: vm.deny_msr_writes([MSR_LSTAR]), undo)
    return _Core(kvm, vm, memory_map, memory, host, msr_filter, monitor)


def _assemble_platform(core: _Core, config: MachineConfig, outcome: Outcome, serial_sink: Callable[[bytes], None],
                       warn: Callable[[str], None], rom: bytes | None, kernel: FirmwareKernel | None,
                       undo: contextlib.ExitStack) -> tuple[Platform, acpi.AcpiTables]:
    """Everything but the vCPUs and the program: the in-kernel irqchip and PIT, the legacy devices,
    PCI and the virtio devices, the ACPI tables. With a firmware `rom`, the PC parts a BIOS expects
    too (chipset, CMOS, fw_cfg), and the ROM at the top of 4 GiB."""
    vm, memory = core.vm, core.memory
    vm.set_tss_addr(KVM_TSS_ADDR)
    vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
    vm.create_irqchip()  # PIC, IOAPIC and a LAPIC per vCPU, all in the kernel
    vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)
    pio, mmio = PioBus(), MmioBus(warn)
    legacy, serial, coalescing, reset = _legacy_devices(core, pio, mmio, outcome, serial_sink)
    pci_host = acpi.PciHost(ECAM_BASE, PCI_MMIO_START, PCI_MMIO_END)
    if rom is not None:
        from .platform import pc

        chipset = pc.chipset(bool(config.cdrom))
    else:
        chipset = []
    pci = PciPlatform(vm, pio, mmio, (reset.read, reset.write),
                      lambda message: outcome.request(MachineResult.of(StopReason.VMX_ERROR, message)), warn, chipset)
    undo.callback(pci.close)
    parts = legacy + _virtio_devices(pci, memory, config, warn)
    if rom is None:
        tables = acpi.build(ACPI_BASE, config.cpus, pci=pci_host)
        memory.write(tables.base, tables.blob)
    else:
        from ..boot.firmware import ROM_TOP
        from ..memory.rom import Rom

        tables = acpi.build(0, config.cpus, pci=pci_host, cmos_rtc=True)  # the firmware places them
        pc_parts = pc.pc_parts(vm, memory, core.memory_map, pio, config, outcome, tables, kernel)
        undo.callback(pc_parts.close)
        firmware = Rom(ROM_TOP - len(rom), rom)
        firmware.register(vm, slot=len(memory.regions))
        parts = parts + pc_parts + Parts({"rom": firmware})
    return Platform(core.memory_map, memory, pio, mmio, pci, parts, serial, coalescing), tables


def _open_trace(trace: TraceRequest | None, config: MachineConfig, warn: Callable[[str], None],
                undo: contextlib.ExitStack) -> TraceWriter | None:
    if trace is None:
        return None
    from .trace import TraceWriter

    writer = TraceWriter(trace.path, config.cpus, trace.limit, warn)
    undo.callback(writer.close, {"result": None, "error": "the machine could not be built"})
    return writer


def _create_vcpus(core: _Core, config: MachineConfig, platform: Platform, outcome: Outcome,
                  trace: TraceWriter | None, rom: bytes | None, undo: contextlib.ExitStack
                  ) -> tuple[list[VcpuRunner], list[HiddenFeature], CoalescedDrain | None]:
    """A runner per vCPU, the CPU features a kernel must be told not to use (what the host put
    back into the CPUID despite us, or under the monitor all it cannot run: see cpuid.py), and the
    drain of the port writes KVM queues, which every runner applies before its exits. Under the
    monitor, a machine that boots through firmware watches on its boot vCPU for the kernel its boot
    loader starts (x86/handoff.py)."""
    vm, memory, host = core.vm, core.memory, core.host
    hidden = hidden_features(host, config.monitor)
    supported = filter_cpuid(core.kvm.get_supported_cpuid(), hidden)
    if vm.check_extension(Cap.TSC_DEADLINE_TIMER):
        supported = with_tsc_deadline(supported)
    vcpus = []
    for index in range(config.cpus):
        vcpu = vm.create_vcpu(index)
        undo.callback(vcpu.close)
        vcpu.set_cpuid2(cpuid_for_vcpu(supported, index))
        set_lint(vcpu)
        vcpus.append(vcpu)
    refused = features_to_refuse(vcpus[0].get_cpuid2(), hidden, core.monitor is not None)
    complete_syscalls = core.msr_filter is not None
    # what the vCPUs load when they are taken over: the boot vCPU where its firmware enters Linux, the others
    # where Linux enters them
    taken_over = core.monitor is not None and (rom is not None or config.cpus > 1)
    monitor_image = read_image(MONITOR_IMAGE, "the monitor") if taken_over else b""
    handoff = None
    if core.monitor is not None and rom is not None:
        from ..boot.firmware import low_copy
        from .x86.copyloop import find_in_image
        from .x86.handoff import FirmwareHandoff

        handoff = FirmwareHandoff(vcpus[0], vm, memory, core.memory_map, core.monitor, monitor_image, refused,
                                  boot_loader=not config.kernel, firmware_loops=find_in_image(*low_copy(rom)))
    coalesced = None
    if platform.coalescing is not None:
        ring = CoalescedRing(vcpus[0])  # one per VM: any vCPU's mapping shows it
        undo.callback(ring.release)
        coalesced = CoalescedDrain(ring, platform.pio, platform.mmio, platform.coalescing,
                                   lambda message: outcome.request(MachineResult.of(StopReason.VMX_ERROR, message)))
    runners = []
    for vcpu in vcpus:
        ap_start = None
        if core.monitor is not None and vcpu is not vcpus[0]:
            from .x86.ap_start import ApStart

            ap_start = ApStart(vcpu, memory, core.monitor, monitor_image)
        emulator = TrapEmulator(memory)
        runner = VcpuRunner(vcpu, platform.pio, platform.mmio, outcome.request, _code_fetcher(memory, vcpu), emulator,
                            UserSyscall(vcpu, emulator) if complete_syscalls else None,
                            trace.buffer_for(vcpu.id) if trace is not None else None,
                            handoff if vcpu is vcpus[0] else None,
                            functools.partial(core.monitor.failed_event, memory) if core.monitor is not None else None,
                            coalesced, ap_start)
        undo.callback(runner.release)
        runners.append(runner)
    aps = [(runner.ap_start, runner) for runner in runners if runner.ap_start is not None]
    if aps:
        from .x86.ap_start import AP_INIT_PORT, ApInits

        inits = ApInits(aps, lambda message: outcome.request(MachineResult.of(StopReason.VMX_ERROR, message)))
        platform.pio.register("the monitor's INIT notices", AP_INIT_PORT, 4, inits.read, inits.write)
    return runners, refused, coalesced


def _load_program(core: _Core, config: MachineConfig, name: str, image: bytes, initrd: bytes | None,
                  tables: acpi.AcpiTables, bsp: Vcpu, refused_cpuid: list[HiddenFeature],
                  monitor: tuple[MonitorPlacement, bytes] | None) -> LinuxBoot | None:
    """The kernel or program in guest memory, and the boot vCPU at its entry in long mode (or at the
    monitor's, which enters the program in turn); what was done to boot Linux, if it is Linux."""
    memory, host = core.memory, core.host
    boot = None
    if config.kernel:
        from ..boot.linux import kernel_parameters, load_linux
        from ..boot.longmode import LINUX_GDT

        layout = LongModeLayout(selectors=LINUX_GDT)
        added = kernel_parameters(config.append, refused_cpuid, host.kernel_code_emulated, monitor is not None,
                                  config.cpus)
        cmdline = " ".join([config.append, *(parameter for parameter, _ in added)]).strip()
        pv_ops = None
        if monitor is not None:
            from ..boot.monitor import pv_functions

            pv_ops = pv_functions()
        boot = load_linux(memory, core.memory_map, image, name, initrd, config.initrd or "", cmdline,
                          config.decompress, host.kernel_code_emulated, tables.rsdp_address, pv_ops)
        boot.notes.extend(f"added {parameter}: {why}" for parameter, why in added)
        # The 64-bit boot protocol: long mode, __BOOT_CS/__BOOT_DS, interrupts off, RSI = zero page.
        bsp_regs = s.kvm_regs(rip=boot.entry, rsi=boot.zero_page, rsp=layout.stack_top, rflags=0x2)
    else:
        layout = LongModeLayout()
        reserved = reserved_ranges(layout)
        if monitor is not None:
            reserved.append((monitor[0].physical_base, monitor[0].end))
        loaded = load_elf(memory, image, name, reserved=reserved)
        entry = configure_program(memory, loaded.entry, config.args, config.cpus, layout)
        bsp_regs = program_registers(entry)

    # The bootstrap processor enters the program; the others wait for INIT/SIPI from it, which the
    # in-kernel LAPIC delivers (KVM starts them in the wait-for-SIPI state).
    sregs = bsp.get_sregs()
    setup_long_mode(memory, sregs, layout)
    if monitor is not None:
        from ..boot.monitor import GuestEntry, load_monitor

        placement, monitor_image = monitor
        if boot is not None:  # Linux's 64-bit boot protocol: RSI = the zero page
            guest = GuestEntry(boot.entry, layout.stack_top, 0, boot.zero_page, 0, boot.iret_site, boot.sysret_site,
                               boot.flag_traps, boot.code_cache)
            aps_enter = boot.ap_entry
            if config.cpus > 1 and not aps_enter:
                raise GuestImageError("--monitor --cpus above 1: the kernel's symbols have no secondary_startup_64, "
                                      "where the monitor takes over its other CPUs")
        else:  # a program's entry, with its RAM ending where the monitor's pages begin
            guest = GuestEntry(entry.rip, entry.rsp, entry.args_addr, placement.physical_base, entry.vcpus)
            aps_enter = ap_entry(image) if config.cpus > 1 else 0
        start = load_monitor(memory, monitor_image, placement, layout, guest, aps_enter)
        bsp_regs = s.kvm_regs(rip=start.rip, rflags=0x2)
        sregs.cr3 = start.cr3
    bsp.set_sregs(sregs)
    bsp.set_regs(bsp_regs)
    return boot


def _legacy_devices(core: _Core, pio: PioBus, mmio: MmioBus, outcome: Outcome,
                    serial_sink: Callable[[bytes], None]) -> tuple[Parts, Serial, ThrCoalescing | None, ResetRegister]:
    """The devices every machine has on its ports, its serial console again with its THR's
    coalescing (where KVM can queue port writes), and the reset register the PCI platform routes (a
    byte at 0xcf9, inside the host bridge's dword)."""
    coalescing = None
    if core.vm.check_extension(Cap.COALESCED_PIO) and core.vm.check_extension(Cap.COALESCED_MMIO):
        coalescing = ThrCoalescing(core.vm, COM1_BASE + RBR_THR_DLL)
    serial = Serial(KvmIrqLine(core.vm, COM1_IRQ), serial_sink,
                    coalescing.thr_may_interrupt if coalescing is not None else None)
    pio.register("serial0 (16550A)", COM1_BASE, REGISTER_COUNT, serial.read, serial.write)

    i8042 = I8042(on_reset=outcome.guest_reset)
    pio.register("i8042 data", DATA_PORT, 1, lambda _o, size: i8042.read(0, size), lambda _o, size, v: i8042.write(0, size, v))
    pio.register(
        "i8042 command", COMMAND_PORT, 1,
        lambda _o, size: i8042.read(COMMAND_PORT - DATA_PORT, size),
        lambda _o, size, v: i8042.write(COMMAND_PORT - DATA_PORT, size, v),
    )

    debug_exit = DebugExit(on_exit=outcome.guest_exit)
    pio.register("debug-exit", DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, debug_exit.read, debug_exit.write)

    pm = AcpiPm(on_power_off=outcome.guest_power_off)
    pio.register("ACPI PM1/timer", acpi.PM_BASE, PM_BLOCK_SIZE, pm.read, pm.write)
    reset = ResetRegister(on_reset=outcome.guest_reset)

    ucall = UcallPort(core.memory, outcome.ucall)
    pio.register("ucall", UCALL_PORT, UCALL_PORT_SIZE, ucall.read, ucall.write)

    pio_sequence, mmio_sequence = SequenceRegister(), SequenceRegister()
    pio.register("testdev (port)", TESTDEV_PORT, TESTDEV_PORT_SIZE, pio_sequence.read, pio_sequence.write)
    mmio.register("testdev (MMIO)", TESTDEV_MMIO, TESTDEV_MMIO_SIZE, mmio_sequence.read, mmio_sequence.write)

    devices: dict[str, object] = dict(serial=serial, i8042=i8042, debug_exit=debug_exit, acpi_pm=pm, reset=reset,
                                      ucall=ucall, testdev_pio=pio_sequence, testdev_mmio=mmio_sequence)
    states = {
        "serial": StateBinding(serial.state, serial.restore, SerialState),
        "i8042": StateBinding(i8042.state, i8042.restore, I8042State),
        "acpi_pm": StateBinding(pm.state, pm.restore, AcpiPmState),
        "testdev_pio": StateBinding(pio_sequence.state, pio_sequence.restore, SequenceState),
        "testdev_mmio": StateBinding(mmio_sequence.state, mmio_sequence.restore, SequenceState),
    }
    return Parts(devices, states), serial, coalescing, reset


def _virtio_devices(pci: PciPlatform, memory: GuestMemory, config: MachineConfig, warn: Callable[[str], None]) -> Parts:
    """The virtio devices the user asked for, on the PCI platform in slot order (each kind's module
    imported only for a machine that has one)."""
    devices: dict[str, object] = {}
    states: dict[str, StateBinding] = {}

    def add(name: str, make_device: Callable[[VirtioLink], VirtioDevice]) -> None:
        from ..devices.virtio.pci import VirtioPciState

        function = pci.add_virtio(make_device, packed=config.packed_queues)
        devices[name] = function
        states[name] = StateBinding(function.state, function.restore, VirtioPciState)

    def block(disk: DiskConfig) -> Callable[[VirtioLink], VirtioDevice]:
        from ..devices.virtio.blk import VirtioBlock

        return lambda link: VirtioBlock(link, memory, disk.path, disk.read_only, disk.serial, warn, disk.shared,
                                         disk.format)

    def network(net: NetConfig) -> Callable[[VirtioLink], VirtioDevice]:
        from ..devices.virtio.net import TapBackend, VirtioNet, parse_mac

        mac = parse_mac(net.mac) if net.mac else None
        return lambda link: VirtioNet(link, memory, TapBackend(net.tap), mac, offloads=net.offloads)

    for index, disk in enumerate(config.disk):
        add(f"virtio-blk{index}", block(disk))
    for index, net in enumerate(config.net):
        add(f"virtio-net{index}", network(net))
    if config.rng:
        from ..devices.virtio.rng import VirtioRng

        add("virtio-rng", lambda link: VirtioRng(link, memory))
    if config.vconsole:
        from ..devices.virtio.console import VirtioConsole, open_backend

        backend = open_backend(config.vconsole)
        add("virtio-console", lambda link: VirtioConsole(link, memory, backend))
    return Parts(devices, states)


def restore_machine(
    path: str,
    serial_sink: Callable[[bytes], None],
    warn: Callable[[str], None] | None = None,
    kvm_path: str = "/dev/kvm",
    progress: Callable[[str, int, int], None] | None = None,
    trace: TraceRequest | None = None,
) -> Vmm:
    """A machine rebuilt from a snapshot's description and put back into the snapshot's state,
    ready to start() where it stopped."""
    from . import snapshot

    saved = snapshot.open_snapshot(path)
    try:
        config = MachineConfig.from_dict(saved.config)
    except (TypeError, KeyError) as error:
        raise snapshot.SnapshotError(f"the snapshot's machine description is malformed: {error}") from None
    machine = build_for_restore(config, serial_sink, warn, kvm_path, trace)
    try:
        snapshot.restore(machine, saved, progress)
        for runner in machine.runners:
            if runner.user_syscall is not None:
                runner.user_syscall.arm()  # a kernel that set LSTAR before the snapshot
            if runner.handoff is not None:
                runner.handoff.resume()  # firmware that had not started its kernel yet
            if runner.ap_start is not None:
                runner.ap_start.arm()  # an AP its Linux had not started yet
    except BaseException:
        machine.close()
        raise
    return machine


def _code_fetcher(memory: GuestMemory, vcpu: Vcpu) -> Callable[[int], bytes]:
    """Instruction bytes at a guest virtual address, for error reports (through KVM_TRANSLATE)."""

    def fetch(rip: int) -> bytes:
        translation = vcpu.translate(rip)
        if not translation.valid:
            raise WorldswitchError(f"rip {rip:#x} is not mapped")
        return memory.read(translation.physical_address, 15)

    return fetch
