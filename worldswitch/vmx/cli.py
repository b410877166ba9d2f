"""The `worldswitch` command: the VMX's user interface.

    worldswitch run [MACHINE.toml] [options]   build a machine, run it on the console, report how it ended
    worldswitch restore DIR     resume a machine from a snapshot
    worldswitch ctl SOCKET CMD  drive a running machine through its control socket
    worldswitch profile SOCKET  sample where a running machine's vCPUs spend their time
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
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, WorldswitchError
from ..guests import BUILTIN_GUESTS, DEFAULT_GUEST
from ..record import record
from ..version import __version__
from .signals import StopSignals

KVM_PATH_VARIABLE = "WORLDSWITCH_KVM"  # another KVM device node than /dev/kvm

DEFAULT_CACHE = Path.home() / ".cache" / "worldswitch" / "debian"

EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as the shell reports a program the signal ended

Subparsers = argparse._SubParsersAction  # type: ignore[type-arg]


def _help_width() -> int:
    """What shutil.get_terminal_size() answers (COLUMNS, then the terminal, then 80), less argparse's margin."""
    try:
        return int(os.environ["COLUMNS"]) - 2
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno() if sys.__stdout__ else -1).columns - 2
    except (ValueError, OSError):
        return 80 - 2


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, given the width: without one, argparse asks shutil for it at every flag it adds, and
    importing shutil (with bz2, lzma and fnmatch) cost about 3 ms of every start."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _help_width() if width is None else width)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with our HelpFormatter; its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **keywords: Any) -> None:
        keywords.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **keywords)


def _add_run(sub: Subparsers) -> None:
    from .settings import MACHINE_OPTIONS, SESSION_OPTIONS, add_arguments

    run = sub.add_parser(
        "run",
        help="run a virtual machine",
        description="Run a guest on this host's KVM. With no program given, runs the built-in "
        f"'{DEFAULT_GUEST}' guest. A machine file (TOML, one key per option) may describe the VM; "
        "options given here win over it.",
        argument_default=argparse.SUPPRESS,
    )
    run.add_argument("machine", nargs="?", metavar="MACHINE.toml", help="a machine file")
    add_arguments(run, MACHINE_OPTIONS + SESSION_OPTIONS)


def _add_restore(sub: Subparsers) -> None:
    from .settings import SESSION_OPTIONS, add_arguments

    restore = sub.add_parser(
        "restore",
        help="resume a virtual machine from a snapshot",
        description="Resume a machine exactly where a snapshot (control API `snapshot`, or "
        "Machine.snapshot() in Python) left it.",
        argument_default=argparse.SUPPRESS,
    )
    restore.add_argument("snapshot", metavar="DIR", help="a snapshot directory")
    add_arguments(restore, SESSION_OPTIONS)


def _add_ctl(sub: Subparsers) -> None:
    ctl = sub.add_parser(
        "ctl",
        help="talk to a running VM's control socket",
        description="Send one control request to a running VM and print its JSON answer. Commands: "
        "status, pause, resume, stop, stats, registers, snapshot path=DIR, events (streams until the VM ends), help.",
    )
    ctl.add_argument("socket", metavar="SOCKET", help="the control socket `worldswitch run` printed")
    ctl.add_argument("request", metavar="COMMAND", help="status, pause, resume, stop, stats, registers, snapshot, events or help")
    ctl.add_argument("arguments", nargs="*", metavar="KEY=VALUE", help="request arguments (a value is JSON or a string)")
    ctl.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default %(default)s)")


def _add_profile(sub: Subparsers) -> None:
    profile = sub.add_parser(
        "profile",
        help="sample where a running VM's vCPUs are, by function",
        description="A sampling profiler from outside the guest: asks the VM for its registers every "
        "INTERVAL seconds and counts the functions the vCPUs were in (names from --symbols).",
    )
    profile.add_argument("socket", metavar="SOCKET", help="the control socket `worldswitch run` printed")
    profile.add_argument("--seconds", type=float, default=10.0, help="how long to sample (default %(default)s)")
    profile.add_argument("--interval", type=float, default=0.01, help="seconds between samples (default %(default)s)")
    profile.add_argument("--samples", type=int, metavar="N", help="stop after N samples (and at --seconds at the latest)")
    profile.add_argument("--symbols", metavar="FILE", help="System.map, nm output, or an ELF file with a symbol table")
    profile.add_argument("--top", type=int, default=25, help="how many functions to list (default %(default)s)")


