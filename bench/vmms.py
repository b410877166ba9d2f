"""The virtual machine monitors compared, each able to run worldswitch's built-in guest binaries:

    worldswitch  the `worldswitch` command (a separate process, as a user runs it)
    floor        bench/floor.c, the smallest C VMM that runs the guests: the physical floor
    qemu         qemu-system-x86_64 -accel kvm -M microvm, booting the guest's PVH entry point

Every exit benchmark reads the guest's own measurement (rdtsc around its loop, printed on COM1 by
the `exits` guest in report mode), so the three are timed by the same clock, in the same code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from worldswitch.guests import builtin_path

BENCH_DIR = Path(__file__).resolve().parent
REPORT = re.compile(rb"exits: n=(\d+) io_cycles=(\d+) mmio_cycles=(\d+)")
QEMU = "qemu-system-x86_64"


class VmmError(RuntimeError):
    pass


@dataclass(frozen=True)
class Vmm:
    name: str
    command: list[str]  # everything before the guest and its arguments

    def exits_command(self, guest: Path, args: str) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    def run_exits(self, n: int, kind: str, timeout: float = 300) -> float:
        """Cycles per exit, as the guest measured them."""
        command = self.exits_command(builtin_path("exits"), f"{n} {kind} report")
        result = subprocess.run(command, capture_output=True, timeout=timeout, env=self.environment())
        match = REPORT.search(result.stdout)
        if not match:
            raise VmmError(f"{self.name}: no report from the exits guest (status {result.returncode}): "
                           f"{result.stderr.decode(errors='replace')[-500:]}")
        io_cycles, mmio_cycles = int(match.group(2)), int(match.group(3))
        return (io_cycles if kind == "io" else mmio_cycles) / n

    def start_command(self, guest: Path, args: str) -> list[str]:
        return self.exits_command(guest, args)

    def time_start(self, timeout: float = 120) -> tuple[float, float]:
        """(seconds from process start to the guest's first UART byte, seconds to the VM's end),
        running the hello guest."""
        command = self.start_command(builtin_path("hello"), "")
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.environment())
        assert process.stdout is not None
        first = process.stdout.read(1)
        first_byte = time.perf_counter() - started
        process.stdout.read()
        process.wait(timeout)
        ended = time.perf_counter() - started
        if not first:
            raise VmmError(f"{self.name}: the hello guest printed nothing")
        return first_byte, ended


@dataclass(frozen=True)
class Worldswitch(Vmm):
    """Run as a user runs it after `pip install`: with Python's bytecode cache, even where the
    environment disables it (PYTHONDONTWRITEBYTECODE), or start-up would include compiling.
    `options` go to `run` (`--no-sandbox` measures what the sandbox costs)."""
    options: tuple[str, ...] = ()

    def exits_command(self, guest: Path, args: str) -> list[str]:
        return [*self.command, "run", "--elf", str(guest), "--args", args, "--quiet", "--serial", "stdio", *self.options]

    def environment(self) -> dict[str, str] | None:
        return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class Floor(Vmm):
    def exits_command(self, guest: Path, args: str) -> list[str]:
        return [*self.command, str(guest), args]


class Qemu(Vmm):
    def exits_command(self, guest: Path, args: str) -> list[str]:
        return [*self.command, "-kernel", str(guest), "-append", args]


def build_hostread(work: Path) -> Path:
    binary = work / "hostread"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(BENCH_DIR / "hostread.c")], check=True)
    return binary


UNSANDBOXED = "worldswitch --no-sandbox"


def command() -> list[str]:
    """The `worldswitch` command pip installed beside this interpreter, which is what a user types
    (`python -m` would add runpy's start-up to every figure), or `python -m worldswitch` where there is
    none (a checkout run without installing)."""
    script = Path(sys.executable).parent / "worldswitch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "worldswitch"]


def worldswitch(sandbox: bool = True) -> Worldswitch:
    """As a user runs it: sandboxed (the default), or not."""
    if sandbox:
        return Worldswitch("worldswitch", command())
    return Worldswitch(UNSANDBOXED, command(), ("--no-sandbox",))


def build_floor(work: Path | None = None) -> Floor:
    """Compile bench/floor.c on the fly (gcc -O2)."""
    if shutil.which("gcc") is None:
        raise VmmError("gcc is needed to build the C floor")
    out_dir = work or Path(tempfile.mkdtemp(prefix="ws-floor-"))
    binary = out_dir / "floor"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(BENCH_DIR / "floor.c")], check=True)
    return Floor("floor", [str(binary)])


def qemu(memory_mib: int = 128) -> Qemu | None:
    """QEMU's microvm machine (firmware: qboot), with a 16550 on COM1 and isa-debug-exit at 0xf4
    like worldswitch's board. None if QEMU is not installed."""
    if shutil.which(QEMU) is None:
        return None
    return Qemu("qemu", [
        QEMU, "-M", "microvm", "-accel", "kvm", "-m", str(memory_mib), "-display", "none", "-nodefaults",
        "-no-user-config", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
    ])


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.splitlines()[0] if out else ""
