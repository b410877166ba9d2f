"""A run's settings, from one schema: what the machine is (`MachineConfig`) and how the session
drives it (`SessionConfig`). The `worldswitch run`/`restore` flags, the machine-file keys and the
Python API's keywords are all derived from the two records' option fields (worldswitch/options.py),
so an option is added, renamed or documented in one place."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from ..options import COUNT, FLAG, IDENTITY, PATH, SECONDS, Described, Shape, backend, choice, described, option
from ..record import fields, record
from ..vmm.config import MachineConfig
from ..vmm.trace import DEFAULT_LIMIT as DEFAULT_TRACE_LIMIT


@record
class SessionConfig:
    """How `worldswitch run` drives a machine: the console, limits, reports, the control socket and
    the sandbox. Each field is an option, as MachineConfig's are."""

    timeout: float | None = option(None, kind=SECONDS, metavar="SECONDS", api=False,
                                   help="stop the guest if it has not ended after this long")
    serial: str = option("stdio", kind=backend("stdio", "none"), metavar="BACKEND", api=False,
                         help="the console: stdio (default), file:PATH or none")
    reboot: bool = option(False, kind=FLAG, api=False,
                          help="when the guest resets, start it again instead of ending")
    control: str | None = option(None, kind=PATH, metavar="PATH",
                                 help="the control socket (default $XDG_RUNTIME_DIR/worldswitch/PID.sock, "
                                      "or /tmp/worldswitch-UID/)")
    on_panic: str = option("stop", kind=choice("stop", "pause", "continue"), api=False,
                           help="when the guest kernel panics: end the VM (default), pause it for inspection "
                                "through the control socket, or let it be")
    stats: bool = option(False, kind=FLAG, api=False, help="print the full world-switch table at exit")
    stats_json: str | None = option(None, kind=PATH, metavar="FILE", api=False,
                                    help="write the world-switch statistics as JSON")
    quiet: bool = option(False, kind=FLAG, short="-q", api=False,
                         help="print nothing but the guest's output and errors")
    trace: str | None = option(None, kind=PATH, metavar="FILE",
                               help="record every world switch to FILE (see `worldswitch trace`)")
    trace_limit: int = option(DEFAULT_TRACE_LIMIT, kind=COUNT, metavar="N",
                              help=f"record at most N world switches (default {DEFAULT_TRACE_LIMIT}, 32 bytes each)")
    sandbox: bool = option(True, kind=FLAG, api=False,
                           help="run the VMX with every privilege it started with (by default, once the machine is "
                                "built, it drops capabilities and runs under a seccomp allow-list)")
    jail: str | None = option(None, kind=PATH, metavar="DIR", api=False,
                              help="as root: chroot into DIR after set-up and run as --uid/--gid "
                                   "(paths named later, snapshots and --stats-json, are then inside DIR)")
    uid: int | None = option(None, kind=IDENTITY, metavar="N", api=False, help="the user a jailed VMX runs as")
    gid: int | None = option(None, kind=IDENTITY, metavar="N", api=False, help="the group a jailed VMX runs as")


MACHINE_OPTIONS = tuple(described(MachineConfig))
SESSION_OPTIONS = tuple(described(SessionConfig))
OPTIONS = {entry.name: entry for entry in (*MACHINE_OPTIONS, *SESSION_OPTIONS)}
PROGRAM_KEYS = tuple(entry.name for entry in MACHINE_OPTIONS if entry.option.program)
API_OPTIONS = tuple(entry.name for entry in OPTIONS.values() if entry.option.api)


@record
class Settings:
    """Everything a run was asked for."""

    machine: MachineConfig
    session: SessionConfig


# --- the command line --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, options: tuple[Described, ...]) -> None:
    """One flag per option (the parser's default must be argparse.SUPPRESS: only what the user typed
    is set, so it wins over a machine file and leaves the rest alone)."""
    programs = parser.add_mutually_exclusive_group()
    for entry in options:
        target: Any = programs if entry.option.program else parser
        flags = [entry.flag, *([entry.option.short] if entry.option.short else [])]
        extra: dict[str, Any] = {}
        if entry.option.kind.shape is Shape.FLAG:  # on by default: the flag (--no-name) turns it off
            extra = {"action": "store_false" if entry.default is True else "store_true", "dest": entry.name}
        else:
            extra = {"metavar": entry.option.metavar or "VALUE"}
            if entry.option.kind.shape is Shape.REPEATED:
                extra["action"] = "append"
            if entry.option.kind.choices:
                extra["choices"] = entry.option.kind.choices
                del extra["metavar"]
        target.add_argument(*flags, help=entry.option.help, **extra)


def given(namespace: argparse.Namespace, options: tuple[Described, ...]) -> dict[str, Any]:
    """The settings the user typed, converted (relative paths stay relative to the working folder)."""
    values = {}
    for entry in options:
        if hasattr(namespace, entry.name):
            values[entry.name] = entry.convert(getattr(namespace, entry.name), None, entry.flag)
    return values


# --- the Python API ----------------------------------------------------------------------------------

def from_keywords(keywords: dict[str, Any]) -> dict[str, Any]:
    """Machine(...)'s option keywords, converted as the command line's would be ("512M", "a.img,ro")."""
    values = {}
    for name, raw in keywords.items():
        entry = OPTIONS.get(name)
        if entry is None or not entry.option.api:
            raise ConfigError(f"Machine() has no option {name!r} (options: {', '.join(API_OPTIONS)})")
        values[name] = entry.convert(raw, None, name)
    return values


# --- layers: defaults, a machine file, the command line ----------------------------------------------

def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Every option's default, overlaid by each layer in turn. Choosing a program in a later layer
    (say --guest on the command line) drops the program an earlier layer chose (the file's kernel)."""
    settings = {name: entry.default for name, entry in OPTIONS.items()}
    for layer in layers:
        if any(layer.get(key) for key in PROGRAM_KEYS):
            for key in PROGRAM_KEYS:
                settings[key] = None
            if not layer.get("kernel"):
                settings["initrd"] = None
        settings.update(layer)
    return settings


def settings_of(values: dict[str, Any]) -> Settings:
    """Merged values as the two configurations (a program contradiction is refused here)."""
    machine = MachineConfig(**_pick(values, MachineConfig))
    machine.program()
    return Settings(machine, SessionConfig(**_pick(values, SessionConfig)))


def _pick(values: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {field.name for field in fields(cls)}
    return {name: value for name, value in values.items() if name in names}

