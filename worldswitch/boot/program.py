"""Configuring the entry into a bare-metal program (`worldswitch run --elf`, and the built-in
guests): the register state the README documents, on top of the long-mode tables (longmode.py).

At entry:
    64-bit long mode, ring 0, interrupts disabled (RFLAGS = 0x2), no IDT
    CS 0x08 (ring-0 code), DS/ES/FS/GS/SS 0x10; GDT also holds ring-3 data 0x1b, ring-3 code 0x23
    TR 0x28: a TSS whose RSP0 is the initial stack top and whose I/O bitmap allows every port
    CR3: identity map of the first 4 GiB, 2 MiB pages, writable and user-accessible
    RIP = ELF entry point, RSP = 0x8f000 (64 KiB of stack below it)
    RDI = guest-physical address of the argument string (NUL-terminated, at most 4095 bytes)
    RSI = guest RAM size in bytes, RDX = number of vCPUs
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import ConfigError
from ..memory.guest import GuestMemory
from .longmode import LongModeLayout

ARGS_ADDR = 0x5000
ARGS_MAX = 4095


class ProgramEntry(NamedTuple):
    rip: int
    rsp: int
    args_addr: int
    ram_size: int
    vcpus: int


def reserved_ranges(layout: LongModeLayout) -> list[tuple[int, int]]:
    """Memory a program must not be loaded over: the long-mode scaffolding and the argument page."""
    return layout.reserved + [(ARGS_ADDR, ARGS_ADDR + ARGS_MAX + 1)]


def configure_program(memory: GuestMemory, entry: int, args: str, vcpus: int, layout: LongModeLayout) -> ProgramEntry:
    encoded = args.encode()
    if len(encoded) > ARGS_MAX or b"\0" in encoded:
        raise ConfigError(f"guest arguments must be at most {ARGS_MAX} bytes without NUL characters")
    memory.write(ARGS_ADDR, encoded + b"\0")
    return ProgramEntry(rip=entry, rsp=layout.stack_top, args_addr=ARGS_ADDR, ram_size=memory.size, vcpus=vcpus)
