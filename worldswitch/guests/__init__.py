"""worldswitch's own guest programs: small bare-metal x86-64 programs, built from src/ with the
host's gcc and binutils (python -m worldswitch.guests.build) and shipped prebuilt in bin/."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

GUESTS_DIR = Path(__file__).resolve().parent
SOURCE_DIR = GUESTS_DIR / "src"
BIN_DIR = GUESTS_DIR / "bin"
# The in-guest monitor (`--monitor`, docs/monitor.md): built beside the guests, not one of them.
MONITOR_IMAGE = BIN_DIR / "monitor.elf"

# name -> what it does (the first line of `worldswitch guests`)
BUILTIN_GUESTS: dict[str, str] = {
    "hello": "prints a banner through the UART from ring 3 and exits through the debug-exit port",
    "exits": "makes N port-I/O and N MMIO exits from ring 3 (args: [N] [io|mmio|both])",
    "timer": "takes N LAPIC or PIT timer interrupts through its IDT while spinning in ring 3 (args: [N] [lapic|pit] [held])",
    "fault": "misbehaves on purpose (args: ud | gp | triple | unmapped N | spin | halt | abort | int3 N | peek A | idt A | map A | wipe A N | stack | gate | intn)",
    "echo": "echoes UART input back in upper case until it reads a line 'quit' (interrupt-driven)",
    "power": "powers off (ACPI S5) or resets (i8042, ACPI reset register) from ring 3 (args: off | kbd | acpi)",
    "smp": "starts the other vCPUs with INIT/SIPI and counts them (args: [seconds to wait])",
    "vblk": "a ring-3 virtio-blk driver: finds the disk on PCI, tests it or benchmarks reads (args: test | seq N [QD] | rand N [QD], [second], [packed])",
    "count": "every vCPU counts to a target, checking memory against its register at each step (args: [N] [N for APs])",
    "spray": "reads and writes every size at every offset of every device region and port, to show the VMX survives it (args: [stride])",
    "probe": "runs a counted loop in ring 0 or ring 3 between two ucalls, or tests SYSCALL from ring 3 (args: ring0|ring3 [N] | syscall)",
    "privileged": "executes in ring 0 the privileged instructions a kernel uses and checks each (control registers, MSRs, descriptor tables, the interrupt flag; args: [linux] for Linux's GDT layout)",
    "paging": "what a kernel does with its page tables, checked from the inside (args: dirty | cr3 | supervisor [sgdt] | many | wide | reload | spaces | high | switch [N] [P] [two])",
    "gates": "times int3, #GP and timer interrupts from ring 3 to a handler in ring 3 or ring 0 (args: int3|gp|timer [N] [kernel])",
}

DEFAULT_GUEST = "hello"


def builtin_path(name: str) -> Path:
    if name not in BUILTIN_GUESTS:
        known = ", ".join(sorted(BUILTIN_GUESTS))
        raise ConfigError(f"no built-in guest named {name!r} (known: {known})")
    return BIN_DIR / f"{name}.elf"
