"""Pause, snapshot and restore times for a VM whose guest has used all its RAM, against what this
disk can do with the same bytes: copying the snapshot's memory file (cp + fsync, the limit for
writing a snapshot) and reading it with a cold page cache (dd, the limit for restoring)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from worldswitch.vmx.api import Machine

from .measure import Figure

FILL_FROM = 32 << 20  # the spinning guest's code, stack and page tables live below


def drop_caches(really: bool = True) -> bool:
    """Empty the page cache so that reads come from the disk; needs root (else reads are warm)."""
    if not really:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fill(vm: Machine) -> None:
    """Non-zero, incompressible-looking data in every page from FILL_FROM up: a guest that used its RAM."""
    block = os.urandom(1 << 20)
    memory = vm.vmm.memory
    for region in memory.regions:
        start = max(region.guest_phys_addr, FILL_FROM)
        end = region.guest_phys_addr + region.size
        for address in range(start, end - (1 << 20) + 1, 1 << 20):
            memory.write(address, block)


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def snapshot_times(size_mib: int, rounds: int, work: Path, cold: bool = True,
                   log=print) -> tuple[dict[str, Figure], dict[str, object]]:
    """Seconds (pause: milliseconds) for one VM size; figures keyed by what was measured. With
    `cold`, the page cache is dropped before each disk measurement (needs root)."""
    really = cold
    figures = {name: Figure(name, unit) for name, unit in (
        ("pause", "ms"), ("snapshot", "s"), ("copy", "s"), ("restore", "s"), ("cold read", "s"))}
    work.mkdir(parents=True, exist_ok=True)
    target = work / "snapshot"
    copy = work / "memory-copy.bin"
    cold = True
    stored = 0
    with Machine(guest="fault", args="spin", memory=size_mib << 20) as vm:
        vm.build()
        fill(vm)
        vm.start()
        time.sleep(0.2)
        for _ in range(max(rounds, 5)):
            started = time.perf_counter()
            vm.pause()
            figures["pause"].samples.append((time.perf_counter() - started) * 1000)
            vm.resume()
        for _ in range(rounds):
            shutil.rmtree(target, ignore_errors=True)
            cold = drop_caches(really) and cold
            info = vm.snapshot(target)
            figures["snapshot"].samples.append(info.seconds)
            stored = info.stored_bytes
            copy.unlink(missing_ok=True)
            cold = drop_caches(really) and cold
            figures["copy"].samples.append(_timed(["sh", "-c", f"cp --sparse=always '{target / 'memory.bin'}' '{copy}' && sync '{copy}'"]))
            copy.unlink()
        vm.stop()
    for _ in range(rounds):
        cold = drop_caches(really) and cold
        started = time.perf_counter()
        with Machine.restore(target) as restored:
            restored.build()
            figures["restore"].samples.append(time.perf_counter() - started)
        cold = drop_caches(really) and cold
        figures["cold read"].samples.append(_timed(["dd", f"if={target / 'memory.bin'}", "of=/dev/null", "bs=4M"]))
    shutil.rmtree(target, ignore_errors=True)
    details = {"memory_mib": size_mib, "stored_mib": stored >> 20, "cold_cache": cold}
    log(f"  {size_mib} MiB: " + ", ".join(f"{name} {f.median:.3f} {f.unit}" for name, f in figures.items())
        + f"; {stored >> 20} MiB stored" + ("" if cold else " (page cache could not be dropped: warm)"))
    return figures, details
