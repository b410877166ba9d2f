"""Test doubles shared by the unit tests."""

from __future__ import annotations

import ctypes
import struct


class RecordingLine:
    """An interrupt line that remembers its level and every change."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set_level(self, asserted: bool) -> None:
        if asserted != self.level:
            self.changes.append(asserted)
        self.level = asserted


import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from worldswitch.boot import bootparams as bp
from worldswitch.boot.bzimage import parse_bzimage
from worldswitch.driver.constants import ExitReason
from worldswitch.driver.kvm import Vcpu
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.builder import build_for_boot
from worldswitch.vmm.config import MachineConfig
from worldswitch.vmm.machine import Vmm
from worldswitch.vmm.result import MachineResult
from worldswitch.vmm.stats import MachineStats
from worldswitch.vmm.x86.cpu_state import restore_running_vcpu, save_vcpu, saveable_msrs
from worldswitch.vmx.api import Machine
from worldswitch.vmx.debian import DebianLinux, fetch_debian, release_cache


@dataclass
class Run:
    result: MachineResult
    output: bytes
    stats: MachineStats
    machine: Vmm
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


class Output:
    """A thread-safe serial sink that tests can wait on."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self.changed:
            self.data += chunk
            self.changed.notify_all()

    def wait_for(self, needle: bytes, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: needle in self.data, timeout)


def start_guest(guest: str = "hello", args: str = "", **config: object) -> tuple[Vmm, Output, list[str]]:
    output, warnings = Output(), []
    machine = build_for_boot(MachineConfig(guest=guest, args=args, **config), output, warn=warnings.append)  # type: ignore[arg-type]
    machine.start()
    return machine, output, warnings


def run_guest(guest: str = "hello", args: str = "", timeout: float = 30.0, **config: object) -> Run:
    machine, output, warnings = start_guest(guest, args, **config)
    with machine:
        result = machine.wait(timeout)
        if result is None:
            machine.stop()
            raise AssertionError(f"guest {guest} {args!r} did not finish within {timeout} s; output: {bytes(output.data)!r}")
        stats = machine.stats()
    return Run(result, bytes(output.data), stats, machine, warnings)


EHDR = "<16sHHIQQQIHHHHHH"
PHDR = "<IIQQQQQQ"


def make_elf(segments: list[tuple[int, bytes, int]], entry: int | None = None, *, e_type: int = 2, machine: int = 62,
             cls: int = 2, extra_phdrs: list[tuple] | None = None) -> bytes:
    """segments: (paddr, file bytes, memsz)."""
    phdrs = []
    data = b""
    offset = 64 + 56 * (len(segments) + len(extra_phdrs or []))
    for paddr, payload, memsz in segments:
        phdrs.append(struct.pack(PHDR, 1, 7, offset + len(data), paddr, paddr, len(payload), memsz, 0x1000))
        data += payload
    for ph in extra_phdrs or []:
        phdrs.append(struct.pack(PHDR, *ph))
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9)
    entry = (segments[0][0] if segments else 0) if entry is None else entry
    header = struct.pack(EHDR, ident, e_type, machine, 1, entry, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    return header + b"".join(phdrs) + data


@contextlib.contextmanager
def _paused(vm: Machine) -> Iterator[None]:
    vm.pause()
    try:
        yield
    finally:
        vm.resume()


def round_trip_vcpu_state(vm: Machine, until: Callable[[], bool], *, quiesce: bool, deadline_s: float = 120.0) -> int:
    """Save the first vCPU's state and put it back with a snapshot's own ioctls, at random instants
    0.5 to 3 ms apart, until `until()` holds, the machine ends or `deadline_s` passes: inside the
    snapshot's quiesce (`quiesce`, with the VMM's look for an int3 in flight), or only paused. The
    number of round trips."""
    vcpu = vm.vmm.runners[0].vcpu
    with _paused(vm):  # a vCPU's ioctls wait while it runs: an idle guest may not exit for long
        msrs = saveable_msrs(vm.vmm.kvm, vcpu)
    chooser, rounds = random.Random(13), 0
    deadline = time.monotonic() + deadline_s
    while not until() and vm.alive and time.monotonic() < deadline:
        time.sleep(chooser.uniform(0.0005, 0.003))
        with vm.vmm.quiesced() if quiesce else _paused(vm):
            restore_running_vcpu(vcpu, save_vcpu(vcpu, msrs))
        rounds += 1
    return rounds


LOADER_ZERO_PAGE, LOADER_CMDLINE = 0x90000, 0x98000


def loaded_by_a_boot_loader(memory: GuestMemory, image: bytes, entry: int, cmdline: bytes = b"console=ttyS0",
                            **fields: int) -> None:
    """What GRUB leaves in guest memory as it enters a bzImage at its 32-bit entry (seen here): the protected-mode
    kernel at `entry` (its code32_start), a zero page with the kernel's setup header and what the
    loader filled in (`fields` override either), the command line."""
    kernel = parse_bzimage(image)
    raw = bytearray(ctypes.sizeof(bp.boot_params))
    raw[bp.SETUP_HEADER_OFFSET: bp.SETUP_HEADER_OFFSET + len(kernel.header_bytes)] = kernel.header_bytes
    params = bp.boot_params.from_buffer(raw)
    params.hdr.code32_start, params.hdr.cmd_line_ptr, params.hdr.type_of_loader = entry, LOADER_CMDLINE, 0x72
    params.hdr.boot_flag = 0  # GRUB 2.06 leaves the boot sector's signature out
    for name, value in fields.items():
        setattr(params.hdr if hasattr(params.hdr, name) else params, name, value)
    memory.write(LOADER_ZERO_PAGE, bytes(raw))
    memory.write(LOADER_CMDLINE, cmdline + b"\0")
    memory.write(entry, kernel.kernel)


CACHE = Path(__file__).resolve().parent.parent / ".cache"
DEBIAN_13 = "trixie"  # Linux 6.12: kallsyms in 6.4's order, pv_ops sites as 6.8's alternatives
# Linux 7.2 in 2026-12 (Debian's testing: it follows what Debian ships next, so a kernel that changes
# what the VMM reads shows here first): kallsyms place-relative, pv_ops.cpu.write_msr(msr, u64)
DEBIAN_14 = "forky"


def debian(release: str | None = None) -> DebianLinux:
    """Debian's cloud kernel and busybox, fetched once into .cache: from the host's apt sources
    (Debian 12's on this host), or from `release` on deb.debian.org. Skips where apt-get is missing."""
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available: not a Debian-based host")
    return fetch_debian(release_cache(CACHE / "debian", release), release=release)


NO_XXL_FRAGMENT = Path(__file__).resolve().parent / "kernels" / "no-xxl.config"
LINUX_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")  # Debian 12's linux-source-6.1, which .ci/run installs
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "bc": "bc", "bison": "bison", "flex": "flex", "pahole": "dwarves"}


