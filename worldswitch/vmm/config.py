"""What a machine is made of, as the user describes it (command line, machine file, API) and as a
snapshot records it: the program or kernel, memory, vCPUs and devices. The builder makes a
machine from it; nothing here touches KVM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..boot.bios import firmware_path
from ..devices.disk import FORMATS as DISK_FORMATS
from ..errors import ConfigError
from ..guests import DEFAULT_GUEST, builtin_path
from ..options import COUNT, FLAG, PATH, SIZE, TEXT, backend, choice, name_or_path, option, repeated
from ..record import record, replace
from .defaults import DEFAULT_CMDLINE, DEFAULT_LINUX_MEMORY, DEFAULT_MEMORY

DISK_SYNTAX = "PATH[,ro[,shared]][,serial=ID][,format=raw|qcow2]"


@record
class DiskConfig:
    path: str
    read_only: bool = False
    serial: str | None = None
    shared: bool = False  # read-only, and others may write it meanwhile (no write lock kept out)
    format: str | None = None  # raw or qcow2; None: probed from the image (a probed raw image keeps its format)

    def __post_init__(self) -> None:
        if self.shared and not self.read_only:
            raise ConfigError(f"disk {self.path}: shared is for read-only disks (ro,shared): two writers would corrupt it")
        if self.format not in (None, *DISK_FORMATS):
            raise ConfigError(f"disk {self.path}: format {self.format!r} is not one of {', '.join(DISK_FORMATS)}")

    @classmethod
    def parse(cls, spec: str, base: Path | None = None) -> "DiskConfig":
        """PATH[,ro[,shared]][,serial=ID][,format=raw|qcow2], the --disk syntax; a relative PATH is taken
        from `base`."""
        path, options = _split(spec)
        unknown = set(options) - {"ro", "shared", "serial", "format"}
        if not path or unknown:
            raise ConfigError(f"{spec!r}: expected {DISK_SYNTAX}" + (f", not {', '.join(sorted(unknown))}" if unknown else ""))
        return cls(str(base / path) if base else path, "ro" in options, options.get("serial") or None, "shared" in options,
                   options.get("format") or None)

    @classmethod
    def convert(cls, raw: Any, base: Path | None) -> "DiskConfig":
        """A disk as the command line (a spec), a machine file (a spec or a table) or the API (a spec
        or a DiskConfig) gives it."""
        if isinstance(raw, DiskConfig):
            return raw
        if isinstance(raw, str):
            return cls.parse(raw, base)
        if isinstance(raw, dict):
            unknown = set(raw) - {"path", "read_only", "serial", "shared", "format"}
            if unknown or not isinstance(raw.get("path"), str) or not raw["path"]:
                raise ConfigError("a disk table has a path and optionally read_only, shared, serial and format, "
                                  f"not {sorted(unknown)}")
            if not all(isinstance(raw.get(key, False), bool) for key in ("read_only", "shared")) or \
                    not all(isinstance(raw.get(key, ""), str) for key in ("serial", "format")):
                raise ConfigError("a disk's read_only and shared are true or false, its serial and format strings")
            path = str(base / raw["path"]) if base else raw["path"]
            return cls(path, raw.get("read_only", False), raw.get("serial"), raw.get("shared", False), raw.get("format"))
        raise ConfigError("each disk is a string or a table")


NET_SYNTAX = "tap=NAME[,mac=MAC][,offloads=off]"


@record
class NetConfig:
    tap: str
    mac: str | None = None
    offloads: bool = True  # checksum and TCP segmentation offloads offered to the guest (devices/virtio/net.py)

    @classmethod
    def parse(cls, spec: str) -> "NetConfig":
        """The --net syntax, NET_SYNTAX."""
        first, options = _split(spec)
        key, _, tap = first.partition("=")
        if key != "tap" or not tap or set(options) - {"mac", "offloads"} or options.get("offloads", "on") not in ("on", "off"):
            raise ConfigError(f"{spec!r}: expected {NET_SYNTAX} (a MAC like 52:54:00:12:34:56)")
        return cls(tap, options.get("mac"), options.get("offloads", "on") == "on")

    @classmethod
    def convert(cls, raw: Any, base: Path | None) -> "NetConfig":
        if isinstance(raw, NetConfig):
            return raw
        if isinstance(raw, str):
            return cls.parse(raw)
        if isinstance(raw, dict) and isinstance(raw.get("tap"), str) and set(raw) <= {"tap", "mac", "offloads"} \
                and isinstance(raw.get("offloads", True), bool):
            return cls(raw["tap"], raw.get("mac"), raw.get("offloads", True))
        raise ConfigError(f'each network is "{NET_SYNTAX}" or a table with tap, mac and offloads (true or false)')


def _split(spec: str) -> tuple[str, dict[str, str]]:
    first, *rest = spec.split(",")
    options: dict[str, str] = {}
    for item in rest:
        key, _, value = item.partition("=")
        options[key] = value
    return first, options


@record
class MachineConfig:
    """Every field is a user's option (worldswitch/options.py): `worldswitch run --NAME`, the machine
    file's NAME key and Machine(NAME=...) are derived from it."""

    memory: int | None = option(None, kind=SIZE, short="-m", metavar="SIZE",
                                help=f"guest RAM (default {DEFAULT_MEMORY >> 20}M, {DEFAULT_LINUX_MEMORY >> 20}M for --kernel)")
    cpus: int = option(1, kind=COUNT, metavar="N", help="number of vCPUs (default 1)")
    guest: str | None = option(None, kind=TEXT, metavar="NAME", program=True,
                               help=f"a built-in guest (the default: {DEFAULT_GUEST}; `worldswitch guests` lists them)")
    elf: str | None = option(None, kind=PATH, metavar="FILE", program=True,
                             help="your own static ELF64 program, entered in 64-bit ring 0")
    kernel: str | None = option(None, kind=PATH, metavar="FILE", program=True,
                                help="a Linux kernel: bzImage (vmlinuz) or ELF vmlinux")
    firmware: str | None = option(None, kind=name_or_path("bios"), metavar="bios|FILE",
                                  help="boot through firmware: bios is SeaBIOS (Debian's seabios package), or give "
                                       "another BIOS image; the default when only disks or a CD are given. With "
                                       "--kernel, the firmware boots the kernel (through fw_cfg, as QEMU's -kernel)")
    args: str = option("", kind=TEXT, metavar="STRING", help="argument string passed to the program (RDI)")
    initrd: str | None = option(None, kind=PATH, metavar="FILE", help="initial ramdisk for --kernel")
    append: str = option(DEFAULT_CMDLINE, kind=TEXT, metavar="CMDLINE",
                         help=f"the Linux kernel's command line (default {DEFAULT_CMDLINE!r})")
    decompress: str = option("auto", kind=choice("auto", "host", "guest"),
                             help="who decompresses a bzImage: the host (fast) or the guest's own decompressor; "
                                  "auto (the default): the host where guest kernel code is emulated (PVM)")
    disk: list[DiskConfig] = option(kind=repeated(DiskConfig.convert, "disks"), default_factory=list,
                                    metavar=DISK_SYNTAX,
                                    help="a disk image (raw or qcow2) as virtio-blk, in PCI slot order (repeatable)")
    net: list[NetConfig] = option(kind=repeated(NetConfig.convert, "networks"), default_factory=list,
                                  metavar=NET_SYNTAX,
                                  help="virtio-net on a tap interface, created if needed, with checksum and TCP "
                                       "segmentation offloads unless offloads=off (repeatable)")
    cdrom: str | None = option(None, kind=PATH, metavar="FILE.iso",
                               help="an ISO image as an ATAPI CD-ROM on the IDE controller, booted before the disks "
                                    "(a machine that boots through firmware)")
    rng: bool = option(False, kind=FLAG, help="a virtio-rng fed from the host's getrandom()")
    vconsole: str | None = option(None, kind=backend("pty", "none"), metavar="BACKEND",
                                  help="a virtio-console: pty, file:PATH or none")
    packed_queues: bool = option(False, kind=FLAG,
                                 help="offer packed virtqueues (VIRTIO_F_RING_PACKED) on every virtio device")
    monitor: bool = option(False, kind=FLAG,
                           help="run the guest's kernel code (a program's ring 0, or a paravirtual Linux) deprivileged, "
                                "natively in ring 3, under worldswitch's in-guest monitor (docs/monitor.md): for hosts "
                                "that emulate guest kernel code (PVM); refused where VT-x/AMD-V runs it natively")

    def program(self) -> tuple[str, str]:
        """(display name, path) of what boots."""
        chosen = [what for what in (self.elf, self.guest, self.kernel) if what]
        if len(chosen) > 1:
            raise ConfigError("give one of a built-in guest, an ELF program or a Linux kernel")
        if self.initrd and not self.kernel:
            raise ConfigError("an initrd needs a Linux kernel (--kernel)")
        if self.firmware and (self.elf or self.guest):
            raise ConfigError("firmware boots disks, a CD or a Linux kernel (--kernel), not a program")
        if self.cdrom and not self.boots_firmware:
            raise ConfigError("--cdrom is for a machine that boots through firmware (--firmware), not a kernel or program")
        if self.monitor and self.kernel and self.decompress == "guest":
            raise ConfigError("--monitor needs the kernel decompressed on the host (--decompress host), to point "
                              "its paravirtual interrupt flag at the monitor before it runs")
        if self.boots_firmware:
            path = firmware_path(self.firmware or "bios")
            return (f"{self.kernel} through firmware {path}" if self.kernel else f"firmware {path}"), path
        if self.kernel:
            return self.kernel, self.kernel
        if self.elf:
            return self.elf, self.elf
        name = self.guest or DEFAULT_GUEST
        return f"built-in guest '{name}'", str(builtin_path(name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineConfig":
        """The inverse of record.asdict (snapshots store the description this way)."""
        data = dict(data)
        data["disk"] = [DiskConfig(**disk) for disk in data.get("disk", [])]
        data["net"] = [NetConfig(**net) for net in data.get("net", [])]
        return cls(**data)

    def absolute(self) -> "MachineConfig":
        """The same description with every file path absolute, so that a snapshot of it can be
        restored from any working directory."""
        def path(value: str | None) -> str | None:
            return os.path.abspath(value) if value else value

        vconsole = self.vconsole
        if vconsole is not None and vconsole.startswith("file:"):
            vconsole = "file:" + os.path.abspath(vconsole[5:])
        firmware = self.firmware if self.firmware in (None, "bios") else path(self.firmware)
        return replace(self, elf=path(self.elf), kernel=path(self.kernel), initrd=path(self.initrd), firmware=firmware,
                       cdrom=path(self.cdrom),
                       disk=[replace(d, path=os.path.abspath(d.path)) for d in self.disk],
                       net=[replace(n) for n in self.net], vconsole=vconsole)

    @property
    def boots_firmware(self) -> bool:
        """Firmware boots the machine: asked for, or nothing else given but disks (a PC with a disk)."""
        return bool(self.firmware) or (not (self.elf or self.guest or self.kernel) and bool(self.disk or self.cdrom))

    @property
    def memory_bytes(self) -> int:
        if self.memory is not None:
            return self.memory
        return DEFAULT_LINUX_MEMORY if self.kernel else DEFAULT_MEMORY