def _add_info(sub: Subparsers) -> None:
    info = sub.add_parser("info", help="describe this host's KVM")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--no-measure", action="store_true", help="skip timing ring-0 and ring-3 guest code")


def _add_guests(sub: Subparsers) -> None:
    sub.add_parser("guests", help="list the built-in guest programs")


def _add_fetch_debian(sub: Subparsers) -> None:
    fetch = sub.add_parser("fetch-debian", help="download Debian's cloud kernel and busybox into a cache folder")
    fetch.add_argument("--dir", type=Path, default=DEFAULT_CACHE, help="cache folder (default %(default)s)")
    fetch.add_argument("--release", metavar="NAME", help="a Debian release from deb.debian.org (bookworm, trixie, "
                                                         "forky, sid; default: the host's apt sources)")
    fetch.add_argument("--disk", type=Path, metavar="FILE", help="also make a bootable disk image: GRUB for BIOS, "
                                                                 "the kernel and a busybox initramfs with a shell")
    fetch.add_argument("--iso", type=Path, metavar="FILE", help="also make a hybrid ISO of the same (grub-mkrescue)")


def _add_initramfs(sub: Subparsers) -> None:
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


def _add_disk(sub: Subparsers) -> None:
    disk = sub.add_parser("disk", help="make disk images")
    disk_commands = disk.add_subparsers(dest="disk_command", metavar="COMMAND", required=True)
    create = disk_commands.add_parser("create", help="a new, empty disk image",
                                      description="A new disk image of SIZE (512M, 20G, ...): qcow2 (grows as the "
                                                  "guest writes, what QEMU makes with qemu-img create -f qcow2) or raw "
                                                  "(a sparse file). An existing file is never replaced.")
    create.add_argument("path", metavar="PATH", help="the image to make")
    create.add_argument("size", metavar="SIZE", help="its size as the guest sees it")
    create.add_argument("--format", choices=("qcow2", "raw"), default="qcow2", help="the image format (default %(default)s)")


