"""The PC's CMOS RAM and real-time clock (Motorola MC146818A; the register layout firmware expects of
a PC): index at port 0x70 (bit 7 masks NMI), data at 0x71, 128 bytes.

Registers 0-9 are the time, read from the host's clock in the mode status register B selects (BCD
or binary, 12 or 24 hours; writes to them are kept as an offset from the host's clock, so a guest
may set its own time); register A's update-in-progress bit never stays set; register C reports and
clears the interrupt flags; register D says the battery is good. Register B's periodic interrupt
enable (PIE) raises IRQ 8 at the rate register A's low nibble selects, from a thread of its own.
The bytes firmware reads for memory size (0x15-0x18, 0x30-0x31, 0x34-0x35, 0x5b-0x5d) and the CPU
count (0x5f) are filled in as QEMU fills them.
"""

from __future__ import annotations

import calendar
import threading
import time

from ..record import record
from .base import InterruptLine

INDEX_PORT = 0x70
PORT_SPAN = 2
RTC_IRQ = 8
SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0, 2, 4, 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
B_24H, B_BINARY, B_PIE, B_SET = 0x02, 0x04, 0x40, 0x80
C_IRQF, C_PF = 0x80, 0x40
D_VRT = 0x80
A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)
KIB, MIB = 1 << 10, 1 << 20


@record
class CmosState:
    ram: bytes
    index: int
    clock_offset: float  # seconds the guest's clock is ahead of the host's


def memory_bytes(below_4g: int, above_4g: int, cpus: int) -> dict[int, int]:
    """The CMOS bytes that describe memory and CPUs, as QEMU's PC machine sets them."""
    values: dict[int, int] = {0x15: 640 & 0xFF, 0x16: 640 >> 8}  # base memory, KiB
    extended = min(max(below_4g - MIB, 0) // KIB, 0xFFFF)  # KiB above 1 MiB, up to 64 MiB - 1 KiB
    values.update({0x17: extended & 0xFF, 0x18: extended >> 8, 0x30: extended & 0xFF, 0x31: extended >> 8})
    above_16m = min(max(below_4g - 16 * MIB, 0) // (64 * KIB), 0xFFFF)  # 64 KiB units between 16 MiB and 4 GiB
    values.update({0x34: above_16m & 0xFF, 0x35: above_16m >> 8})
    high = above_4g // (64 * KIB)  # 64 KiB units above 4 GiB
    values.update({0x5B: high & 0xFF, 0x5C: (high >> 8) & 0xFF, 0x5D: (high >> 16) & 0xFF})
    values[0x5F] = cpus - 1
    return values


class Cmos:
    def __init__(self, irq: InterruptLine, initial: dict[int, int]) -> None:
        self.irq = irq
        self.ram = bytearray(128)
        for index, value in initial.items():
            self.ram[index] = value
        self.ram[REG_A], self.ram[REG_B], self.ram[REG_D] = A_DEFAULT, B_24H, D_VRT
        self.index = 0
        self.clock_offset = 0.0
        self.periodic_ticks = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- ports ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return (1 << (8 * size)) - 1
        with self._lock:
            if offset == 0:
                return 0xFF  # the index register is write-only
            return self._register(self.index)

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        with self._lock:
            if offset == 0:
                self.index = value & 0x7F  # bit 7 masks NMIs, which no device here raises
                return
            self._set_register(self.index, value & 0xFF)
        self._wake.set()

    def _register(self, index: int) -> int:
        if index in TIME_REGISTERS:
            return self._time_fields()[index]
        if index == REG_A:
            return self.ram[REG_A] & 0x7F  # update in progress: never seen set
        if index == REG_C:
            value, self.ram[REG_C] = self.ram[REG_C], 0
            if value:
                self.irq.set_level(False)
            return value
        return self.ram[index]

    def _set_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            fields = self._time_fields()
            fields[index] = value
            self.clock_offset = self._seconds(fields) - time.time()
        elif index == REG_A:
            self.ram[REG_A] = value & 0x7F
        elif index == REG_B:
            self.ram[REG_B] = value
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self.ram[index] = value

    # --- the clock ---------------------------------------------------------------------------

    def _encode(self, value: int) -> int:
        return value if self.ram[REG_B] & B_BINARY else (value // 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        return value if self.ram[REG_B] & B_BINARY else (value >> 4) * 10 + (value & 0x0F)

    def _time_fields(self) -> dict[int, int]:
        now = time.gmtime(time.time() + self.clock_offset)
        hour = now.tm_hour
        if not self.ram[REG_B] & B_24H:
            pm = hour >= 12
            hour = self._encode(hour % 12 or 12) | (0x80 if pm else 0)
        else:
            hour = self._encode(hour)
        return {SECONDS: self._encode(now.tm_sec), MINUTES: self._encode(now.tm_min), HOURS: hour,
                WEEKDAY: self._encode((now.tm_wday + 1) % 7 + 1), DAY: self._encode(now.tm_mday),
                MONTH: self._encode(now.tm_mon), YEAR: self._encode(now.tm_year % 100),
                CENTURY: self._encode(now.tm_year // 100)}

    def _seconds(self, fields: dict[int, int]) -> float:
        hour_field = fields[HOURS]
        if self.ram[REG_B] & B_24H:
            hour = self._decode(hour_field)
        else:
            hour = self._decode(hour_field & 0x7F) % 12 + (12 if hour_field & 0x80 else 0)
        year = self._decode(fields[CENTURY]) * 100 + self._decode(fields[YEAR])
        try:
            return float(calendar.timegm((year, self._decode(fields[MONTH]), self._decode(fields[DAY]), hour,
                                          self._decode(fields[MINUTES]), self._decode(fields[SECONDS]), 0, 0, 0)))
        except (ValueError, OverflowError):
            return time.time() + self.clock_offset  # nonsense from the guest: the clock stays as it was

    # --- the periodic interrupt --------------------------------------------------------------

    def period(self) -> float | None:
        """Seconds between periodic interrupts, or None while they are off."""
        rate = self.ram[REG_A] & 0x0F
        if not self.ram[REG_B] & B_PIE or rate == 0:
            return None
        if rate <= 2:
            rate += 7  # rates 1 and 2 mean 256 and 128 Hz on a 32.768 kHz time base
        return (1 << (rate - 1)) / 32768

    def start(self) -> None:
        self._ticker = threading.Thread(target=self._tick, name="rtc", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._ticker is not None:
            self._ticker.join(2)

    def _tick(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                period = self.period()
            if period is None:
                self._wake.wait()
                self._wake.clear()
                deadline = time.monotonic()
                continue
            deadline += max(period, 0.001)  # at most 1 kHz of host wake-ups, however fast the guest asks
            delay = deadline - time.monotonic()
            if delay > 0 and self._wake.wait(delay):
                self._wake.clear()
                continue
            with self._lock:
                self.ram[REG_C] |= C_IRQF | C_PF
                self.periodic_ticks += 1
            self.irq.set_level(True)  # edge to the PIC; reading register C lowers it

    # --- snapshots -----------------------------------------------------------------------------

    def state(self) -> CmosState:
        with self._lock:
            return CmosState(bytes(self.ram), self.index, self.clock_offset)

    def restore(self, state: CmosState) -> None:
        with self._lock:
            self.ram[:] = state.ram[:128].ljust(128, b"\0")
            self.index, self.clock_offset = state.index & 0x7F, state.clock_offset
        self._wake.set()

    def counters(self) -> dict[str, int]:
        return {"periodic_interrupts": self.periodic_ticks}
