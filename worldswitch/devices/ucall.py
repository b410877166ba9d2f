"""The ucall port: how worldswitch's own guest programs report to the VMX, after the "ucall" of
the Linux KVM selftests. The guest fills a `struct ucall` in its memory and writes its address to
port 0x1000; the device reads it through the bounds-checked guest memory accessor.

    struct ucall {            // guests/src/ws.h has the C side
        uint32_t cmd;         // SYNC, DONE, ABORT, PRINT
        uint32_t line;        // source line of the GUEST_* macro
        uint64_t args[4];
        char file[32];        // source file, NUL-terminated
        char text[96];        // message, NUL-terminated
    };
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Callable

from ..errors import GuestMemoryError
from ..record import record
from .base import GuestRam

UCALL_PORT = 0x1000
UCALL_PORT_SIZE = 4
UCALL_FORMAT = "<II4Q32s96s"
UCALL_SIZE = struct.calcsize(UCALL_FORMAT)  # 168


class UcallCommand(IntEnum):
    SYNC = 1  # a checkpoint: args carry values for the host to check
    DONE = 2  # the program finished; args[0] is its result
    ABORT = 3  # a guest assertion failed: file, line and text say which
    PRINT = 4  # a line of text for the host's log


@record(frozen=True)
class Ucall:
    command: int
    line: int
    args: tuple[int, int, int, int]
    file: str
    text: str

    def describe(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else "guest"
        if self.command == UcallCommand.ABORT:
            return f"guest assertion failed at {where}: {self.text}"
        name = UcallCommand(self.command).name if self.command in UcallCommand._value2member_map_ else str(self.command)
        return f"ucall {name} from {where}: {self.text} {list(self.args)}"


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_ucall(raw: bytes) -> Ucall:
    command, line, a0, a1, a2, a3, file, text = struct.unpack(UCALL_FORMAT, raw)
    return Ucall(command, line, (a0, a1, a2, a3), _text(file), _text(text))


class UcallPort:
    def __init__(self, memory: GuestRam, on_ucall: Callable[[Ucall], None]) -> None:
        self.memory = memory
        self.on_ucall = on_ucall

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        try:
            call = decode_ucall(self.memory.read(value, UCALL_SIZE))
        except GuestMemoryError:
            call = Ucall(UcallCommand.ABORT, 0, (value, 0, 0, 0), "", f"ucall block at {value:#x} is outside guest RAM")
        if call.command not in UcallCommand._value2member_map_:
            call = Ucall(UcallCommand.ABORT, call.line, call.args, call.file, f"unknown ucall command {call.command}")
        self.on_ucall(call)
