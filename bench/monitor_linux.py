"""Debian's cloud kernel with and without the in-guest monitor (`--monitor`, issue 13 stage 2,
docs/monitor.md), on a host that emulates guest kernel code (PVM).

    python -m bench.monitor_linux [--rounds N] [--without-until LINE] [--release NAME]

Each run boots the kernel with an initramfs whose /init prints a marker and powers off, and the
VMX's clock is read as each milestone line reaches the serial port. Under the monitor the runs go to
power-off, with the kernel's page-table isolation (its default), with `pti=off`, and booted by the
BIOS (`--firmware bios`: SeaBIOS and the kernel's setup code emulated, the kernel taken over at its
entry, vmm/x86/handoff.py); without the
monitor the kernel's ring 0 is emulated (about 23 minutes to init here), so that run stops at the
milestone `--without-until` names (default: the delay-loop calibration, about 70 s in), and the
table compares the milestones both reached, as ratios. Medians of N runs under the monitor.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from worldswitch.boot.initramfs import InitramfsSpec, build_initramfs
from worldswitch.vmm.builder import build_for_boot
from worldswitch.vmm.config import MachineConfig
from worldswitch.vmm.result import StopReason
from worldswitch.vmx.debian import RELEASES, fetch_debian, release_cache

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "debian"
MARKER = "WORLDSWITCH-INIT-MARKER"
MILESTONES = {"version": b"Linux version", "calibrated": b"Calibrating delay loop", "init": b"Run /init as init process",
              "marker": MARKER.encode(), "power-off": None}


def boot(kernel: Path, initrd: Path, monitor: bool, append: str, until: str | None,
         firmware: str | None = None) -> dict[str, float]:
    """Seconds from the start to each milestone reached; `until` stops the run at that milestone."""
    seen: dict[str, float] = {}
    data = bytearray()
    lock = threading.Lock()
    reached = threading.Event()
    started = time.monotonic()

    def sink(chunk: bytes) -> None:
        with lock:
            data.extend(chunk)
            for name, needle in MILESTONES.items():
                if needle is not None and name not in seen and needle in data:
                    seen[name] = time.monotonic() - started
                    if name == until:
                        reached.set()

    config = MachineConfig(kernel=str(kernel), initrd=str(initrd), monitor=monitor, append=append, firmware=firmware)
    machine = build_for_boot(config, sink)
    with machine:
        started = time.monotonic()
        machine.start()
        if until is None:
            result = machine.wait(600)
            if result is not None and result.reason is StopReason.POWER_OFF:
                seen["power-off"] = time.monotonic() - started
        else:
            reached.wait(1800)
        machine.stop()
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor_linux", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="boots under the monitor per variant (default 3)")
    parser.add_argument("--without-until", default="calibrated", choices=[m for m in MILESTONES if m != "power-off"],
                        help="where the run without the monitor stops (default %(default)s)")
    parser.add_argument("--release", choices=RELEASES,
                        help="Debian's kernel of that release, from deb.debian.org (default: the host's apt sources)")
    options = parser.parse_args(argv)
    if shutil.which("apt-get") is None:
        print("bench.monitor_linux: needs apt-get (Debian's kernel and busybox)", file=sys.stderr)
        return 2
    debian = fetch_debian(release_cache(CACHE, options.release), release=options.release)
    with tempfile.TemporaryDirectory() as scratch:
        initrd = Path(scratch) / "initrd.img"
        initrd.write_bytes(build_initramfs(InitramfsSpec(debian.busybox, [], MARKER, False), compress=False))
        kernel = Path(debian.kernel)
        console = "console=ttyS0 earlyprintk=serial"  # each line when the kernel prints it, not when its console starts
        variants = {"monitor": (console, None), "monitor pti=off": (f"{console} pti=off", None),
                    "monitor, BIOS": (console, "bios")}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(options.rounds):
            for name, (append, firmware) in variants.items():
                runs[name].append(boot(kernel, initrd, True, append, None, firmware))
        without = boot(kernel, initrd, False, console, options.without_until)
    def seconds(value: float) -> str:
        return f"{value:.2f} s" if value < 1 else f"{value:.1f} s"

    print(f"| milestone | without the monitor | {' | '.join(variants)} | without / monitor |")
    print("| --- | --- |" + " --- |" * len(variants) + " --- |")
    for milestone in MILESTONES:
        cells = []
        medians = {}
        for name in variants:
            times = [run[milestone] for run in runs[name] if milestone in run]
            medians[name] = statistics.median(times) if len(times) == len(runs[name]) else None
            cells.append(seconds(medians[name]) if medians[name] is not None else "not reached")
        plain = without.get(milestone)
        ratio = f"{plain / medians['monitor']:.0f}x" if plain is not None and medians["monitor"] else ""
        print(f"| {milestone} | {seconds(plain) if plain is not None else 'not run'} | {' | '.join(cells)} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
