"""ACPI tables byte for byte against the ACPI 6.4 layouts (chapter 5), checksums included."""

from __future__ import annotations

import struct

import pytest

from worldswitch.boot import acpi


def tables(vcpus: int = 1):
    built = acpi.build(0xE0000, vcpus)

    def at(address: int, length: int) -> bytes:
        offset = address - built.base
        return built.blob[offset : offset + length]

    def sdt(name: str) -> bytes:
        address = built.addresses[name]
        length = struct.unpack_from("<I", at(address, 8), 4)[0]
        return at(address, length)

    return built, at, sdt


def test_rsdp() -> None:
    built, at, _ = tables()
    rsdp = at(built.rsdp_address, 36)
    assert built.rsdp_address == 0xE0000 and built.rsdp_address % 16 == 0
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0  # ACPI 1.0 checksum
    assert sum(rsdp) % 256 == 0  # extended checksum
    assert rsdp[15] == 2  # revision: ACPI 2.0+
    rsdt_address, length, xsdt_address = struct.unpack_from("<IIQ", rsdp, 16)
    assert length == 36
    assert (rsdt_address, xsdt_address) == (built.addresses["RSDT"], built.addresses["XSDT"])


@pytest.mark.parametrize("name", ["RSDT", "XSDT", "FACP", "DSDT", "APIC"])
def test_every_table_has_a_valid_header_and_checksum(name: str) -> None:
    _, _, sdt = tables(4)
    data = sdt(name)
    signature, length, revision, _checksum, oem_id, table_id, _oem_rev, creator, _cr = acpi.HEADER.unpack_from(data)
    assert signature == name.encode() and length == len(data)
    assert sum(data) % 256 == 0
    assert oem_id == b"WSWTCH" and table_id == b"WORLDSWT"


def test_xsdt_and_rsdt_list_fadt_and_madt() -> None:
    built, _, sdt = tables()
    xsdt, rsdt = sdt("XSDT"), sdt("RSDT")
    assert list(struct.unpack_from("<2Q", xsdt, 36)) == [built.addresses["FACP"], built.addresses["APIC"]]
    assert list(struct.unpack_from("<2I", rsdt, 36)) == [built.addresses["FACP"], built.addresses["APIC"]]


def test_fadt_fields_at_their_specified_offsets() -> None:
    built, _, sdt = tables()
    fadt = sdt("FACP")
    assert len(fadt) == 276 and fadt[8] == 6  # ACPI 6.x FADT
    assert struct.unpack_from("<I", fadt, 40)[0] == built.addresses["DSDT"]  # DSDT
    assert struct.unpack_from("<Q", fadt, 140)[0] == built.addresses["DSDT"]  # X_DSDT
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # SMI_CMD: no SMM
    assert struct.unpack_from("<III", fadt, 56)[0] == 0x600  # PM1a_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == 0x604  # PM1a_CNT_BLK
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608  # PM_TMR_BLK
    assert fadt[88:92] == bytes([4, 2, 0, 4])  # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.FADT_RESET_REG_SUP and flags & acpi.FADT_TMR_VAL_EXT
    space, width, offset, access, address = acpi.GAS.unpack_from(fadt, 116)  # RESET_REG
    assert (space, width, access, address) == (acpi.SPACE_SYSTEM_IO, 8, 1, 0xCF9) and fadt[128] == 6
    assert acpi.GAS.unpack_from(fadt, 172)[4] == 0x604  # X_PM1a_CNT_BLK
    assert acpi.GAS.unpack_from(fadt, 208)[4] == 0x608  # X_PM_TMR_BLK


def test_dsdt_holds_the_s5_package() -> None:
    _, _, sdt = tables()
    aml = sdt("DSDT")[36:]
    # DefName(_S5_, DefPackage(PkgLength 8, NumElements 4, 5, 5, 0, 0))
    assert aml == bytes.fromhex("08 5F53355F 12 08 04 0A05 0A05 00 00".replace(" ", ""))


@pytest.mark.parametrize("vcpus", [1, 2, 64, 255])
def test_madt_describes_every_vcpu_and_the_ioapic(vcpus: int) -> None:
    _, _, sdt = tables(vcpus)
    madt = sdt("APIC")
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)  # LAPIC address, PCAT_COMPAT
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    lapics = [e for k, e in entries if k == 0]
    assert len(lapics) == vcpus
    for cpu, entry in enumerate(lapics):
        assert struct.unpack("<BBBBI", entry) == (0, 8, cpu, cpu, 1)
    (ioapic,) = [e for k, e in entries if k == 1]
    assert struct.unpack("<BBBBII", ioapic) == (1, 12, 0, 0, 0xFEC00000, 0)
    (override,) = [e for k, e in entries if k == 2]
    assert struct.unpack("<BBBBIH", override) == (2, 10, 0, 9, 9, 0x000D)
    (nmi,) = [e for k, e in entries if k == 4]
    assert struct.unpack("<BBBHB", nmi) == (4, 6, 0xFF, 0, 1)


def test_madt_refuses_vcpu_counts_it_cannot_describe() -> None:
    for bad in (0, 256):
        with pytest.raises(ValueError):
            acpi.madt(bad)


def test_extra_tables_are_listed_and_aligned() -> None:
    mcfg = acpi.table(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", 0xB0000000, 0, 0, 0, 0))
    built = acpi.build(0xE0000, 1, [mcfg])
    assert "MCFG" in built.addresses and built.addresses["MCFG"] % 16 == 0
    xsdt = built.blob[built.addresses["XSDT"] - built.base :]
    assert built.addresses["MCFG"] in struct.unpack_from("<3Q", xsdt, 36)


def test_tables_fit_the_rom_area() -> None:
    built = acpi.build(0xE0000, 255)
    assert built.base + len(built.blob) <= 0x100000


needs_iasl = pytest.mark.skipif(__import__("shutil").which("iasl") is None,
                                reason="iasl is not installed (.ci/run installs acpica-tools)")


@needs_iasl
@pytest.mark.parametrize("name", ["FACP", "DSDT", "APIC", "MCFG"])
def test_the_acpica_disassembler_reads_every_table_without_complaint(tmp_path, name: str) -> None:
    """A second opinion from the reference implementation: iasl -d decodes each table, and the
    DSDT it decompiles compiles back without errors."""
    import subprocess

    from worldswitch.memory.layout import ECAM_BASE, PCI_MMIO_END, PCI_MMIO_START

    built = acpi.build(0xE0000, 2, pci=acpi.PciHost(ECAM_BASE, PCI_MMIO_START, PCI_MMIO_END))
    address = built.addresses[name]
    offset = address - built.base
    length = struct.unpack_from("<I", built.blob, offset + 4)[0]
    (tmp_path / f"{name}.dat").write_bytes(built.blob[offset : offset + length])
    result = subprocess.run(["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    decoded = (tmp_path / f"{name}.dsl").read_text()
    assert "**** ACPI table terminates in the middle of a data structure!" not in decoded
    assert "Invalid" not in decoded and "Error" not in decoded, decoded
    if name == "DSDT":
        for expected in ("_S5_", "PNP0A08", "_PRT", "_CRS", "0xC0000000"):
            assert expected in decoded
        compiled = subprocess.run(["iasl", "-p", "recompiled", f"{name}.dsl"], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=60)
        assert compiled.returncode == 0 and "Errors" in compiled.stdout, compiled.stdout + compiled.stderr
        assert " 0 Errors" in compiled.stdout, compiled.stdout
    if name == "MCFG":
        assert "E0000000" in decoded.upper()
    if name == "APIC":
        assert decoded.count("Processor Local APIC") == 2
