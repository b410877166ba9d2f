"""When the host fails, it is not a bug in worldswitch: before the VM starts, one line and status 2;
while it runs, one warning and the guest's own exit status; never status 70."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from worldswitch.vmx.api import Machine

from .test_cli import COMMAND, assert_one_line_error, worldswitch

pytestmark = pytest.mark.kvm
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs, which needs root")


def test_memory_the_host_cannot_map_is_one_line() -> None:
    def small_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # the host has 8 GiB of address space to give

    result = subprocess.run([*COMMAND, "run", "--memory", "16G"], capture_output=True, text=True, timeout=60,
                            preexec_fn=small_address_space)
    assert_one_line_error(result, 2, "this host cannot map")
    assert result.stderr.rstrip().endswith("MiB of guest memory: Cannot allocate memory")


@pytest.mark.parametrize("args, text", [
    (["--cpus", "256"], "at most 255 vCPUs: the MADT gives each an 8-bit APIC ID"),
    (["--disk", "/dev/null"], "disk image /dev/null is not a file or a block device"),
    (["--timeout", "nan"], "--timeout: expected a positive, finite number of seconds"),
    (["--timeout", "inf"], "--timeout: expected a positive, finite number of seconds"),
    (["--trace", "/dev/full"], "cannot write the trace file /dev/full: No space left on device"),
])
def test_what_the_host_cannot_give_is_refused_before_start(args: list[str], text: str) -> None:
    assert_one_line_error(worldswitch("run", *args), 2, text)


def test_a_fifo_disk_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "disk.img"
    os.mkfifo(fifo)
    assert_one_line_error(worldswitch("run", "--disk", str(fifo), timeout=30), 2, "is not a file or a block device")


def test_arguments_that_are_not_utf8_are_one_line() -> None:
    result = subprocess.run([os.fsencode(sys.executable), b"-m", b"worldswitch", b"run", b"--args", b"\xff\xfe"],
                            capture_output=True, timeout=60)
    assert result.returncode == 2 and result.stderr.decode().strip() == "worldswitch: error: --args must be UTF-8 text"


@pytest.mark.parametrize("length", [592, 600, 619])
def test_a_kernel_cut_inside_its_boot_header_is_one_line(tmp_path: Path, length: int) -> None:
    kernel = bytearray(length)
    kernel[0x202:0x206] = b"HdrS"
    (tmp_path / "vmlinuz").write_bytes(bytes(kernel))
    assert_one_line_error(worldswitch("run", "--kernel", str(tmp_path / "vmlinuz")), 2,
                          f"is cut short: {length} bytes end inside its boot header")


def test_full_output_files_while_running_warn_and_keep_the_guests_status(tmp_path: Path) -> None:
    result = worldswitch("run", "--args", "7", "--serial", "file:/dev/full", "--stats-json", "/dev/full")
    assert result.returncode == 7, result.stderr  # the guest's own exit status
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "warning: the serial output file /dev/full failed (No space left on device)" in result.stderr
    assert "warning: cannot write the statistics to /dev/full: No space left on device" in result.stderr


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@as_root
def test_a_trace_that_fills_its_disk_stops_and_the_guest_runs_on(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=64k") as small:
        result = worldswitch("run", "--guest", "exits", "--args", "20000", "--trace", str(small / "trace.bin"), timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"the trace file {small / 'trace.bin'} failed (No space left on device); tracing stopped" in result.stderr
        assert "internal error" not in result.stderr


@as_root
def test_a_read_only_file_system_is_one_line(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        for args in (["--serial", f"file:{read_only / 'out.txt'}"], ["--trace", str(read_only / "t.bin")]):
            assert_one_line_error(worldswitch("run", *args), 2, "Read-only file system")


@as_root
def test_a_snapshot_the_disk_cannot_hold_fails_with_the_reason(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=8k") as small, Machine(guest="fault", args="spin", control=True) as vm:
        vm.start()
        from .test_control import Client

        assert vm.control is not None
        answer = Client(vm.control.path).ask("snapshot", path=str(small / "snap"))
        assert answer["ok"] is False and answer["error"]["code"] == "failed", answer
        assert "No space left on device" in answer["error"]["message"]
        assert json.loads(json.dumps(answer))  # and the VM goes on
        assert vm.status()["state"] == "running"
        assert not any(small.iterdir())  # nothing half-written is left


def test_a_build_that_fails_late_leaves_nothing_open(tmp_path: Path) -> None:
    """The program is refused after the VM, its vCPUs, a disk, the trace file and the PCI platform
    exist: every one of them is closed again (vmm/builder.py unwinds one ExitStack)."""
    from worldswitch.errors import WorldswitchError
    from worldswitch.vmm.builder import build_for_boot
    from worldswitch.vmm.config import DiskConfig, MachineConfig
    from worldswitch.vmm.trace import TraceRequest

    program = tmp_path / "not-a-program.elf"
    program.write_bytes(b"\x7fELF" + bytes(60))  # the magic, then nothing an ELF loader can use
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(elf=str(program), cpus=2, disk=[DiskConfig(str(disk))])
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(WorldswitchError):
            build_for_boot(config, lambda _b: None, trace=TraceRequest(str(tmp_path / "run.trace")))
    assert sorted(os.listdir("/proc/self/fd")) == before
