"""The measurements: each runs the VMMs side by side, interleaved round by round (so that a change
in the machine's speed hits all of them alike), and keeps every sample."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from worldswitch.driver.kvm import Kvm
from worldswitch.guests import builtin_path

from .vmms import Vmm


@dataclass
class Figure:
    """Samples of one quantity for one VMM, with the summary a person reads."""

    vmm: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        """The interquartile range (the minimum and maximum below 4 samples)."""
        if len(self.samples) < 4:
            return min(self.samples), max(self.samples)
        q = statistics.quantiles(self.samples, n=4)
        return q[0], q[2]

    def as_dict(self) -> dict[str, object]:
        low, high = self.spread
        return {**asdict(self), "median": self.median, "p25": low, "p75": high}


def tsc_khz() -> int:
    """The guest TSC frequency KVM gives vCPUs: what converts the guests' cycles into time."""
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                return vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()


def exit_round_trip(vmms: list[Vmm], kind: str, n: int, rounds: int, khz: int, log=print) -> dict[str, Figure]:
    """Microseconds per exit of `kind` ("io" or "mmio"), from ring 3, as the guest measures it."""
    figures = {vmm.name: Figure(vmm.name, "us") for vmm in vmms}
    for round_ in range(rounds):
        order = vmms[round_ % len(vmms):] + vmms[: round_ % len(vmms)]
        for vmm in order:
            cycles = vmm.run_exits(n, kind)
            figures[vmm.name].samples.append(cycles / khz * 1000)
        log(f"  {kind} round {round_ + 1}/{rounds}: " + ", ".join(
            f"{name} {figure.samples[-1]:.1f} us" for name, figure in figures.items()))
    return figures


def start_times(vmms: list[Vmm], rounds: int, log=print) -> tuple[dict[str, Figure], dict[str, Figure]]:
    """Milliseconds from process start to the hello guest's first UART byte, and to the VM's end."""
    first = {vmm.name: Figure(vmm.name, "ms") for vmm in vmms}
    end = {vmm.name: Figure(vmm.name, "ms") for vmm in vmms}
    for round_ in range(rounds):
        for vmm in vmms:
            to_first, to_end = vmm.time_start()
            first[vmm.name].samples.append(to_first * 1000)
            end[vmm.name].samples.append(to_end * 1000)
    log("  start: " + ", ".join(f"{name} {figure.median:.0f} ms to first byte" for name, figure in first.items()))
    return first, end


@dataclass
class MemoryUse:
    vmm: str
    rss_kib: int
    guest_kib: int  # guest RAM the guest touched (resident)

    @property
    def overhead_kib(self) -> int:
        return self.rss_kib - self.guest_kib


def _mappings(pid: int) -> list[dict[str, object]]:
    mappings: list[dict[str, object]] = []
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mappings.append({"size": end - start, "path": fields[5] if len(fields) > 5 else "", "rss": 0})
            elif fields[0] == "Rss:":
                mappings[-1]["rss"] = int(fields[1])
    return mappings


def memory_use(vmm: Vmm, memory_mib: int = 128, settle_s: float = 1.5) -> MemoryUse:
    """Resident memory of the VMM process while a guest spins, split into guest RAM and the rest.

    worldswitch reports both itself (VmRSS, and mincore() over its guest RAM) in --stats-json.
    For other VMMs the guest RAM is the one anonymous mapping of the RAM's size in /proc/PID/smaps."""
    if vmm.name == "worldswitch":
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "stats.json"
            command = [*vmm.start_command(builtin_path("fault"), "spin"), "--timeout", str(settle_s),
                       "--memory", f"{memory_mib}M", "--stats-json", str(out)]
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, env=vmm.environment())
            stats = json.loads(out.read_text())["stats"]
        return MemoryUse(vmm.name, stats["vmx_resident_kib"], stats["guest_resident_kib"])
    command = vmm.start_command(builtin_path("fault"), "spin")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(settle_s)
        mappings = _mappings(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    ram = memory_mib << 20
    candidates = [m for m in mappings if not m["path"] and ram <= int(m["size"]) <= ram + (4 << 20)]  # type: ignore[arg-type]
    guest = sorted(candidates, key=lambda m: -int(m["rss"]))[:1]  # type: ignore[arg-type]
    rss = sum(int(m["rss"]) for m in mappings)  # type: ignore[arg-type]
    return MemoryUse(vmm.name, rss, sum(int(m["rss"]) for m in guest))  # type: ignore[arg-type]


def prepare_disk(path: Path, size: int = 64 << 20) -> Path:
    """A disk image filled with data (not holes), read once so both sides hit the page cache."""
    if not path.exists() or path.stat().st_size != size:
        block = bytes(range(256)) * 16
        with open(path, "wb") as image:
            for _ in range(size // len(block)):
                image.write(block)
    path.read_bytes()
    return path


def virtio_blk_reads(worldswitch: Vmm, hostread: Path, disk: Path, pattern: str, n: int, rounds: int, khz: int,
                     variants: tuple[tuple[int, str], ...] = ((1, "split"), (32, "split"), (32, "packed")),
                     log=print) -> dict[str, Figure]:
    """4 KiB reads per second from the guest's ring-3 virtio-blk driver (at each queue depth, on a
    split or a packed ring) and from the host reading the same file with pread: the physical limit."""
    def label(qd: int, layout: str) -> str:
        return f"worldswitch QD{qd}" + (" packed" if layout == "packed" else "")

    figures = {label(qd, layout): Figure(label(qd, layout), "IOPS") for qd, layout in variants}
    figures["host"] = Figure("host", "IOPS")
    for _ in range(rounds):
        for qd, layout in variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "stats.json"
                packed = ["--packed-queues"] if layout == "packed" else []
                command = [*worldswitch.command, "run", "--guest", "vblk", "--args", f"{pattern} {n} {qd} {layout}",
                           "--disk", f"{disk},ro", *packed, "--quiet", "--stats-json", str(out)]
                subprocess.run(command, check=True, capture_output=True, timeout=600, env=worldswitch.environment())
                reads, cycles = json.loads(out.read_text())["result"]["ucall_args"][:2]
            figures[label(qd, layout)].samples.append(reads / (cycles / (khz * 1000)))
        result = subprocess.run([str(hostread), str(disk), pattern, str(n * 10)], capture_output=True, text=True, check=True)
        host = json.loads(result.stdout)
        figures["host"].samples.append(host["reads"] / (host["ns"] / 1e9))
    log(f"  virtio-blk {pattern}: " + ", ".join(f"{name} {f.median:,.0f} IOPS" for name, f in figures.items()))
    return figures
