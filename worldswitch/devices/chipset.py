"""The pieces of a PC chipset that a BIOS looks for (what QEMU's `pc` machine has): the Intel 440FX
host bridge with its PAM registers, the PIIX3 PCI-to-ISA bridge with its PIRQ routing registers,
the fast A20 and reset port 0x92, and the POST code port 0x80.

PAM (Programmable Attribute Map, 440FX datasheet 3.2.18, registers 0x59-0x5f) decides whether
0xC0000-0xFFFFF reads the BIOS ROM or RAM. Here that range is RAM from power-on, loaded with the
ROM's last 128 KiB, so it already holds what SeaBIOS would copy there (fw/shadow.c copies it over
itself, harmlessly); the registers keep what the firmware writes and read it back, but "read-only"
settings are not enforced: a guest may overwrite its own BIOS copy, as it could on a PC with
shadowing left writable.
"""

from __future__ import annotations

from typing import Callable

from .pci import PciFunction

I440FX_PAM0, I440FX_PAM_COUNT = 0x59, 7
I440FX_SMRAM = 0x72
PIIX3_PIRQ_ROUTE, PIIX3_PIRQ_COUNT = 0x60, 4
PIRQ_DISABLED = 0x80

A20_PORT = 0x92
A20_ENABLE, FAST_RESET = 1 << 1, 1 << 0
POST_PORT = 0x80


class I440fxHostBridge(PciFunction):
    """00:00.0, Intel 82441FX (PMC): the host bridge SeaBIOS knows a `pc` machine by."""

    def __init__(self) -> None:
        super().__init__(vendor=0x8086, device=0x1237, class_code=0x060000, revision=0x02)
        for register in range(I440FX_PAM0, I440FX_PAM0 + I440FX_PAM_COUNT):
            self.writable[register] = 0x33  # read-enable and write-enable for each half
        self.writable[I440FX_SMRAM] = 0x78
        self.config[I440FX_SMRAM] = 0x02  # C_BASE_SEG: SMRAM at 0xA0000, closed


class Piix3IsaBridge(PciFunction):
    """00:01.0, Intel 82371SB (PIIX3) function 0: the ISA bridge, whose PIRQ route registers
    firmware programs to tell which ISA IRQ each PCI interrupt pin goes to."""

    def __init__(self) -> None:
        super().__init__(vendor=0x8086, device=0x7000, class_code=0x060100)
        for register in range(PIIX3_PIRQ_ROUTE, PIIX3_PIRQ_ROUTE + PIIX3_PIRQ_COUNT):
            self.config[register] = PIRQ_DISABLED
            self.writable[register] = 0x8F

    def pirq_routes(self) -> list[int | None]:
        """The ISA IRQ of PIRQA-D, None where routing is off."""
        return [None if value & PIRQ_DISABLED else value & 0x0F
                for value in self.config[PIIX3_PIRQ_ROUTE : PIIX3_PIRQ_ROUTE + PIIX3_PIRQ_COUNT]]


class SystemControlPort:
    """Port 0x92, "system control port A": bit 1 gates A20 (always on here: KVM never wraps at
    1 MiB, and no firmware of ours relies on the wrap), bit 0 resets the machine."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.value = A20_ENABLE

    def read(self, offset: int, size: int) -> int:
        return self.value if size == 1 else (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        self.value = (value & ~FAST_RESET) | A20_ENABLE
        if value & FAST_RESET:
            self.on_reset()


class PostCodes:
    """Port 0x80: firmware writes its progress codes here; they are counted (for --stats) and the
    last one kept."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.count += 1
        self.last = value & 0xFF

    def counters(self) -> dict[str, int]:
        return {"post_codes": self.count, "last_post_code": self.last}
