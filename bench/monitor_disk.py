"""A Debian disk image booted to its shell through SeaBIOS and GRUB: worldswitch under the monitor beside
QEMU's TCG, side by side, on a host that emulates guest kernel code (PVM; issue 13, docs/monitor.md).

    python -m bench.monitor_disk [--rounds N] [--iso] [--update-readme]

The image is the one `worldswitch fetch-debian --disk` makes (GRUB 2.06 for BIOS, Debian's cloud kernel,
a busybox initramfs whose /init prints a marker and starts a shell), 128 MiB. worldswitch runs it as a
user types it (`run --disk IMAGE --monitor --serial stdio`); QEMU as `-M pc -accel tcg` (its software
CPU: the other way to run guest kernel code fast on a host without VT-x), with its SeaBIOS and the
same image on virtio-blk, read-only to both. Each milestone is timed from process start, as its line
reaches the serial console: GRUB's `Booting`, `Linux version`, the marker, the shell's prompt, and
the process's end once `poweroff -f` has been typed there. `--iso` adds the hybrid ISO on the same
virtio-blk. Rounds are interleaved; the table gives medians and the worldswitch / QEMU ratio (lower is
better).
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
from worldswitch.boot.initramfs import DEFAULT_MARKER, InitramfsSpec, build_initramfs, resolve_modules
from worldswitch.vmm.host import detect_host_kind
from worldswitch.vmx.debian import fetch_debian
from worldswitch.vmx.debian_image import build_disk, build_iso

from .report import seconds_row, update_readme
from .vmms import QEMU, command, qemu_version

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "debian"
PROMPT = b"# "
MARKER = DEFAULT_MARKER.encode()
# (name, the console line that marks it); the shell's prompt counts only after the marker
MILESTONES = (("GRUB's `Booting`", b"Booting `Debian GNU/Linux"), ("`Linux version`", b"Linux version"),
              ("init's marker", MARKER), ("the shell's prompt", PROMPT))
POWER_OFF = "power-off (the process ends)"
TOOLS = ("grub-mkimage", "grub-mkrescue", "xorriso", "mke2fs", "apt-get")


def images(work: Path, iso: bool) -> dict[str, Path]:
    linux = fetch_debian(CACHE)
    initrd = build_initramfs(InitramfsSpec(linux.busybox, resolve_modules(["virtio_pci", "virtio_blk"], linux.modules),
                                           shell=True))
    made = {"disk": work / "debian.img"}
    build_disk(made["disk"], linux.kernel, initrd, size=128 << 20)
    if iso:
        made["iso"] = work / "debian.iso"
        build_iso(made["iso"], linux.kernel, initrd)
    return made


def commands(image: Path) -> dict[str, list[str]]:
    return {
        "worldswitch": [*command(), "run", "--disk", f"{image},ro,format=raw", "--monitor", "--serial", "stdio",
                        "--quiet"],
        "qemu": [QEMU, "-accel", "tcg", "-M", "pc", "-m", "128", "-nodefaults", "-no-user-config", "-display", "none",
                 "-serial", "stdio", "-bios", SEABIOS, "-drive", f"file={image},if=none,id=disk,format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=disk"],
    }


def reached(console: bytes, line: bytes) -> bool:
    """Whether the console shows `line`; the prompt, only after the marker (the marker's shell, not a
    `# ` in one of the kernel's lines)."""
    if line != PROMPT:
        return line in console
    marker = console.find(MARKER)
    return marker >= 0 and PROMPT in console[marker:]


def time_boot(argv: list[str], timeout: float) -> dict[str, float]:
    """Seconds from process start to each milestone and to the process's end."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdin is not None and process.stdout is not None
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    seen: dict[str, float] = {}
    console = b""
    try:
        while chunk := process.stdout.read1(4096):
            console += chunk
            now = time.perf_counter() - started
            for name, line in MILESTONES:
                if name not in seen and reached(console, line):
                    seen[name] = now
                    if line == PROMPT:
                        process.stdin.write(b"poweroff -f\n")
                        process.stdin.flush()
        process.wait()
        seen[POWER_OFF] = time.perf_counter() - started
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    missing = [name for name, _ in MILESTONES if name not in seen]
    if missing or process.returncode != 0:
        raise RuntimeError(f"{argv[0]}: {missing[0] if missing else 'its exit'} not as expected within {timeout:.0f} s "
                           f"(status {process.returncode}); the console showed {console[-300:]!r}")
    return seen


def table(runs: dict[str, dict[str, list[dict[str, float]]]], rounds: int) -> str:
    host = detect_host_kind()
    lines = [f"Measured {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} on "
             f"{host.description.split(';')[0]}; {qemu_version()}; median of {rounds} interleaved rounds "
             "(min-max); seconds from process start (lower is better).", "",
             "| image, milestone | worldswitch `--monitor` | QEMU `-accel tcg` | worldswitch / QEMU |",
             "| --- | --- | --- | --- |"]
    for image, by_vmm in runs.items():
        for name in [*(name for name, _ in MILESTONES), POWER_OFF]:
            lines.append(seconds_row(f"{image}: {name}", [run[name] for run in by_vmm["worldswitch"]],
                                     [run[name] for run in by_vmm["qemu"]], digits=1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor_disk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--iso", action="store_true", help="the hybrid ISO too")
    parser.add_argument("--update-readme", action="store_true")
    options = parser.parse_args(argv)
    missing = [tool for tool in (QEMU, *TOOLS) if shutil.which(tool) is None]
    if missing or not Path(SEABIOS).exists():
        print(f"bench.monitor_disk: needs {', '.join(missing) or SEABIOS}", file=sys.stderr)
        return 2
    if not detect_host_kind().kernel_code_emulated:
        print("bench.monitor_disk: the monitor is for hosts that emulate guest kernel code (PVM)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as work:
        made = images(Path(work), options.iso)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {image: {"worldswitch": [], "qemu": []} for image in made}
        for number in range(options.rounds):
            for image, path in made.items():
                for vmm in (["worldswitch", "qemu"] if number % 2 == 0 else ["qemu", "worldswitch"]):
                    runs[image][vmm].append(time_boot(commands(path)[vmm], options.timeout))
                print(f"round {number + 1}, {image}: " + ", ".join(
                    f"{vmm} {runs[image][vmm][-1][POWER_OFF]:.1f} s" for vmm in ("worldswitch", "qemu")), flush=True)
    text = table(runs, options.rounds)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor_disk.json").write_text(json.dumps({"rounds": runs, "table": text}, indent=2) + "\n")
    if options.update_readme:
        update_readme(ROOT / "bench" / "README.md", text, "monitor-disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
