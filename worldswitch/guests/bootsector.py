"""A boot sector, the smallest guest a BIOS boots: 16-bit code at 0x7c00 that prints a line through
the BIOS (int 10h, AH=0Eh teletype) and powers the machine off through ACPI (SLP_TYP for S5 with
SLP_EN, written to PM1_CNT at the address worldswitch's FADT gives). The firmware tests and
bench/firmware.py boot it from a disk image."""

from __future__ import annotations

import struct

PM1_CNT = 0x604  # boot/acpi.py PM1_CNT_BLK, where SeaBIOS also puts PIIX4's on QEMU's pc machine
S5_SLEEP_TYPE = 5  # what the DSDT gives for \_S5 (devices/acpi_pm.py; tests/test_firmware_devices.py checks)
SLP_EN = 1 << 13
MESSAGE = b"worldswitch: booted from disk"


def boot_sector(message: bytes) -> bytes:
    """16-bit code at 0x7c00: print `message` with int 10h AH=0Eh, then write SLP_TYP=S5|SLP_EN to PM1_CNT."""
    code = bytearray(b"\xfa\x31\xc0\x8e\xd8")  # cli; xor ax,ax; mov ds,ax
    si_at = len(code) + 1
    code += b"\xbe\x00\x00"  # mov si, message
    loop = len(code)
    code += b"\xac\x84\xc0"  # lodsb; test al,al
    jz_at = len(code)
    code += b"\x74\x00"  # jz done
    code += b"\xb4\x0e\xbb\x07\x00\xcd\x10"  # mov ah,0x0e; mov bx,7; int 0x10
    code += b"\xeb" + bytes([(loop - (len(code) + 2)) & 0xFF])  # jmp loop
    code[jz_at + 1] = len(code) - (jz_at + 2)
    code += b"\xba" + struct.pack("<H", PM1_CNT)  # mov dx, PM1_CNT
    code += b"\xb8" + struct.pack("<H", (S5_SLEEP_TYPE << 10) | SLP_EN) + b"\xef"  # mov ax, S5|SLP_EN; out
    code += b"\xf4\xeb\xfd"  # hlt; jmp hlt
    struct.pack_into("<H", code, si_at, 0x7C00 + len(code))
    # a line of padding after the message: SeaBIOS's serial console sends what it holds when it can
    code += message + b"\r\n" + b" " * 70 + b"\r\n\0"
    return bytes(code).ljust(510, b"\0") + b"\x55\xaa"
