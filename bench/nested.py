"""Linux on a host where guest kernel code runs natively, worldswitch beside QEMU, side by side.

    tests/hosts/amdv python -m bench.nested [--rounds N] [--update-readme]

Meant for the nested AMD-V host (tests/hosts/amdv), where absolute times mean nothing (the whole host
is QEMU's software CPU) but ratios between two VMMs on the same KVM do. Each round boots Debian's
kernel with the same busybox initramfs under worldswitch (with its network offloads and without:
VMMS) and under QEMU (`-accel kvm -M microvm` with
PCIe, qboot firmware, the same virtio-blk-pci and virtio-net-pci devices on a raw image and a tap),
interleaved. The initramfs's /init measures inside the guest and prints lines the host collects:

- boot: process start to the init marker on the serial console (host clock);
- virtio-blk: 1 MiB direct reads and writes of the whole disk with Linux's virtio_blk (guest clock);
- virtio-net: a TCP stream from the guest to a socket on the host, and one from the host to the guest,
  through Linux's virtio_net and a tap (host clock: first connection to the last byte or the guest's
  report that it has everything).

Writes bench/results/nested.json and, with --update-readme, the table in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from worldswitch.boot.initramfs import InitramfsSpec, build_initramfs, resolve_modules
from worldswitch.vmm.host import detect_host_kind
from worldswitch.vmx.debian import DebianLinux, fetch_debian

from .report import update_readme
from .vmms import QEMU, qemu_version

ROOT = Path(__file__).resolve().parent.parent
MARKER = "WORLDSWITCH-INIT-MARKER"
DISK_MIB = 64
NET_MIB = 32
HOST_IP, GUEST_IP = "10.0.3.1", "10.0.3.2"
TX_PORT, RX_PORT = 5001, 5002
BOOT_ATTEMPTS = 3  # a boot the nested host itself spoils (docs/hosts.md) is run again, and counted

# What /init runs after the marker: every time from /proc/uptime (centiseconds), printed as BENCH lines.
GUEST_SCRIPT = f"""
now() {{ cut -d' ' -f1 /proc/uptime; }}
t0=$(now); dd if=/dev/vda of=/dev/null bs=1M count={DISK_MIB} iflag=direct 2>/dev/null; t1=$(now)
echo "BENCH blk-read {DISK_MIB} $t0 $t1"
t0=$(now); dd if=/dev/zero of=/dev/vda bs=1M count={DISK_MIB} oflag=direct 2>/dev/null; sync; t1=$(now)
echo "BENCH blk-write {DISK_MIB} $t0 $t1"
ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up
for i in $(seq 50); do ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1 && break; done
dd if=/dev/zero bs=64k count={NET_MIB * 16} 2>/dev/null | nc {HOST_IP} {TX_PORT}
echo "BENCH net-tx-sent"
echo "BENCH net-rx-ready"
nc -l -p {RX_PORT} > /dev/null
echo "BENCH net-rx-done"
""".strip().splitlines()


def guest_initramfs(linux: DebianLinux, path: Path) -> Path:
    spec = InitramfsSpec(linux.busybox, resolve_modules(["virtio_pci", "virtio_blk", "virtio_net"], linux.modules),
                         marker=MARKER, commands=GUEST_SCRIPT)
    path.write_bytes(build_initramfs(spec))
    return path


@dataclass
class Boot:
    """One boot of one VMM: what the host saw and what the guest reported."""

    vmm: str
    to_marker_s: float = 0.0
    blk_read_mib_s: float = 0.0
    blk_write_mib_s: float = 0.0
    net_tx_mib_s: float = 0.0
    net_rx_mib_s: float = 0.0


class Tap:
    """A tap on the host with the host's address, for one VMM at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "link", "delete", self.name], check=False)


# The VMMs a round boots, and their columns: worldswitch as a user runs it (its virtio-net offers the
# checksum and TCP segmentation offloads), worldswitch without them, and QEMU, which runs without
# them: with them its guest stops after its first megabyte of TCP on this host (docs/hosts.md, TCG
# issue 7). worldswitch without offloads against QEMU is the like-for-like comparison.
VMMS = {"worldswitch": "worldswitch", "worldswitch-no-offloads": "worldswitch, offloads=off", "qemu": "QEMU"}


