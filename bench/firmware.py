"""Booting through SeaBIOS, worldswitch beside QEMU, side by side.

    python -m bench.firmware [--rounds N] [--update-readme]

Both run Debian's SeaBIOS (the same bios-256k.bin) with the same raw disk on virtio-blk-pci: QEMU as
`-M pc -accel kvm`, worldswitch as `run --disk` (firmware is its default for a disk alone). The disk's
boot sector prints a line through the BIOS (int 10h, which SeaBIOS sends to COM1). Measured from
process start: the firmware's banner on the serial console, and the boot sector's line; then, where
GRUB's tools are installed, the same for the hybrid ISO `fetch-debian --iso` makes, to GRUB's menu.
Rounds are interleaved; the table gives medians and the worldswitch / QEMU ratio (lower is better).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from worldswitch.boot.bios import SEABIOS
from worldswitch.guests.bootsector import MESSAGE, boot_sector
from worldswitch.vmm.host import detect_host_kind

from .report import seconds_row, update_readme
from .vmms import QEMU, qemu_version

ROOT = Path(__file__).resolve().parent.parent
BANNER = b"SeaBIOS (version"
GRUB_MENU = b"GNU GRUB"


def boot_sector_image(path: Path) -> Path:
    path.write_bytes(boot_sector(MESSAGE) + bytes((8 << 20) - 512))
    return path


def grub_iso(path: Path) -> Path | None:
    """The hybrid ISO fetch-debian --iso makes, or None where GRUB's tools or apt-get are missing."""
    if any(shutil.which(tool) is None for tool in ("grub-mkrescue", "xorriso", "apt-get")):
        return None
    from worldswitch.boot.initramfs import InitramfsSpec, build_initramfs
    from worldswitch.vmx.debian import fetch_debian
    from worldswitch.vmx.debian_image import build_iso

    linux = fetch_debian(ROOT / ".cache" / "debian")
    build_iso(path, linux.kernel, build_initramfs(InitramfsSpec(linux.busybox, shell=True)))
    return path


def commands(disk: Path) -> dict[str, list[str]]:
    return {
        "worldswitch": [sys.executable, "-m", "worldswitch", "run", "--disk", f"{disk},format=raw", "--quiet",
                        "--timeout", "300"],
        "qemu": [QEMU, "-accel", "kvm", "-M", "pc", "-m", "512", "-nodefaults", "-no-user-config", "-display", "none",
                 "-machine", "graphics=off", "-serial", "stdio", "-bios", SEABIOS, "-no-reboot",
                 "-drive", f"file={disk},if=none,id=disk,format=raw,readonly=on", "-device", "virtio-blk-pci,drive=disk"],
    }


def time_boot(command: list[str], timeout: float, last: bytes = MESSAGE) -> tuple[float, float]:
    """(seconds to the banner, seconds to `last`: the boot sector's line, or GRUB's menu)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    seen, banner, message = b"", 0.0, 0.0
    try:
        while not message and (chunk := process.stdout.read1(4096)):
            seen += chunk
            now = time.perf_counter() - started
            if not banner and BANNER in seen:
                banner = now
            if last in seen:
                message = now
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    if not (banner and message):
        raise RuntimeError(f"{command[0]}: no boot within {timeout:.0f} s; the console showed {seen[-300:]!r}")
    return banner, message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.firmware", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--update-readme", action="store_true")
    options = parser.parse_args(argv)
    for need in (QEMU, SEABIOS):
        if shutil.which(need) is None and not Path(need).exists():
            print(f"bench.firmware: {need} is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as work:
        disk = boot_sector_image(Path(work) / "boot.img")
        iso = grub_iso(Path(work) / "debian.iso")
        runs: dict[str, list[tuple[float, float]]] = {"worldswitch": [], "qemu": []}
        grub: dict[str, list[tuple[float, float]]] = {"worldswitch": [], "qemu": []}
        for number in range(options.rounds):
            for name in (["worldswitch", "qemu"] if number % 2 == 0 else ["qemu", "worldswitch"]):
                runs[name].append(time_boot(commands(disk)[name], options.timeout))
                if iso is not None:
                    grub[name].append(time_boot(commands(iso)[name], options.timeout, GRUB_MENU))
            print(f"round {number + 1}: " + ", ".join(f"{name} {runs[name][-1][0]:.2f}/{runs[name][-1][1]:.2f} s"
                                                      + (f", GRUB {grub[name][-1][1]:.1f} s" if grub[name] else "")
                                                      for name in runs), flush=True)
    host = detect_host_kind()
    lines = [f"Measured {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} on "
             f"{host.description.split(';')[0]}; {qemu_version()}; median of {options.rounds} interleaved rounds "
             "(min-max); seconds from process start (lower is better).", "",
             "| figure | worldswitch | QEMU (`-M pc`) | worldswitch / QEMU |", "| --- | --- | --- | --- |"]
    rows = [(runs, 0, "SeaBIOS banner on COM1"), (runs, 1, "the disk's boot sector runs (virtio-blk)")]
    if grub["qemu"]:
        rows.append((grub, 1, "GRUB's menu, from the hybrid ISO on virtio-blk"))
    for table, index, title in rows:
        lines.append(seconds_row(title, [run[index] for run in table["worldswitch"]], [run[index] for run in table["qemu"]]))
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "firmware.json").write_text(json.dumps({"rounds": runs, "grub": grub, "table": text}, indent=2) + "\n")
    if options.update_readme:
        update_readme(ROOT / "bench" / "README.md", text, "firmware")
    return 0


if __name__ == "__main__":
    sys.exit(main())
