"""The `worldswitch` command: the VMX's user interface.

    worldswitch run [options]   build a machine, run it on the console, report how it ended
    worldswitch info            what this host's KVM is (VT-x, AMD-V or PVM) and can do
    worldswitch guests          the built-in guest programs
    worldswitch trace FILE      summarise an exit trace recorded with `run --trace FILE`

Every error the user can cause ends in one line on stderr and a non-zero status; a traceback
means a bug in worldswitch (set WORLDSWITCH_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, WorldswitchError
from ..guests import BUILTIN_GUESTS, DEFAULT_GUEST
from ..vmm.builder import (DEFAULT_CMDLINE, DEFAULT_LINUX_MEMORY, DEFAULT_MEMORY, DiskConfig, MachineConfig, NetConfig,
                           build_machine)
from ..vmm.machine import Machine
from ..vmm.result import MachineResult, StopReason
from .console import Console, open_console, stderr_line
from ..vmm.trace import DEFAULT_LIMIT as DEFAULT_TRACE_LIMIT
from .units import parse_seconds, parse_size

KVM_PATH_VARIABLE = "WORLDSWITCH_KVM"  # another KVM device node than /dev/kvm

DEFAULT_CACHE = Path.home() / ".cache" / "worldswitch" / "debian"

EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


def _run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = sub.add_parser(
        "run",
        help="run a virtual machine",
        description="Run a guest on this host's KVM. With no program given, runs the built-in "
        f"'{DEFAULT_GUEST}' guest.",
    )
    program = run.add_mutually_exclusive_group()
    program.add_argument("--guest", metavar="NAME", help=f"a built-in guest ({', '.join(sorted(BUILTIN_GUESTS))})")
    program.add_argument("--elf", metavar="FILE", help="your own static ELF64 program, entered in 64-bit ring 0")
    program.add_argument("--kernel", metavar="FILE", help="a Linux kernel: bzImage (vmlinuz) or ELF vmlinux")
    run.add_argument("--args", default="", metavar="STRING", help="argument string passed to the program (RDI)")
    run.add_argument("--initrd", metavar="FILE", help="initial ramdisk for --kernel")
    run.add_argument("--append", default=DEFAULT_CMDLINE, metavar="CMDLINE",
                     help="kernel command line (default %(default)r)")
    run.add_argument("--decompress", choices=("host", "guest"), default="auto",
                     help="who decompresses a bzImage: the host (fast) or the guest's own decompressor; "
                          "default: host where guest kernel code is emulated (PVM), else guest")
    run.add_argument("--reboot", action="store_true", help="when the guest resets, start it again instead of ending")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,serial=ID]",
                     help="a raw disk image as virtio-blk (repeatable)")
    run.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                     help="virtio-net on a tap interface, created if needed (repeatable)")
    run.add_argument("--rng", action="store_true", help="a virtio-rng fed from the host's getrandom()")
    run.add_argument("--vconsole", metavar="BACKEND", help="a virtio-console: pty, file:PATH or none")
    run.add_argument("--memory", "-m", default=None, metavar="SIZE",
                     help=f"guest RAM (default {DEFAULT_MEMORY >> 20}M, {DEFAULT_LINUX_MEMORY >> 20}M for --kernel)")
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument("--timeout", metavar="SECONDS", help="stop the guest if it has not ended after this long")
    run.add_argument("--serial", default="stdio", metavar="BACKEND", help="console: stdio (default), file:PATH or none")
    run.add_argument("--stats", action="store_true", help="print the full world-switch table at exit")
    run.add_argument("--stats-json", metavar="FILE", help="write the world-switch statistics as JSON")
    run.add_argument("--quiet", "-q", action="store_true", help="print nothing but the guest's output and errors")
    run.add_argument("--trace", metavar="FILE", help="record every world switch to FILE (see `worldswitch trace`)")
    run.add_argument("--trace-limit", type=int, default=DEFAULT_TRACE_LIMIT, metavar="N",
                     help="record at most N world switches (default %(default)s, 32 bytes each)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldswitch",
        description="A hackable hosted hypervisor on Linux KVM.",
    )
    parser.add_argument("--version", action="version", version=f"worldswitch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _run_parser(sub)
    info = sub.add_parser("info", help="describe this host's KVM")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--no-measure", action="store_true", help="skip timing ring-0 and ring-3 guest code")
    sub.add_parser("guests", help="list the built-in guest programs")
    fetch = sub.add_parser("fetch-debian", help="download Debian's cloud kernel and busybox into a cache folder")
    fetch.add_argument("--dir", type=Path, default=DEFAULT_CACHE, help="cache folder (default %(default)s)")
    initramfs = sub.add_parser("initramfs", help="build a busybox initramfs")
    initramfs.add_argument("-o", "--output", type=Path, required=True, help="the archive to write")
    source = initramfs.add_mutually_exclusive_group(required=True)
    source.add_argument("--debian", type=Path, metavar="DIR", help="a folder filled by fetch-debian (busybox and modules)")
    source.add_argument("--busybox", type=Path, help="a static busybox binary")
    initramfs.add_argument("--modules-dir", type=Path, help="lib/modules/VERSION to take --module from")
    initramfs.add_argument("--module", action="append", default=[], metavar="NAME", help="a kernel module to load (repeatable)")
    initramfs.add_argument("--shell", action="store_true", help="start a shell instead of powering off")
    initramfs.add_argument("--marker", default=None, help="the line /init prints once it runs")
    initramfs.add_argument("--no-compress", action="store_true", help="write a plain cpio archive, not gzip")
    trace = sub.add_parser("trace", help="summarise an exit trace recorded with `run --trace`")
    trace.add_argument("file", help="the trace file")
    trace.add_argument("--json", action="store_true", help="machine-readable output")
    trace.add_argument("--top", type=int, default=8, help="how many ports and addresses to list")
    return parser


def config_from_args(options: argparse.Namespace) -> MachineConfig:
    return MachineConfig(
        memory=parse_size(options.memory, "--memory") if options.memory else None,
        cpus=options.cpus,
        elf=options.elf,
        guest=options.guest,
        args=options.args,
        kernel=options.kernel,
        initrd=options.initrd,
        cmdline=options.append,
        decompress=options.decompress,
        disks=[parse_disk(spec) for spec in options.disk],
        nets=[parse_net(spec) for spec in options.net],
        rng=options.rng,
        vconsole=options.vconsole,
    )


def _options(spec: str, what: str) -> tuple[str, dict[str, str]]:
    first, *rest = spec.split(",")
    options: dict[str, str] = {}
    for item in rest:
        key, _, value = item.partition("=")
        options[key] = value
    return first, options


def parse_disk(spec: str) -> DiskConfig:
    path, options = _options(spec, "--disk")
    unknown = set(options) - {"ro", "serial"}
    if not path or unknown:
        raise ConfigError(f"--disk {spec!r}: expected PATH[,ro][,serial=ID]" + (f", not {', '.join(sorted(unknown))}" if unknown else ""))
    return DiskConfig(path, read_only="ro" in options, serial=options.get("serial") or None)


def parse_net(spec: str) -> NetConfig:
    first, options = _options(spec, "--net")
    key, _, tap = first.partition("=")
    unknown = set(options) - {"mac"}
    if key != "tap" or not tap or unknown:
        raise ConfigError(f"--net {spec!r}: expected tap=NAME[,mac=52:54:00:12:34:56]")
    return NetConfig(tap, options.get("mac"))


def run_machine(machine: Machine, console: Console, deadline: float | None, timeout: float | None) -> MachineResult:
    """Run until the guest ends, the deadline passes, or the user stops it."""
    serial = machine.devices["serial"]

    def quit_requested() -> None:
        machine.request_exit(MachineResult.of(StopReason.STOPPED, "stopped by the user"))

    console.attach(serial.receive, quit_requested)  # type: ignore[attr-defined]
    try:
        machine.start()
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = machine.wait(min(remaining, 0.5) if remaining is not None else 0.5)
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                return machine.stop(StopReason.TIMEOUT, f"the guest did not finish within {timeout:g} s; stopped it")
    except KeyboardInterrupt:
        return machine.stop(StopReason.INTERRUPTED, "interrupted")
    finally:
        console.detach()


def cmd_run(options: argparse.Namespace) -> int:
    config = config_from_args(options)
    timeout = parse_seconds(options.timeout, "--timeout") if options.timeout else None
    deadline = None if timeout is None else time.monotonic() + timeout
    console = open_console(options.serial)
    boots = 0
    while True:
        try:
            machine = build_machine(
                config, console.write, warn=lambda text: stderr_line(text, console), kvm_path=kvm_path()
            )
        except BaseException:
            console.close()
            raise
        boots += 1
        with machine:
            if machine.boot is not None and not options.quiet and boots == 1:
                boot = machine.boot
                notes = "; ".join(boot.notes)
                stderr_line(f"booting {boot.version or config.kernel} as a {boot.mode}" + (f" ({notes})" if notes else ""), console)
            if options.trace:
                machine.enable_trace(options.trace, options.trace_limit)
            result = run_machine(machine, console, deadline, timeout)
            stats = machine.stats()
        if result.reason is StopReason.RESET and options.reboot:
            stderr_line(f"guest reset; starting it again (boot {boots + 1})", console)
            continue
        break
    console.close()
    if not options.quiet or not result.ok:
        stderr_line(result.message, console)
    if options.stats:
        sys.stderr.write(stats.table() + "\n")
    elif not options.quiet:
        stderr_line(stats.summary(), console)
    if options.stats_json:
        ucall = result.details.get("ucall")
        payload = {"result": {"reason": result.reason.value, "message": result.message, "exit_status": result.exit_status,
                              "value": result.value, "boots": boots,
                              "ucall_args": list(ucall.args) if ucall is not None else None},  # type: ignore[attr-defined]
                   "stats": stats.as_dict()}
        Path(options.stats_json).write_text(json.dumps(payload, indent=2) + "\n")
    return result.exit_status


def kvm_path() -> str:
    return os.environ.get(KVM_PATH_VARIABLE, "/dev/kvm")


def cmd_info(options: argparse.Namespace) -> int:
    from .info import format_info, gather, info_json

    info = gather(kvm_path(), measure=not options.no_measure)
    print(info_json(info) if options.json else format_info(info))
    return 1 if info.required_missing else 0


def cmd_guests(options: argparse.Namespace) -> int:
    for name, what in sorted(BUILTIN_GUESTS.items()):
        marker = " (default)" if name == DEFAULT_GUEST else ""
        print(f"{name:8} {what}{marker}")
    return 0


def cmd_trace(options: argparse.Namespace) -> int:
    from ..vmm.trace import read_trace
    from .trace_report import as_json, summarise

    trace = read_trace(options.file)
    print(as_json(trace) if options.json else summarise(trace, top=options.top))
    return 0


def cmd_fetch_debian(options: argparse.Namespace) -> int:
    from .debian import fetch_debian

    linux = fetch_debian(options.dir)
    print(f"kernel   {linux.kernel}\nmodules  {linux.modules}\nbusybox  {linux.busybox}")
    print(f"next: worldswitch initramfs --debian {options.dir} --shell -o initrd.img && "
          f"worldswitch run --kernel {linux.kernel} --initrd initrd.img")
    return 0


def cmd_initramfs(options: argparse.Namespace) -> int:
    from ..boot.initramfs import DEFAULT_MARKER, InitramfsSpec, build_initramfs, resolve_modules
    from .debian import find_extracted

    busybox, modules_dir = options.busybox, options.modules_dir
    if options.debian is not None:
        linux = find_extracted(options.debian / "root")
        if linux is None:
            raise ConfigError(f"{options.debian} holds no fetched Debian kernel; run worldswitch fetch-debian --dir {options.debian}")
        busybox, modules_dir = linux.busybox, modules_dir or linux.modules
    if options.module and modules_dir is None:
        raise ConfigError("--module needs --modules-dir (or --debian)")
    modules = resolve_modules(options.module, modules_dir) if options.module else []
    spec = InitramfsSpec(busybox, modules, options.marker or DEFAULT_MARKER, options.shell)
    data = build_initramfs(spec, compress=not options.no_compress)
    options.output.write_bytes(data)
    print(f"wrote {options.output} ({len(data) >> 10} KiB): busybox" + (f", {len(modules)} modules" if modules else ""))
    return 0


COMMANDS = {"run": cmd_run, "info": cmd_info, "guests": cmd_guests, "trace": cmd_trace,
            "fetch-debian": cmd_fetch_debian, "initramfs": cmd_initramfs}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[options.command](options)
    except WorldswitchError as error:
        print(f"worldswitch: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("worldswitch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("WORLDSWITCH_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"worldswitch: internal error: {type(error).__name__}: {error} (WORLDSWITCH_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
