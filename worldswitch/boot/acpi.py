"""ACPI tables for a worldswitch machine (ACPI 6.4 specification, chapter 5): RSDP, RSDT, XSDT, FADT,
DSDT and MADT (MCFG joins them when the machine has PCIe ECAM).

They tell the guest what it cannot probe: every vCPU's local APIC and the IOAPIC (MADT), and how to
power off and reset (FADT: the PM1 control block and reset register of devices/acpi_pm.py, plus
the \\_S5 sleep type in the DSDT). They live in the ROM area below 1 MiB, where an OS scans for the
RSDP; Linux is also told the RSDP's address in boot_params.acpi_rsdp_addr.
"""

from __future__ import annotations

import struct
from typing import Sequence

from ..devices.acpi_pm import RESET_VALUE, S5_SLEEP_TYPE  # the tables describe the device
from ..record import record
from . import aml

OEM_ID = b"WSWTCH"
OEM_TABLE_ID = b"WORLDSWT"
CREATOR_ID = b"WSPY"
HEADER = struct.Struct("<4sIBB6s8sI4sI")  # the System Description Table header, 36 bytes
GAS = struct.Struct("<BBBBQ")  # Generic Address Structure, 12 bytes
RSDP = struct.Struct("<8sB6sBIIQB3x")  # 36 bytes

LOCAL_APIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
IOAPIC_ID = 0  # KVM's in-kernel IOAPIC reports ID 0 (kvm_ioapic_state.id)

# The power-management block (devices/acpi_pm.py), at the I/O ports QEMU's PIIX4 uses.
PM_BASE = 0x600
PM1_EVT_BLK = PM_BASE
PM1_EVT_LEN = 4
PM1_CNT_BLK = PM_BASE + 4
PM1_CNT_LEN = 2
PM_TMR_BLK = PM_BASE + 8
PM_TMR_LEN = 4
RESET_PORT = 0xCF9
SCI_IRQ = 9

FADT_REVISION = 6
FADT_MINOR = 4
FADT_LENGTH = 276
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # "1: no fixed-feature power button"
FADT_SLP_BUTTON = 1 << 5
FADT_TMR_VAL_EXT = 1 << 8  # the PM timer counts 32 bits
FADT_RESET_REG_SUP = 1 << 10
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_NO_VGA = 1 << 2
IAPC_NO_CMOS_RTC = 1 << 5
SPACE_SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3

MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_PCAT_COMPAT = 1 << 0
MAX_XAPIC_ID = 254  # MADT type-0 entries carry 8-bit APIC IDs; 0xff means broadcast


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes the sum of `data` (with it in place of 0) zero modulo 256."""
    return (-sum(data)) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: header + body, with its checksum filled in."""
    length = HEADER.size + len(body)
    raw = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1) + body
    return raw[:9] + bytes([checksum(raw)]) + raw[10:]


def gas(address: int, width_bits: int, access: int, space: int = SPACE_SYSTEM_IO) -> bytes:
    return GAS.pack(space, width_bits, 0, access, address)


def aml_s5() -> bytes:
    """AML for `Name (_S5, Package (4) { 5, 5, 0, 0 })` (ACPI 6.4, 20.2.5 and 20.2.6)."""
    elements = bytes([0x0A, S5_SLEEP_TYPE, 0x0A, S5_SLEEP_TYPE, 0x00, 0x00])  # BytePrefix 5, BytePrefix 5, Zero, Zero
    package = bytes([4]) + elements  # NumElements, then the elements
    return bytes([0x08]) + b"_S5_" + bytes([0x12, len(package) + 1]) + package  # NameOp, NameSeg, PackageOp, PkgLength


@record(frozen=True)
class PciHost:
    """What the DSDT's root bridge and the MCFG describe."""

    ecam_base: int
    mmio_start: int
    mmio_end: int  # exclusive
    slots: int = 32
    first_intx_gsi: int = 16  # INTA-INTD of slot 0 land on GSI 16-19, swizzled by slot


def pci_root_bridge(pci: PciHost) -> bytes:
    """Device (\\_SB.PCI0): a PCI Express root bridge (PNP0A08, compatible PNP0A03) on segment 0,
    bus 0, with its windows in _CRS and its INTx wiring in _PRT (6.2.13)."""
    crs = aml.resource_template(
        aml.word_bus_number(0, 0),
        aml.io_port(0xCF8, 0xCF8, 1, 8),  # the configuration ports the bridge itself decodes
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(pci.mmio_start, pci.mmio_end - 1),
    )
    routes = [
        aml.package(aml.integer((slot << 16) | 0xFFFF), aml.integer(pin), aml.integer(0),
                    aml.integer(pci.first_intx_gsi + (slot + pin) % 4))
        for slot in range(pci.slots) for pin in range(4)
    ]
    return aml.scope("\\_SB_", aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_CRS", crs),
        aml.name("_PRT", aml.package(*routes)),
    ))


def dsdt(pci: PciHost | None = None) -> bytes:
    body = aml_s5() + (pci_root_bridge(pci) if pci is not None else b"")
    return table(b"DSDT", 2, body)