def linux_without_xxl() -> Path:
    """A Linux built without CONFIG_PARAVIRT_XXL (tests/kernels/README.md): Debian 12's 6.1 source,
    `make tinyconfig` and tests/kernels/no-xxl.config, built once into .cache/kernels (about five
    minutes on this host's two cores). Skips where the source or a build tool is missing."""
    missing = [package for tool, package in BUILD_TOOLS.items() if shutil.which(tool) is None]
    missing += [package for path, package in ((LINUX_SOURCE, "linux-source-6.1"), (Path("/usr/include/libelf.h"), "libelf-dev"))
                if not path.exists()]
    if missing:
        pytest.skip(f"building a kernel without PARAVIRT_XXL needs {', '.join(missing)} (.ci/run installs them)")
    fragment = NO_XXL_FRAGMENT.read_bytes()
    source = LINUX_SOURCE.stat()
    key = hashlib.sha256(fragment + f"{source.st_size} {source.st_mtime_ns}".encode()).hexdigest()[:16]
    built = CACHE / "kernels" / f"no-xxl-{key}.bzImage"
    if built.exists():
        return built
    work = CACHE / "kernels" / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "build.log"
    tree = work / "linux-source-6.1"
    steps = [["tar", "xJf", str(LINUX_SOURCE), "-C", str(work)],
             ["make", "-C", str(tree), "tinyconfig"],
             [str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(tree), str(tree / ".config"),
              str(NO_XXL_FRAGMENT)],
             ["make", "-C", str(tree), "olddefconfig"],
             ["make", "-C", str(tree), f"-j{os.cpu_count() or 1}", "bzImage"]]
    with log.open("wb") as output:
        for step in steps:
            if subprocess.run(step, stdout=output, stderr=subprocess.STDOUT, cwd=tree if tree.exists() else work).returncode:
                raise AssertionError(f"building the kernel without PARAVIRT_XXL failed at {' '.join(step[:3])}: "
                                     f"{log.read_bytes()[-2000:].decode(errors='replace')}")
    config = (tree / ".config").read_text()
    assert "CONFIG_PARAVIRT=y" in config and "CONFIG_PARAVIRT_XXL" not in config, "the fragment no longer applies"
    partial = built.with_suffix(".partial")
    shutil.copyfile(tree / "arch/x86/boot/bzImage", partial)
    partial.rename(built)
    shutil.rmtree(work)
    return built


def finish_exit(vcpu: Vcpu) -> None:
    """Complete the instruction of the last I/O or MMIO exit without entering the guest: KVM completes
    it on the next KVM_RUN (api.rst, "KVM_RUN"), which immediate_exit turns into a return with EINTR.
    On AMD-V, RIP moves past an OUT only then; registers read before it differ from host to host."""
    vcpu.kvm_run.immediate_exit = 1
    try:
        assert vcpu.run() == ExitReason.INTR
    finally:
        vcpu.kvm_run.immediate_exit = 0