def commands(linux: DebianLinux, initrd: Path, disk: Path, tap: str) -> dict[str, list[str]]:
    worldswitch = [sys.executable, "-m", "worldswitch", "run", "--kernel", str(linux.kernel), "--initrd", str(initrd),
                   "--append", "console=ttyS0", "--disk", str(disk), "--quiet"]
    return {
        "worldswitch": [*worldswitch, "--net", f"tap={tap}"],
        "worldswitch-no-offloads": [*worldswitch, "--net", f"tap={tap},offloads=off"],
        "qemu": [QEMU, "-accel", "kvm", "-M", "microvm,pcie=on,acpi=on", "-cpu", "host", "-m", "512", "-nodefaults",
                 "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                 "-kernel", str(linux.kernel), "-initrd", str(initrd), "-append", "console=ttyS0",
                 "-drive", f"file={disk},if=none,id=disk,format=raw", "-device", "virtio-blk-pci,drive=disk",
                 # vnet_hdr=off: no checksum or segmentation offloads (VMMS says why)
                 "-netdev", f"tap,id=net,ifname={tap},script=no,downscript=no,vnet_hdr=off",
                 "-device", "virtio-net-pci,netdev=net"],
    }


def boot_once(name: str, command: list[str], timeout: float) -> Boot:
    boot = Boot(name)
    listener = socket.create_server((HOST_IP, TX_PORT))
    listener.settimeout(timeout)
    started = time.perf_counter()
    # stderr to a file: a pipe nobody reads while stdout is followed would stop a chatty VMM when it fills
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
    assert process.stdout is not None
    tx: dict[str, float] = {}

    def receive() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:  # the boot ended without the guest's connection (shutdown below)
            return
        with connection:  # closed once all has come: busybox's nc ends when the other side does
            first = time.perf_counter()
            total = 0
            while total < NET_MIB << 20 and (chunk := connection.recv(1 << 16)):
                total += len(chunk)
            tx["mib_s"] = total / 2**20 / (time.perf_counter() - first)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    rx_started = 0.0
    output = b""
    watchdog = threading.Timer(timeout, process.kill)  # a VMM that prints nothing must end too
    watchdog.daemon = True
    watchdog.start()
    try:
        for line in iter(process.stdout.readline, b""):
            output += line
            text = line.decode(errors="replace").strip()
            now = time.perf_counter()
            if MARKER in text and not boot.to_marker_s:
                boot.to_marker_s = now - started
            elif match := re.match(r"BENCH blk-(read|write) (\d+) ([\d.]+) ([\d.]+)", text):
                rate = int(match.group(2)) / (float(match.group(4)) - float(match.group(3)))
                setattr(boot, f"blk_{match.group(1)}_mib_s", rate)
            elif text == "BENCH net-rx-ready":
                time.sleep(0.5)  # nc -l is listening once the shell has started it
                rx_started = time.perf_counter()
                with socket.create_connection((GUEST_IP, RX_PORT), timeout=timeout) as sender:
                    sender.sendall(bytes(NET_MIB << 20))
            elif text == "BENCH net-rx-done":
                boot.net_rx_mib_s = NET_MIB / (now - rx_started)
            if now - started > timeout:
                raise TimeoutError(f"{name}: no end after {timeout:.0f} s")
        process.wait(timeout)
    finally:
        watchdog.cancel()
        process.kill()
        # shut down before closing: close() alone leaves the socket listening while the receiver's
        # accept() waits in it, and the next attempt's bind of the same port then fails (EADDRINUSE)
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not listening any more: the receiver has accepted
        listener.close()
    receiver.join(5)
    boot.net_tx_mib_s = tx.get("mib_s", 0.0)
    missing = [key for key, value in vars(boot).items() if value == 0.0]
    if missing:
        raise RuntimeError(f"{name}: no {', '.join(missing)}; its console ended with "
                           f"{output[-800:].decode(errors='replace')!r} {_tail_of(errors)!r}")
    return boot


def _tail_of(file: typing.IO[bytes], size: int = 400) -> bytes:
    file.seek(0)
    return file.read()[-size:]


@dataclass
class Table:
    rounds: list[dict[str, Boot]] = field(default_factory=list)

    def median(self, vmm: str, key: str) -> float:
        return statistics.median(getattr(round_[vmm], key) for round_ in self.rounds)

    def spread(self, vmm: str, key: str) -> tuple[float, float]:
        values = [getattr(round_[vmm], key) for round_ in self.rounds]
        return min(values), max(values)