def mcfg(pci: PciHost) -> bytes:
    """MCFG (PCI Firmware Specification 3.2, 4.1.2): one ECAM allocation, segment 0, bus 0."""
    return table(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", pci.ecam_base, 0, 0, 0, 0))


def fadt(dsdt_address: int, cmos_rtc: bool = False) -> bytes:
    """`cmos_rtc`: the machine has the CMOS real-time clock at 0x70 (machines that boot firmware)."""
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    def put_bytes(offset: int, data: bytes) -> None:
        body[offset - HEADER.size : offset - HEADER.size + len(data)] = data

    put(40, "<I", dsdt_address)
    put(45, "<B", 0)  # preferred PM profile: unspecified
    put(46, "<H", SCI_IRQ)
    put(48, "<I", 0)  # SMI_CMD 0: no SMM, ACPI is always enabled (PM1_CNT.SCI_EN reads 1)
    put(56, "<I", PM1_EVT_BLK)
    put(64, "<I", PM1_CNT_BLK)
    put(76, "<I", PM_TMR_BLK)
    put(88, "<BBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN)
    put(96, "<HH", 101, 1001)  # C2 and C3 latencies above their limits: no C2/C3
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_NO_VGA | (0 if cmos_rtc else IAPC_NO_CMOS_RTC))
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP)
    put_bytes(116, gas(RESET_PORT, 8, ACCESS_BYTE))
    put(128, "<B", RESET_VALUE)
    put(131, "<B", FADT_MINOR)
    put(140, "<Q", dsdt_address)
    put_bytes(148, gas(PM1_EVT_BLK, 8 * PM1_EVT_LEN, ACCESS_WORD))
    put_bytes(172, gas(PM1_CNT_BLK, 8 * PM1_CNT_LEN, ACCESS_WORD))
    put_bytes(208, gas(PM_TMR_BLK, 8 * PM_TMR_LEN, ACCESS_DWORD))
    put(268, "<Q", int.from_bytes(b"WSWTCHPY", "little"))  # hypervisor vendor identity
    return table(b"FACP", FADT_REVISION, bytes(body))


def madt(vcpus: int) -> bytes:
    if not 1 <= vcpus <= MAX_XAPIC_ID + 1:
        raise ValueError(f"the MADT describes 1 to {MAX_XAPIC_ID + 1} vCPUs, not {vcpus}")
    body = bytearray(struct.pack("<II", LOCAL_APIC_ADDRESS, MADT_PCAT_COMPAT))
    for cpu in range(vcpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, 1)  # UID, APIC ID, enabled
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0)
    # ISA IRQs reach IOAPIC pins of the same number in KVM's default routing, so only the SCI needs
    # an override: level triggered, active high (flags 0b1101), as QEMU describes it.
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ, 0x000D)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)  # every CPU's LINT1 is NMI
    return table(b"APIC", 5, bytes(body))


def xsdt(addresses: list[int]) -> bytes:
    return table(b"XSDT", 1, struct.pack(f"<{len(addresses)}Q", *addresses))


def rsdt(addresses: list[int]) -> bytes:
    return table(b"RSDT", 1, struct.pack(f"<{len(addresses)}I", *addresses))


def rsdp(rsdt_address: int, xsdt_address: int) -> bytes:
    raw = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, rsdt_address, RSDP.size, xsdt_address, 0))
    raw[8] = checksum(raw[:20])  # ACPI 1.0 checksum: the first 20 bytes
    raw[32] = checksum(raw)  # extended checksum: all 36
    return bytes(raw)


@record(frozen=True)
class AcpiTables:
    rsdp_address: int
    base: int
    blob: bytes  # everything, to be written at `base`
    addresses: dict[str, int]  # signature -> guest-physical address
    listed: list[int]  # what the RSDT and XSDT point at, in their order


def build(base: int, vcpus: int, extra: Sequence[bytes] = (), pci: PciHost | None = None,
          cmos_rtc: bool = False) -> AcpiTables:
    """Lay out every table from `base` (16-byte aligned, RSDP first) and link them together.
    `extra` holds more finished tables for the XSDT and RSDT to list; with `pci`, the DSDT has a
    root bridge and an MCFG is added."""
    if base % 16:
        raise ValueError("the RSDP must be 16-byte aligned")
    blob = bytearray()
    addresses: dict[str, int] = {}

    def place(name: str, data: bytes) -> int:
        while len(blob) % 16:
            blob.append(0)
        address = base + len(blob)
        blob.extend(data)
        addresses[name] = address
        return address

    place("RSDP", bytes(RSDP.size))  # filled in last, once the XSDT's address is known
    dsdt_address = place("DSDT", dsdt(pci))
    listed = [place("FACP", fadt(dsdt_address, cmos_rtc)), place("APIC", madt(vcpus))]
    if pci is not None:
        extra = [*extra, mcfg(pci)]
    for data in extra:
        listed.append(place(data[:4].decode(), data))
    rsdt_address = place("RSDT", rsdt(listed))
    xsdt_address = place("XSDT", xsdt(listed))
    blob[: RSDP.size] = rsdp(rsdt_address, xsdt_address)
    return AcpiTables(base, base, bytes(blob), addresses, listed)
