"""Machine files: a VM described in TOML, one key per `worldswitch run` flag.

    # web.toml
    memory = "512M"
    cpus = 2
    kernel = "vmlinuz"             # paths are relative to this file
    initrd = "initrd.img"
    append = "console=ttyS0"
    disk = ["root.img", { path = "data.img", read_only = true, serial = "data" }]
    net = ["tap=tap0,mac=52:54:00:12:34:56"]
    rng = true
    timeout = 600

Unknown keys and bad values are refused with the key's name and the reason. Flags given on the
command line win over the file (`worldswitch run web.toml --cpus 1`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..vmm.config import DiskConfig, MachineConfig, NetConfig
from ..vmm.defaults import DEFAULT_CMDLINE
from ..vmm.trace import DEFAULT_LIMIT as DEFAULT_TRACE_LIMIT
from .units import parse_seconds, parse_size

# key -> (kind, default). The key is the flag's name with "_" for "-"; kinds: str, path, int, bool,
# size, seconds, disks, nets, serial, choice:a|b.
KEYS: dict[str, tuple[str, Any]] = {
    "memory": ("size", None),
    "cpus": ("int", 1),
    "guest": ("str", None),
    "elf": ("path", None),
    "args": ("str", ""),
    "kernel": ("path", None),
    "initrd": ("path", None),
    "append": ("str", DEFAULT_CMDLINE),
    "decompress": ("choice:auto|host|guest", "auto"),
    "reboot": ("bool", False),
    "disk": ("disks", []),
    "net": ("nets", []),
    "rng": ("bool", False),
    "vconsole": ("vconsole", None),
    "packed_queues": ("bool", False),
    "timeout": ("seconds", None),
    "serial": ("serial", "stdio"),
    "stats": ("bool", False),
    "stats_json": ("path", None),
    "quiet": ("bool", False),
    "trace": ("path", None),
    "trace_limit": ("int", DEFAULT_TRACE_LIMIT),
    "control": ("path", None),
    "on_panic": ("choice:stop|pause|continue", "stop"),
    "sandbox": ("bool", True),
    "jail": ("path", None),
    "uid": ("int", None),
    "gid": ("int", None),
}
PROGRAM_KEYS = ("guest", "elf", "kernel")


def _options(spec: str) -> tuple[str, dict[str, str]]:
    first, *rest = spec.split(",")
    options: dict[str, str] = {}
    for item in rest:
        key, _, value = item.partition("=")
        options[key] = value
    return first, options


def parse_disk(spec: str, base: Path | None = None) -> DiskConfig:
    """PATH[,ro[,shared]][,serial=ID], the --disk syntax; a relative PATH is taken from `base`."""
    path, options = _options(spec)
    unknown = set(options) - {"ro", "shared", "serial"}
    if not path or unknown:
        raise ConfigError(f"--disk {spec!r}: expected PATH[,ro[,shared]][,serial=ID]" + (f", not {', '.join(sorted(unknown))}" if unknown else ""))
    return disk_config(str(base / path) if base else path, "ro" in options, options.get("serial") or None, "shared" in options)


def disk_config(path: str, read_only: bool, serial: str | None, shared: bool) -> DiskConfig:
    if shared and not read_only:
        raise ConfigError(f"disk {path}: shared is for read-only disks (ro,shared): two writers would corrupt it")
    return DiskConfig(path, read_only, serial, shared)


def parse_net(spec: str) -> NetConfig:
    """tap=NAME[,mac=MAC], the --net syntax."""
    first, options = _options(spec)
    key, _, tap = first.partition("=")
    unknown = set(options) - {"mac"}
    if key != "tap" or not tap or unknown:
        raise ConfigError(f"--net {spec!r}: expected tap=NAME[,mac=52:54:00:12:34:56]")
    return NetConfig(tap, options.get("mac"))


def _with_file(spec: str, base: Path) -> str:
    """A back end spec ("stdio", "none", "pty", "file:PATH") with PATH taken from `base`."""
    if spec.startswith("file:"):
        return "file:" + str(base / Path(spec[5:]).expanduser())
    return spec


def convert(key: str, raw: Any, base: Path) -> Any:
    """A machine-file value as the run settings hold it; ConfigError says why it does not fit."""
    kind = KEYS[key][0]
    if kind in ("str", "serial", "vconsole"):
        if not isinstance(raw, str):
            raise ConfigError(f"expected a string, got {type(raw).__name__}")
        if kind == "serial" and not (raw in ("stdio", "none") or raw.startswith("file:")):
            raise ConfigError("expected stdio, none or file:PATH")
        if kind == "vconsole" and not (raw in ("pty", "none") or raw.startswith("file:")):
            raise ConfigError("expected pty, none or file:PATH")
        return _with_file(raw, base) if kind != "str" else raw
    if kind == "path":
        if not isinstance(raw, str) or not raw:
            raise ConfigError("expected a path")
        return str(base / Path(raw).expanduser())
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise ConfigError("expected a positive integer")
        return raw
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError("expected true or false")
        return raw
    if kind == "size":
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ConfigError('expected a size such as "512M"')
        return parse_size(str(raw), key)
    if kind == "seconds":
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ConfigError('expected a number of seconds')
        return parse_seconds(str(raw), key)
    if kind.startswith("choice:"):
        choices = kind.split(":", 1)[1].split("|")
        if raw not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}")
        return raw
    if kind == "disks":
        if not isinstance(raw, list):
            raise ConfigError("expected a list of disks")
        disks = []
        for item in raw:
            if isinstance(item, str):
                disks.append(parse_disk(item, base))
            elif isinstance(item, dict):
                unknown = set(item) - {"path", "read_only", "serial", "shared"}
                if unknown or not isinstance(item.get("path"), str) or not item["path"]:
                    raise ConfigError(f"a disk table has a path and optionally read_only, shared and serial, not {sorted(unknown)}")
                if not all(isinstance(item.get(key, False), bool) for key in ("read_only", "shared")) or \
                        not isinstance(item.get("serial", ""), str):
                    raise ConfigError("a disk's read_only and shared are true or false and its serial a string")
                disks.append(disk_config(str(base / item["path"]), item.get("read_only", False), item.get("serial"),
                                         item.get("shared", False)))
            else:
                raise ConfigError("each disk is a string or a table")
        return disks
    if kind == "nets":
        if not isinstance(raw, list):
            raise ConfigError("expected a list of networks")
        nets = []
        for item in raw:
            if isinstance(item, str):
                nets.append(parse_net(item))
            elif isinstance(item, dict) and isinstance(item.get("tap"), str) and set(item) <= {"tap", "mac"}:
                nets.append(NetConfig(item["tap"], item.get("mac")))
            else:
                raise ConfigError('each network is "tap=NAME[,mac=MAC]" or a table with tap and mac')
        return nets
    raise AssertionError(kind)


def load_machine_file(path: str | Path) -> dict[str, Any]:
    """The settings a machine file gives (only the keys it has), converted and checked."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"machine file {file} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"machine file {file} is a directory") from None
    except OSError as error:
        raise ConfigError(f"cannot read machine file {file}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"machine file {file} is not text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file} is not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"{file}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    values = {}
    for key, raw in data.items():
        try:
            values[key] = convert(key, raw, file.parent)
        except ConfigError as error:
            raise ConfigError(f"{file}: {key}: {error}") from None
    try:
        machine_config(merge(values)).program()  # a kernel and a guest at once
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from None
    return values


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Every key's default, overlaid by each layer in turn. Choosing a program in a later layer
    (say --guest on the command line) drops the program an earlier layer chose (the file's kernel)."""
    settings = {key: default for key, (_kind, default) in KEYS.items()}
    for layer in layers:
        if any(layer.get(key) for key in PROGRAM_KEYS):
            for key in PROGRAM_KEYS:
                settings[key] = None
            if not layer.get("kernel"):
                settings["initrd"] = None
        settings.update(layer)
    return settings


def machine_config(settings: dict[str, Any]) -> MachineConfig:
    return MachineConfig(
        memory=settings["memory"], cpus=settings["cpus"], guest=settings["guest"], elf=settings["elf"],
        args=settings["args"], kernel=settings["kernel"], initrd=settings["initrd"], cmdline=settings["append"],
        decompress=settings["decompress"], disks=list(settings["disk"]), nets=list(settings["net"]),
        rng=settings["rng"], vconsole=settings["vconsole"], packed_queues=settings["packed_queues"],
    )