def _add_trace(sub: Subparsers) -> None:
    trace = sub.add_parser("trace", help="summarise an exit trace recorded with `run --trace`")
    trace.add_argument("file", help="the trace file")
    trace.add_argument("--json", action="store_true", help="machine-readable output")
    trace.add_argument("--top", type=int, default=8, help="how many ports and addresses to list")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with `only`, just that command's (the others' flags cost start-up
    time, above all run's: one per option; `worldswitch --help` still lists every command)."""
    parser = Parser(
        prog="worldswitch",
        description="A hackable hosted hypervisor on Linux KVM.",
    )
    parser.add_argument("--version", action="version", version=f"worldswitch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        if only is None or name == only:
            command.add(sub)
    return parser


def command_named(argv: list[str]) -> str | None:
    """The command a command line names first, if it is one we have (anything else, `--help` first
    included, gets the whole parser)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def cmd_run(options: argparse.Namespace) -> int:
    from .session import run_from_options

    return run_from_options(options)


def cmd_restore(options: argparse.Namespace) -> int:
    from .session import restore_from_options

    return restore_from_options(options)


def cmd_profile(options: argparse.Namespace) -> int:
    from .profile import Symbols, report, sample

    symbols = Symbols.load(options.symbols) if options.symbols else None
    if options.seconds <= 0 or options.interval < 0 or (options.samples is not None and options.samples <= 0):
        raise ConfigError("--seconds and --samples must be positive and --interval not negative")
    print(report(sample(options.socket, options.seconds, options.interval, options.samples), symbols, options.top))
    return 0


def cmd_ctl(options: argparse.Namespace) -> int:
    from .control import request, stream_events

    arguments: dict[str, Any] = {}
    for item in options.arguments:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ConfigError(f"argument {item!r}: expected KEY=VALUE")
        try:
            arguments[key] = json.loads(value)
        except ValueError:
            arguments[key] = value
    if options.request == "snapshot" and isinstance(arguments.get("path"), str):
        arguments["path"] = os.path.abspath(arguments["path"])  # the VMX's working directory is not ours
    if options.request == "events":
        stream_events(options.socket, lambda event: print(json.dumps(event), flush=True),
                      lambda: print(f"worldswitch: subscribed to {options.socket}", file=sys.stderr, flush=True))
        return 0
    response = request(options.socket, options.request, options.timeout, arguments)
    if not response.get("ok"):
        error = response.get("error", {})
        print(f"worldswitch: error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    print(json.dumps(response.get("result"), indent=2))
    return 0


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

    linux = fetch_debian(options.dir, release=options.release)
    print(f"kernel   {linux.kernel}\nmodules  {linux.modules}\nbusybox  {linux.busybox}")
    if options.disk is not None or options.iso is not None:
        from ..boot.initramfs import InitramfsSpec, build_initramfs, resolve_modules
        from .debian_image import build_disk, build_iso

        modules = resolve_modules(["virtio_pci", "virtio_blk", "virtio_net"], linux.modules)
        initrd = build_initramfs(InitramfsSpec(linux.busybox, modules, shell=True))
        if options.disk is not None:
            build_disk(options.disk, linux.kernel, initrd)
            print(f"disk     {options.disk}: worldswitch run --disk {options.disk}")
        if options.iso is not None:
            build_iso(options.iso, linux.kernel, initrd)
            print(f"iso      {options.iso}: worldswitch run --disk {options.iso},ro,format=raw")
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


def cmd_disk(options: argparse.Namespace) -> int:
    from ..devices.disk.qcow2 import create_qcow2
    from ..options import parse_size

    size = parse_size(options.size)
    if options.format == "qcow2":
        create_qcow2(options.path, size)
    else:
        try:
            with open(options.path, "xb") as file:
                file.truncate(size)
        except FileExistsError:
            raise ConfigError(f"{options.path} exists; worldswitch does not overwrite it") from None
        except OSError as error:
            raise ConfigError(f"cannot create {options.path}: {error.strerror}") from None
    print(f"made {options.path}: {options.format}, {size >> 20} MiB")
    return 0


@record(frozen=True)
class Command:
    add: Callable[[Subparsers], None]  # its parser
    run: Callable[[argparse.Namespace], int]


COMMANDS = {
    "run": Command(_add_run, cmd_run),
    "restore": Command(_add_restore, cmd_restore),
    "ctl": Command(_add_ctl, cmd_ctl),
    "profile": Command(_add_profile, cmd_profile),
    "info": Command(_add_info, cmd_info),
    "guests": Command(_add_guests, cmd_guests),
    "fetch-debian": Command(_add_fetch_debian, cmd_fetch_debian),
    "initramfs": Command(_add_initramfs, cmd_initramfs),
    "disk": Command(_add_disk, cmd_disk),
    "trace": Command(_add_trace, cmd_trace),
}


def main(argv: list[str] | None = None, whole_process: bool = False) -> int:
    """`whole_process`: this process is the VMX and nothing else (the `worldswitch` command), so a
    session may sandbox it; called from other Python code (tests), it never does."""
    signals = StopSignals()
    if threading.current_thread() is threading.main_thread():
        signals.install()
    try:
        words = sys.argv[1:] if argv is None else argv
        parser = build_parser(command_named(words))
        options = parser.parse_args(words)
        if options.command is None:
            parser.print_help()
            return EXIT_USAGE
        options.signals = signals
        options.whole_process = whole_process
        options.kvm_path = kvm_path()
        return COMMANDS[options.command].run(options)
    except WorldswitchError as error:
        print(f"worldswitch: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("worldswitch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output went away (`worldswitch ctl SOCKET events | head`): end as a program
        # killed by SIGPIPE would, quietly; stdout goes to /dev/null so the exit's flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as error:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("WORLDSWITCH_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"worldswitch: internal error: {type(error).__name__}: {error} (WORLDSWITCH_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        signals.restore()


if __name__ == "__main__":
    sys.exit(main())
