"""The debug-exit port: a guest writes a value to port 0xf4 and the VM ends with that exit status.
Port 0xf4 is where kvm-unit-tests expects QEMU's isa-debug-exit; unlike QEMU we report the value
unchanged (QEMU reports value*2+1)."""

from __future__ import annotations

from typing import Callable

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.on_exit(value)
