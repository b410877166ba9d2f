"""The sequence test device: a register that guests write ascending numbers to, one exit each.

It is the target of the `exits` guest and of the world-switch benchmarks, and the witness for the
interrupt-path tests: every write is counted and checked against the previous one, so an exit the
VMX lost (a gap) or handled twice (a repeat) shows up as an ordering error.

Registers (the same on its port and its MMIO page):
    offset 0, write: the next sequence number; read: how many writes arrived
    offset 4, write: reset the counters
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

TESTDEV_PORT = 0x1010
TESTDEV_PORT_SIZE = 8
TESTDEV_MMIO = 0xFEB00000
TESTDEV_MMIO_SIZE = 0x1000


@dataclass
class SequenceState:
    writes: int = 0
    last: int = 0
    errors: int = 0
    first_error: tuple[int, int] | None = None  # (expected, got)


class SequenceRegister:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = SequenceState()

    def read(self, offset: int, size: int) -> int:
        return self.state.writes if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            state = self.state
            if offset == 4:
                self.state = SequenceState()
            elif offset == 0:
                state.writes += 1
                if value != state.last + 1:
                    state.errors += 1
                    if state.first_error is None:
                        state.first_error = (state.last + 1, value)
                state.last = value
