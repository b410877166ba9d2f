"""A 16550A UART (National Semiconductor PC16550D data sheet), as a state machine.

The guest sees eight registers at COM1 (0x3f8-0x3ff); the device sees offsets 0-7. Its interrupt
line and its output sink are passed in, so it runs in tests without KVM. Transmission is instant
(the sink takes bytes as the guest writes them); reception goes through a 16-byte receive FIFO fed
from an unbounded backlog, so host input is never dropped while the guest is slow to read.

Whether a byte written to THR can raise the interrupt line is told to `thr_may_interrupt`, if one
is passed in, at construction, on restore and whenever it changes: where it cannot, the VMM may let
KVM queue those writes rather than exit for each (vmm/platform/coalesced.py).

Host input also waits in the backlog until the guest's driver shows it is receiving (it enables
the receive interrupt or reads the line status): a driver resets the FIFO while it starts, and
bytes the user typed or piped in before that must not vanish in the reset.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from ..record import field, record
from .base import InterruptLine

COM1_BASE = 0x3F8
COM1_IRQ = 4
REGISTER_COUNT = 8
FIFO_SIZE = 16

# Register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F


@record
class SerialState:
    """Everything the guest can observe, for snapshots (state() / from_state())."""

    ier: int = 0
    lcr: int = 0
    mcr: int = MCR_OUT2
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = MSR_DCD | MSR_DSR | MSR_CTS
    scr: int = 0
    dll: int = 0x0C  # 9600 baud, what a PC BIOS leaves behind
    dlm: int = 0
    fcr: int = 0
    thr_interrupt: bool = False
    listening: bool = False  # the guest has read LSR or enabled the receive interrupt
    rx_fifo: list[int] = field(default_factory=list)
    backlog: bytes = b""


class Serial:
    """The 16550A. `write(offset, size, value)` / `read(offset, size)` are its bus interface;
    `receive(data)` is how the host back end delivers input."""

    def __init__(self, irq: InterruptLine, sink: Callable[[bytes], None],
                 thr_may_interrupt: Callable[[bool], None] | None = None) -> None:
        self.irq = irq
        self.sink = sink
        self.thr_may_interrupt = thr_may_interrupt
        self._lock = threading.Lock()
        self._load(SerialState())
        self._told = self._thr_interrupts()
        if thr_may_interrupt is not None:
            thr_may_interrupt(self._told)
        self.bytes_out = 0
        self.bytes_in = 0

    def _load(self, state: SerialState) -> None:
        self.ier = state.ier
        self.lcr = state.lcr
        self.mcr = state.mcr
        self.lsr = state.lsr
        self.msr = state.msr
        self.scr = state.scr
        self.dll = state.dll
        self.dlm = state.dlm
        self.fcr = state.fcr
        self.thr_interrupt = state.thr_interrupt
        self.listening = state.listening
        self.rx_fifo: deque[int] = deque(state.rx_fifo)
        self.backlog: deque[int] = deque(state.backlog)

    # --- snapshot ---------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """What the guest printed and was given, for --stats."""
        return {"bytes_out": self.bytes_out, "bytes_in": self.bytes_in}

    def state(self) -> SerialState:
        with self._lock:
            return SerialState(
                self.ier, self.lcr, self.mcr, self.lsr, self.msr, self.scr, self.dll, self.dlm, self.fcr,
                self.thr_interrupt, self.listening, list(self.rx_fifo), bytes(self.backlog),
            )

    def restore(self, state: SerialState) -> None:
        with self._lock:
            self._load(state)
            self._update_irq()
            self._tell(force=True)

    # --- host side --------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Input from the host back end (a terminal, a pipe): queued, fed to the FIFO in order."""
        if not data:
            return
        with self._lock:
            self.backlog.extend(data)
            self.bytes_in += len(data)
            self._refill()
            self._update_irq()

    # --- guest side (bus interface) ---------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        output = None
        with self._lock:
            output = self._write(offset, value & 0xFF)
            self._update_irq()
            if offset != RBR_THR_DLL:
                self._tell()
        if output is not None:
            self.sink(output)  # outside the lock: a slow terminal must not block the input thread

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            value = self.rx_fifo.popleft() if self.rx_fifo else 0
            self._refill()
            return value
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._interrupt_id()
            if iir == IIR_THRI:
                self.thr_interrupt = False  # reading IIR acknowledges a THRE interrupt
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            if not self.listening:
                self.listening = True
                self._refill()
            value = self.lsr
            self.lsr &= ~(LSR_OE | LSR_BI)  # error bits clear on read
            return value
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (data sheet, MCR bit 4).
                mcr = self.mcr
                return (
                    (MSR_CTS if mcr & MCR_RTS else 0)
                    | (MSR_DSR if mcr & MCR_DTR else 0)
                    | (MSR_RI if mcr & MCR_OUT1 else 0)
                    | (MSR_DCD if mcr & MCR_OUT2 else 0)
                )
            value = self.msr
            self.msr &= ~MSR_DELTAS
            return value
        return self.scr

    def _write(self, offset: int, value: int) -> bytes | None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return None
            self.thr_interrupt = True  # the byte leaves at once: the THR is empty again
            if self.mcr & MCR_LOOP:
                self._push_rx(value)
                return None
            self.bytes_out += 1
            return bytes((value,))
        if offset == IER_DLM:
            if dlab:
                self.dlm = value
                return None
            enabling_thri = value & IER_THRI and not self.ier & IER_THRI
            self.ier = value & IER_MASK
            if enabling_thri:
                self.thr_interrupt = True  # the THR is empty, so enabling THRI raises it
            if value & IER_RDI and not self.listening:
                self.listening = True
                self._refill()
            return None
        if offset == IIR_FCR:
            if value & FCR_CLEAR_RX:
                self.rx_fifo.clear()
                self.lsr &= ~(LSR_DR | LSR_OE)
            if (value ^ self.fcr) & FCR_ENABLE:
                self.rx_fifo.clear()
            self.fcr = value & (FCR_ENABLE | 0xC0)
            self._refill()
            return None
        if offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & MCR_MASK
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only; writes to them are ignored, as on the real part.
        return None

    # --- internals --------------------------------------------------------------------------

    def _capacity(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _push_rx(self, byte: int) -> None:
        if len(self.rx_fifo) >= self._capacity():
            self.lsr |= LSR_OE  # loopback overrun: the data sheet drops the new byte
            return
        self.rx_fifo.append(byte)
        self.lsr |= LSR_DR

    def _refill(self) -> None:
        capacity = self._capacity()
        while self.backlog and self.listening and len(self.rx_fifo) < capacity and not self.mcr & MCR_LOOP:
            self.rx_fifo.append(self.backlog.popleft())
        if self.rx_fifo:
            self.lsr |= LSR_DR
        else:
            self.lsr &= ~LSR_DR

    def _interrupt_id(self) -> int:
        """The highest-priority pending interrupt, as IIR bits 0-3 (data sheet table 4)."""
        if self.ier & IER_RLSI and self.lsr & (LSR_OE | LSR_BI):
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx_fifo:
            trigger = RX_TRIGGER_LEVELS[self.fcr >> 6] if self.fcr & FCR_ENABLE else 1
            # Below the trigger level the real part raises a character timeout after four
            # character times; with no line timing to model, we report it at once.
            return IIR_RDI if len(self.rx_fifo) >= trigger else IIR_TIMEOUT
        if self.ier & IER_THRI and self.thr_interrupt:
            return IIR_THRI
        if self.ier & IER_MSI and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _thr_interrupts(self) -> bool:
        """Whether a write to THR can raise the interrupt line: with THRI enabled, or looped back into
        the receive FIFO with a receive interrupt enabled (a DLL write, with DLAB set, raises nothing,
        and is also seen only by a read)."""
        return bool(self.ier & IER_THRI or (self.mcr & MCR_LOOP and self.ier & (IER_RDI | IER_RLSI)))

    def _tell(self, force: bool = False) -> None:
        may = self._thr_interrupts()
        if self.thr_may_interrupt is not None and (force or may != self._told):
            self._told = may
            self.thr_may_interrupt(may)

    def _update_irq(self) -> None:
        self.irq.set_level(self._interrupt_id() != IIR_NO_INT)
