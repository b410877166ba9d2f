"""The sequence test device: a register that guests write ascending numbers to, one exit each.

It is the target of the `exits` guest and of the world-switch benchmarks, and the witness for the
interrupt-path tests: every write is counted and checked against the previous one, so an exit the
VMX lost (a gap) or handled twice (a repeat) shows up as an ordering error.

Registers (the same on its port and its MMIO page):
    offset 0, write: the next sequence number; read: how many writes arrived
    offset 4, write: reset the counters
"""

from __future__ import annotations

from ..record import record

TESTDEV_PORT = 0x1010
TESTDEV_PORT_SIZE = 8
TESTDEV_MMIO = 0xFEB00000
TESTDEV_MMIO_SIZE = 0x1000


@record(frozen=True)
class SequenceState:
    writes: int = 0
    last: int = 0
    errors: int = 0
    first_error: tuple[int, int] | None = None  # (expected, got)


class SequenceRegister:
    """One writer at a time (one vCPU), so no lock: it sits on the hot path of the exit
    benchmarks, where a lock costs more than the rest of the device (see bench/README.md)."""

    __slots__ = ("writes", "last", "errors", "first_error")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.writes = 0
        self.last = 0
        self.errors = 0
        self.first_error: tuple[int, int] | None = None

    def state(self) -> SequenceState:
        return SequenceState(self.writes, self.last, self.errors, self.first_error)

    def restore(self, state: SequenceState) -> None:
        self.writes, self.last, self.errors = state.writes, state.last, state.errors
        self.first_error = tuple(state.first_error) if state.first_error else None  # type: ignore[assignment]

    def read(self, offset: int, size: int) -> int:
        return self.writes if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.writes += 1
            if value != self.last + 1:
                self.errors += 1
                if self.first_error is None:
                    self.first_error = (self.last + 1, value)
            self.last = value
        elif offset == 4:
            self.reset()
