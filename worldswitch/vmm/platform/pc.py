"""The PC platform a BIOS expects, beside what every worldswitch machine has: the i440FX/PIIX3
chipset functions, the CMOS clock, ports 0x92 and 0x80, fw_cfg with the machine's description (and,
with a kernel, what the firmware's Linux loader reads), and the IDE CD-ROM for --cdrom."""

from __future__ import annotations

import struct

from ...boot.acpi import AcpiTables
from ...boot.firmware import LINUXBOOT_FILE, FirmwareKernel, acpi_files, e820_file, linuxboot_rom
from ...devices.chipset import A20_PORT, POST_PORT, I440fxHostBridge, Piix3IsaBridge, PostCodes, SystemControlPort
from ...devices.cmos import INDEX_PORT as CMOS_PORT
from ...devices.cmos import PORT_SPAN as CMOS_PORT_SPAN
from ...devices.cmos import RTC_IRQ, Cmos, CmosState
from ...devices.cmos import memory_bytes as cmos_memory_bytes
from ...devices.disk.opener import open_disk
from ...devices.fw_cfg import MAX_CPUS, NB_CPUS
from ...devices.fw_cfg import PORT_SPAN as FW_CFG_SPAN
from ...devices.fw_cfg import RAM_SIZE
from ...devices.fw_cfg import SELECTOR_PORT as FW_CFG_PORT
from ...devices.fw_cfg import FwCfg, FwCfgFile
from ...devices.ide import COMMAND_BASE as IDE_COMMAND_BASE
from ...devices.ide import CONTROL_PORT as IDE_CONTROL_PORT
from ...devices.ide import IRQ as IDE_IRQ
from ...devices.ide import AtapiCdrom, IdeChannel, IdeState, Piix3Ide
from ...devices.pci import PciFunction
from ...devices.serial import COM1_BASE
from ...driver.kvm import Vm
from ...memory.guest import GuestMemory
from ...memory.layout import MemoryMap, RegionKind
from ..config import MachineConfig
from ..machine import Parts, StateBinding
from ..outcome import Outcome
from .bus import PioBus
from .irq import KvmIrqLine

CDROM_SLOT = 2  # the IDE function's slot: after the host bridge and the ISA bridge


def chipset(cdrom: bool) -> list[PciFunction]:
    """The PCI functions of slots 0 on: host bridge, ISA bridge and, for a CD, the IDE controller."""
    functions: list[PciFunction] = [I440fxHostBridge(), Piix3IsaBridge()]
    if cdrom:
        functions.append(Piix3Ide())
    return functions


def ram_below_4g(memory_map: MemoryMap) -> int:
    return max((r.end for r in memory_map.regions if r.kind is RegionKind.RAM and r.end <= 1 << 32), default=0)


def pc_parts(vm: Vm, memory: GuestMemory, memory_map: MemoryMap, pio: PioBus, config: MachineConfig,
             outcome: Outcome, tables: AcpiTables, kernel: FirmwareKernel | None) -> Parts:
    """What a BIOS reads the machine's description from (fw_cfg, CMOS) and the ports it pokes;
    with `kernel`, what its Linux loader reads too; with a CD, the IDE channel it is on."""
    below_4g = ram_below_4g(memory_map)
    above_4g = sum(r.size for r in memory_map.regions if r.kind is RegionKind.RAM and r.start >= 1 << 32)
    cmos = Cmos(KvmIrqLine(vm, RTC_IRQ), cmos_memory_bytes(below_4g, above_4g, config.cpus))
    pio.register("CMOS/RTC", CMOS_PORT, CMOS_PORT_SPAN, cmos.read, cmos.write)
    control = SystemControlPort(on_reset=outcome.guest_reset)
    pio.register("system control port A (A20, reset)", A20_PORT, 1, control.read, control.write)
    post = PostCodes()
    pio.register("POST codes", POST_PORT, 1, post.read, post.write)
    files = [FwCfgFile(name, data) for name, data in acpi_files(tables).items()]
    files += [FwCfgFile("etc/e820", e820_file(memory_map)), FwCfgFile("etc/sercon-port", struct.pack("<H", COM1_BASE))]
    boot_first: list[str] = []
    if kernel is not None:
        files.append(FwCfgFile(LINUXBOOT_FILE, linuxboot_rom()))
        boot_first.append(f"/rom@{LINUXBOOT_FILE}")
    cdrom = Parts()
    if config.cdrom:
        image = open_disk(config.cdrom, read_only=True, shared=True, format="raw")
        channel = IdeChannel(KvmIrqLine(vm, IDE_IRQ), AtapiCdrom(image))
        pio.register("IDE secondary (ATAPI CD-ROM)", IDE_COMMAND_BASE, 8, channel.read, channel.write)
        pio.register("IDE secondary control", IDE_CONTROL_PORT, 1, channel.read_control, channel.write_control)
        cdrom = Parts({"cdrom": channel}, {"cdrom": StateBinding(channel.state, channel.restore, IdeState)},
                      owned=(image,))
        boot_first.append(f"/pci@i0cf8/*@{CDROM_SLOT}/drive@1/disk@0")  # the CD, as an installer wants it
    if boot_first:  # then SeaBIOS goes on with the disks, in slot order
        files.append(FwCfgFile("bootorder", "".join(f"{entry}\n" for entry in boot_first).encode()))
    items = {RAM_SIZE: struct.pack("<Q", memory.size), NB_CPUS: struct.pack("<H", config.cpus),
             MAX_CPUS: struct.pack("<H", config.cpus), **(kernel.items if kernel is not None else {})}
    fw_cfg = FwCfg(memory, items, files)
    pio.register("fw_cfg", FW_CFG_PORT, FW_CFG_SPAN, fw_cfg.read, fw_cfg.write)
    return cdrom + Parts({"cmos": cmos, "system_control": control, "post": post, "fw_cfg": fw_cfg},
                         {"cmos": StateBinding(cmos.state, cmos.restore, CmosState)}, services=(cmos,))
