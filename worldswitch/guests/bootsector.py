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
WAITING = b"worldswitch: press a key"


def boot_sector(message: bytes, wait_for_key: bool = False) -> bytes:
    """16-bit code at 0x7c00: print `message` with int 10h AH=0Eh, then write SLP_TYP=S5|SLP_EN to
    PM1_CNT. With `wait_for_key`, it first prints WAITING and waits for a key (int 16h AH=00h)."""
    strings = [WAITING, message] if wait_for_key else [message]
    code = bytearray(b"\xfa\x31\xc0\x8e\xd8")  # cli; xor ax,ax; mov ds,ax
    fixups: list[tuple[int, int]] = []  # (where a string's address goes, which string)
    calls: list[int] = []  # where a call to print's displacement goes
    for index in range(len(strings)):
        if index:
            code += b"\xfb\xb4\x00\xcd\x16"  # sti; mov ah,0; int 0x16: wait for a key
        fixups.append((len(code) + 1, index))
        code += b"\xbe\x00\x00\xe8\x00\x00"  # mov si, string; call print
        calls.append(len(code) - 2)
    code += b"\xba" + struct.pack("<H", PM1_CNT)  # mov dx, PM1_CNT
    code += b"\xb8" + struct.pack("<H", (S5_SLEEP_TYPE << 10) | SLP_EN) + b"\xef"  # mov ax, S5|SLP_EN; out dx, ax
    code += b"\xf4\xeb\xfd"  # hlt; jmp hlt
    print_at = len(code)
    code += b"\xac\x84\xc0\x74\x09"  # print: lodsb; test al,al; jz done
    code += b"\xb4\x0e\xbb\x07\x00\xcd\x10"  # mov ah,0x0e; mov bx,7; int 0x10
    code += b"\xeb\xf2\xc3"  # jmp print; done: ret
    for at in calls:
        struct.pack_into("<h", code, at, print_at - (at + 2))
    for at, index in fixups:
        struct.pack_into("<H", code, at, 0x7C00 + len(code))
        # a line of padding after each: SeaBIOS's serial console sends what it holds when it can
        code += strings[index] + b"\r\n" + b" " * 60 + b"\r\n\0"
    if len(code) > 446:
        raise ValueError("the message does not fit in the boot sector")
    return bytes(code).ljust(510, b"\0") + b"\x55\xaa"