ROWS = (("to_marker_s", "boot to the init marker", "s", False),
        ("blk_read_mib_s", f"virtio-blk direct reads, 1 MiB ({DISK_MIB} MiB)", "MiB/s", True),
        ("blk_write_mib_s", f"virtio-blk direct writes, 1 MiB ({DISK_MIB} MiB)", "MiB/s", True),
        ("net_tx_mib_s", f"virtio-net TCP guest to host ({NET_MIB} MiB)", "MiB/s", True),
        ("net_rx_mib_s", f"virtio-net TCP host to guest ({NET_MIB} MiB)", "MiB/s", True))


def markdown(table: Table, header: str) -> str:
    """A column for each VMM (median, min-max), then each worldswitch's median over QEMU's."""
    ours = [vmm for vmm in VMMS if vmm != "qemu"]
    columns = [*VMMS.values(), *(f"{VMMS[vmm]} / QEMU" for vmm in ours)]
    lines = [header, "", f"| figure | {' | '.join(columns)} |", "| --- |" + " --- |" * len(columns)]
    for key, title, unit, higher_is_better in ROWS:
        cells = [f"{table.median(vmm, key):.2f} {unit} ({'{:.2f}-{:.2f}'.format(*table.spread(vmm, key))})" for vmm in VMMS]
        cells += [f"{table.median(vmm, key) / table.median('qemu', key):.2f}x" for vmm in ours]
        better = "higher is better" if higher_is_better else "lower is better"
        lines.append(f"| {title} ({better}) | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nested", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one boot may take")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--update-readme", action="store_true", help="put the table into bench/README.md")
    options = parser.parse_args(argv)
    host = detect_host_kind()
    if host.kernel_code_emulated:
        print("bench.nested: this host emulates guest kernel code (PVM); run it on VT-x/AMD-V (tests/hosts/amdv)",
              file=sys.stderr)
        return 2
    for tool in (QEMU, "ip"):
        if shutil.which(tool) is None:
            print(f"bench.nested: {tool} is not installed", file=sys.stderr)
            return 2
    linux = fetch_debian(ROOT / ".cache" / "debian")
    options.out.mkdir(parents=True, exist_ok=True)
    initrd = guest_initramfs(linux, options.out / "nested-initrd.img")
    disk = options.out / "nested-disk.img"
    table = Table()
    failed: dict[str, list[str]] = {vmm: [] for vmm in VMMS}  # boots that did not complete, and why
    for number in range(options.rounds):
        results: dict[str, Boot] = {}
        order = list(VMMS)[number % len(VMMS):] + list(VMMS)[:number % len(VMMS)]  # each goes first in turn
        for name in order:
            for attempt in range(1, BOOT_ATTEMPTS + 1):
                disk.write_bytes(os.urandom(DISK_MIB << 20))
                tap = Tap("wsbench0")
                try:
                    results[name] = boot_once(name, commands(linux, initrd, disk, tap.name)[name], options.timeout)
                    break
                except (RuntimeError, TimeoutError) as error:  # the nested host's own faults (docs/hosts.md)
                    failed[name].append(str(error)[-300:])
                    print(f"round {number + 1}: {name} boot {attempt} failed: {str(error)[-300:]}", flush=True)
                    if attempt == BOOT_ATTEMPTS:
                        raise
                finally:
                    tap.close()
            print(f"round {number + 1}: {results[name]}", flush=True)
        table.rounds.append(results)
    header = (f"Measured {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} on "
              f"{host.description.split(';')[0]}, {host.virtual_machine or 'not nested'}; {qemu_version()}; "
              f"Debian {linux.version}; median of {options.rounds} interleaved rounds (min-max).")
    text = markdown(table, header)
    if any(failed.values()):
        text += "\n\nBoots that did not complete and were run again: " + ", ".join(
            f"{name} {len(reasons)}" for name, reasons in failed.items()) + " (bench/results/nested.json has why)."
    print(text)
    (options.out / "nested.json").write_text(json.dumps(
        {"header": header, "rounds": [{name: vars(boot) for name, boot in round_.items()} for round_ in table.rounds],
         "failed_boots": failed},
        indent=2) + "\n")
    if options.update_readme:
        update_readme(ROOT / "bench" / "README.md", text, "nested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
