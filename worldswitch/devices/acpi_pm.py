"""ACPI fixed-hardware power management (ACPI 6.4, 4.8): the PM1 event and control blocks, the PM
timer, and a reset register, at the I/O ports the FADT announces (boot/acpi.py).

Power-off is the guest writing SLP_EN with the \\_S5 sleep type to PM1_CNT; reset is writing
RESET_VALUE to the reset register. There is no SMM: SCI_EN always reads 1, so the OS finds ACPI
already enabled. The PM timer counts at 3.579545 MHz from the host's monotonic clock.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..record import record

PM_TIMER_HZ = 3_579_545
RESET_VALUE = 0x06  # "hard reset", as in the PIIX reset control register; the FADT announces it
S5_SLEEP_TYPE = 5  # the SLP_TYP that powers off; the DSDT's \_S5 object gives it to the OS

PM1_STS_WAK = 1 << 15
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_TYP_MASK = 0x7 << PM1_CNT_SLP_TYP_SHIFT
PM1_CNT_SLP_EN = 1 << 13

# Offsets inside the 12-port block at acpi.PM_BASE
EVT_STATUS = 0
EVT_ENABLE = 2
CONTROL = 4
TIMER = 8
BLOCK_SIZE = 12


@record
class AcpiPmState:
    status: int = 0
    enable: int = 0
    control: int = PM1_CNT_SCI_EN


class AcpiPm:
    def __init__(self, on_power_off: Callable[[], None], on_sleep: Callable[[int], None] | None = None) -> None:
        self.on_power_off = on_power_off
        self.on_sleep = on_sleep  # S1-S4, which worldswitch does not offer: reported, then ignored
        self._lock = threading.Lock()
        self._epoch_ns = time.monotonic_ns()
        self._load(AcpiPmState())

    def _load(self, state: AcpiPmState) -> None:
        self.status, self.enable, self.control = state.status, state.enable, state.control | PM1_CNT_SCI_EN

    def state(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(self.status, self.enable, self.control)

    def restore(self, state: AcpiPmState) -> None:
        with self._lock:
            self._load(state)

    def timer(self) -> int:
        return ((time.monotonic_ns() - self._epoch_ns) * PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFFFF

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            registers = (
                self.status.to_bytes(2, "little") + self.enable.to_bytes(2, "little")
                + self.control.to_bytes(2, "little") + b"\0\0" + self.timer().to_bytes(4, "little")
            )
        return int.from_bytes(registers[offset : offset + size].ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        action = None
        with self._lock:
            for i in range(size):  # byte by byte: a 32-bit write to the event block hits both halves
                byte = (value >> (8 * i)) & 0xFF
                at = offset + i
                if at in (EVT_STATUS, EVT_STATUS + 1):
                    self.status &= ~(byte << (8 * (at - EVT_STATUS)))  # write 1 to clear
                elif at in (EVT_ENABLE, EVT_ENABLE + 1):
                    shift = 8 * (at - EVT_ENABLE)
                    self.enable = (self.enable & ~(0xFF << shift)) | (byte << shift)
                elif at in (CONTROL, CONTROL + 1):
                    shift = 8 * (at - CONTROL)
                    self.control = ((self.control & ~(0xFF << shift)) | (byte << shift)) | PM1_CNT_SCI_EN
            if self.control & PM1_CNT_SLP_EN:
                sleep_type = (self.control & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT
                self.control &= ~PM1_CNT_SLP_EN  # SLP_EN is write-only: it reads as 0
                action = sleep_type
        if action == S5_SLEEP_TYPE:
            self.on_power_off()
        elif action is not None and self.on_sleep is not None:
            self.on_sleep(action)


class ResetRegister:
    """The reset register the FADT names (port 0xcf9, like the PIIX's reset control register)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == RESET_VALUE or value & 0x04:  # the value the FADT gives, or any "reset CPU" write
            self.on_reset()
