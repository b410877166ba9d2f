"""Enough of the i8042 keyboard controller for a PC guest: the status and data ports, the command
byte, self-tests, and the reset line (command 0xFE, or output-port bit 0 cleared), which is how
Linux and most bootloaders reboot a PC. No keyboard or mouse is attached."""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from ..record import field, record

DATA_PORT = 0x60
COMMAND_PORT = 0x64

STATUS_OBF = 0x01  # output buffer full: the guest may read port 0x60
STATUS_SYS = 0x04  # system flag: set once the controller passed its self-test
STATUS_CMD = 0x08  # the last write went to the command port
STATUS_UNLOCKED = 0x10  # the keyboard is not inhibited (no "keylock")

CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
OUTPUT_PORT_RESET_DEASSERTED = 0x01  # bit 0 low resets the CPU


@record
class I8042State:
    command_byte: int = 0x45  # keyboard interrupt on, translation on, as firmware leaves it
    output_port: int = 0xCF
    status: int = STATUS_SYS | STATUS_UNLOCKED
    pending_command: int = 0
    output: list[int] = field(default_factory=list)


class I8042:
    """Registered on ports 0x60 and 0x64: `read`/`write` take the port as offset 0 (data) or
    4 (command/status)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self._lock = threading.Lock()
        self._load(I8042State())

    def _load(self, state: I8042State) -> None:
        self.command_byte = state.command_byte
        self.output_port = state.output_port
        self.status = state.status
        self.pending_command = state.pending_command
        self.output: deque[int] = deque(state.output)

    def state(self) -> I8042State:
        with self._lock:
            return I8042State(self.command_byte, self.output_port, self.status, self.pending_command, list(self.output))

    def restore(self, state: I8042State) -> None:
        with self._lock:
            self._load(state)

    def _reply(self, value: int) -> None:
        self.output.append(value & 0xFF)

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == COMMAND_PORT - DATA_PORT:
                return self.status | (STATUS_OBF if self.output else 0)
            return self.output.popleft() if self.output else 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        reset = False
        with self._lock:
            if offset == COMMAND_PORT - DATA_PORT:
                self.status |= STATUS_CMD
                reset = self._command(value)
            else:
                self.status &= ~STATUS_CMD
                reset = self._data(value)
        if reset:
            self.on_reset()

    def _command(self, command: int) -> bool:
        self.pending_command = 0
        if command == CMD_READ_COMMAND_BYTE:
            self._reply(self.command_byte)
        elif command in (CMD_WRITE_COMMAND_BYTE, CMD_WRITE_OUTPUT_PORT):
            self.pending_command = command
        elif command == CMD_SELF_TEST:
            self.status |= STATUS_SYS
            self._reply(SELF_TEST_OK)
        elif command in (CMD_TEST_KBD, CMD_TEST_AUX):
            self._reply(0x00)  # interface test passed
        elif command == CMD_READ_OUTPUT_PORT:
            self._reply(self.output_port)
        elif command == CMD_DISABLE_KBD:
            self.command_byte |= 0x10
        elif command == CMD_ENABLE_KBD:
            self.command_byte &= ~0x10
        elif command == CMD_DISABLE_AUX:
            self.command_byte |= 0x20
        elif command == CMD_ENABLE_AUX:
            self.command_byte &= ~0x20
        elif 0xF0 <= command <= 0xFF:
            # Pulse output-port lines whose bit is 0 in the low nibble; bit 0 is the CPU reset.
            return not command & 0x01
        return False

    def _data(self, value: int) -> bool:
        command, self.pending_command = self.pending_command, 0
        if command == CMD_WRITE_COMMAND_BYTE:
            self.command_byte = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
            return not value & OUTPUT_PORT_RESET_DEASSERTED
        else:
            # A byte for the keyboard, and there is no keyboard: answer as a controller does when
            # the device does not respond (timeout), so drivers give up quickly.
            self._reply(0xFE)
        return False
