"""Building a busybox initramfs: a "newc" cpio archive (the format the kernel unpacks, see
Documentation/driver-api/early-userspace/buffer-format.rst), written in Python.

It holds a static busybox, /dev/console (so init has a console before devtmpfs is mounted), an
/init script, and optionally kernel modules with their dependencies, read from each module's
.modinfo section (a Debian kernel package carries no modules.dep; depmod makes it at install).
Debian 13's modules are xz-compressed (.ko.xz); they go into the archive decompressed, as .ko.
The /init script mounts proc, sysfs and devtmpfs, loads the modules, prints a marker line, then
either powers off or starts a shell on the console.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import struct
from pathlib import Path

from ..errors import ConfigError, GuestImageError
from ..record import field, record

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
DEFAULT_MARKER = "worldswitch: init reached"


@record
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_newc(entries: list[CpioEntry]) -> bytes:
    """Serialise entries (directories before their contents) as a newc archive."""
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry(TRAILER, 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino, entry.mode, 0, 0, 2 if stat.S_ISDIR(entry.mode) else 1, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def read_cpio_newc(archive: bytes) -> list[CpioEntry]:
    """Parse a newc archive (for tests and for checking what we built)."""
    entries = []
    position = 0
    while position + 110 <= len(archive):
        header = archive[position : position + 110]
        if header[:6] != NEWC_MAGIC:
            raise GuestImageError(f"not a newc cpio archive at offset {position}")
        values = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdevmajor, rdevminor, namesize = values[1], values[6], values[9], values[10], values[11]
        name_at = position + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        data = archive[data_at : data_at + filesize]
        position = data_at + filesize + (-filesize % 4)
        if name == TRAILER:
            break
        entries.append(CpioEntry(name, mode, data, (rdevmajor, rdevminor)))
    return entries


# --- kernel modules ---------------------------------------------------------------------------


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings of a module's .modinfo ELF section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise GuestImageError("not a 64-bit ELF kernel module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", ko, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx]
    names = ko[strtab[4] : strtab[4] + strtab[5]]
    info: dict[str, str] = {}
    for sh in sections:
        name = names[sh[0] : names.index(b"\0", sh[0])].decode()
        if name == ".modinfo":
            for item in ko[sh[4] : sh[4] + sh[5]].split(b"\0"):
                if b"=" in item:
                    key, _, value = item.decode(errors="replace").partition("=")
                    info.setdefault(key, value)
    return info


MODULE_SUFFIXES = (".ko", ".ko.xz")


def module_name(path: Path) -> str:
    """The file name a module has in the archive: `name`.ko, however it was compressed."""
    return path.name[: path.name.rindex(".ko")] + ".ko"


def module_bytes(path: Path) -> bytes:
    """A module's ELF image, decompressed where it was compressed."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        try:
            return lzma.decompress(data, format=lzma.FORMAT_XZ)
        except lzma.LZMAError as error:
            raise GuestImageError(f"kernel module {path} is not a valid xz file: {error}") from None
    return data


def find_modules(modules_dir: Path) -> dict[str, Path]:
    """Module name (dashes as underscores) -> its file, under lib/modules/<version>."""
    found = {}
    for suffix in MODULE_SUFFIXES:
        for path in sorted(modules_dir.rglob("*" + suffix)):
            found[module_name(path)[: -len(".ko")].replace("-", "_")] = path
    return found


def builtin_modules(modules_dir: Path) -> set[str]:
    """The modules built into the kernel (modules.builtin, one path per line), by name."""
    try:
        lines = (modules_dir / "modules.builtin").read_text(errors="replace").splitlines()
    except OSError:
        return set()
    return {Path(line).name.removesuffix(".ko").replace("-", "_") for line in lines if line.endswith(".ko")}


def resolve_modules(wanted: list[str], modules_dir: Path) -> list[Path]:
    """`wanted` and everything they depend on, in load order (dependencies first); those built into
    the kernel need no loading (Debian 13's cloud kernel has virtio_pci built in)."""
    available = find_modules(modules_dir)
    builtin = builtin_modules(modules_dir)
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen or key in builtin:
            return
        if key in chain:
            raise GuestImageError(f"module dependency loop: {' -> '.join(chain + (key,))}")
        if key not in available:
            raise ConfigError(f"no kernel module {name!r} under {modules_dir}")
        for dependency in filter(None, modinfo(module_bytes(available[key])).get("depends", "").split(",")):
            visit(dependency, chain + (key,))
        seen.add(key)
        ordered.append(available[key])

    for name in wanted:
        visit(name, ())
    return ordered


# --- the archive ------------------------------------------------------------------------------


@record
class InitramfsSpec:
    busybox: Path
    modules: list[Path] = field(default_factory=list)  # in load order
    marker: str = DEFAULT_MARKER
    shell: bool = False  # start a shell instead of powering off
    commands: list[str] = field(default_factory=list)  # shell lines run after the marker


def init_script(spec: InitramfsSpec) -> str:
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox --install -s",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev 2>/dev/null",
    ]
    for module in spec.modules:
        name = module_name(module)
        lines.append(f"insmod /lib/modules/{name} || echo 'worldswitch: insmod {name} failed'")
    lines.append(f"echo '{spec.marker}'")
    lines += spec.commands
    if spec.shell:
        lines += ["echo 'worldswitch: busybox shell; poweroff -f ends the VM'", "exec setsid cttyhack sh"]
    else:
        lines.append("poweroff -f")
    return "\n".join(lines) + "\n"


def build_initramfs(spec: InitramfsSpec, compress: bool = True) -> bytes:
    try:
        busybox = spec.busybox.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read busybox {spec.busybox}: {error.strerror}") from None
    if busybox[:4] != b"\x7fELF":
        raise ConfigError(f"{spec.busybox} is not an ELF executable")
    if "'" in spec.marker:
        raise ConfigError("the init marker may not contain a single quote")
    directory = stat.S_IFDIR | 0o755
    entries = [CpioEntry(name, directory) for name in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                                                        "tmp", "root", "lib", "lib/modules")]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("init", stat.S_IFREG | 0o755, init_script(spec).encode()),
    ]
    for module in spec.modules:
        entries.append(CpioEntry(f"lib/modules/{module_name(module)}", stat.S_IFREG | 0o644, module_bytes(module)))
    archive = cpio_newc(entries)
    return gzip.compress(archive, compresslevel=6, mtime=0) if compress else archive
