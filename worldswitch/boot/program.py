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

The other vCPUs wait for the program's INIT and startup IPIs, and run its own trampoline. Under
`--monitor` with more than one vCPU, the program names the first instruction its APs run in 64-bit
mode with the function symbol `secondary_startup_64` (Linux's name for the same place), in ring 0 on
a GDT and page tables of its own: there the VMM hands each AP to its copy of the monitor, which runs
the program's ring 0 on it deprivileged too (vmm/x86/ap_start.py; guests/src/ap_trampoline.S).
"""

from __future__ import annotations

from ..errors import ConfigError, GuestImageError
from ..memory.guest import GuestMemory
from ..record import record
from .elf import read_function_symbols
from .longmode import LongModeLayout

ARGS_ADDR = 0x5000
ARGS_MAX = 4095


@record(frozen=True)
class ProgramEntry:
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


def ap_entry(image: bytes) -> int:
    """Where the program's APs enter 64-bit mode, for the monitor to take them over: its function
    AP_ENTRY (the module's docstring). Raises GuestImageError for a program whose symbols lack it."""
    from .monitor import AP_ENTRY  # only for --monitor with APs: every other run skips the monitor's module

    for address, name in read_function_symbols(image):
        if name == AP_ENTRY:
            return address
    raise GuestImageError(f"--monitor --cpus above 1: the program's symbols have no function {AP_ENTRY}, where its "
                          "APs enter 64-bit mode and the monitor takes them over (boot/program.py)")
