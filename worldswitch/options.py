"""One description of every option a user sets: the `worldswitch run` flag, the machine-file key and
the `Machine(...)` keyword are all derived from it.

An option is a record field (worldswitch/record.py) whose metadata holds an `Option` (made with `option()`): its kind (how
a value given as text, as TOML or from Python becomes the setting), its help, and how it looks on the
command line. `MachineConfig` (what the machine is) and the VMX's `SessionConfig` (how a run is
driven) are described this way; `vmx/settings.py` derives the parser, the machine-file reader and the
API's keywords from them, and `tests/test_options.py` checks that all three accept the same names.
"""

from __future__ import annotations

import enum
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError
from .record import MISSING, field, fields, record

# --- sizes and durations, as users type them --------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_FACTORS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '2G', '64MiB', '1024k'; a bare number means MiB, as in QEMU's -m."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{text!r} is not a size (use e.g. 512M or 2G)")
    value = int(float(match.group(1)) * _FACTORS[match.group(2).lower()])
    if value <= 0:
        raise ConfigError("a size must be positive")
    return value


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError("expected a positive, finite number of seconds")
    return value


# --- kinds: what a value may be, and how it becomes the setting -------------------------------------

class Shape(enum.Enum):
    """How an option looks on the command line."""

    VALUE = "value"  # --name VALUE
    FLAG = "flag"  # --name (true), or --no-name for an option that is on by default
    REPEATED = "repeated"  # --name VALUE, as often as wanted; a list in a machine file and the API


Convert = Callable[[Any, "Path | None"], Any]  # (raw value, the machine file's folder or None) -> setting


@record(frozen=True)
class Kind:
    convert: Convert
    shape: Shape = Shape.VALUE
    choices: tuple[str, ...] = ()


def _text(raw: Any, base: Path | None) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"expected a string, got {type(raw).__name__}")
    return raw


def _path(raw: Any, base: Path | None) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError("expected a path")
    return str(base / Path(raw).expanduser()) if base is not None else raw


def _integer(raw: Any, minimum: int, expected: str) -> int:
    if isinstance(raw, str) and raw.strip().isdigit():  # as typed on the command line
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise ConfigError(f"expected {expected}")
    return raw


def _count(raw: Any, base: Path | None) -> int:
    return _integer(raw, 1, "a positive integer")


def _identity(raw: Any, base: Path | None) -> int:
    """A user or group ID: 0 is a valid one (what is done with it is for the caller to judge)."""
    return _integer(raw, 0, "a user or group ID (a number, 0 or more)")


def _flag(raw: Any, base: Path | None) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError("expected true or false")
    return raw


def _size(raw: Any, base: Path | None) -> int:
    """Text with a unit ('512M'), or an integer number of bytes (at least 1 MiB, so that a bare 512
    meant as megabytes is refused rather than taken as 512 bytes)."""
    if isinstance(raw, str):
        return parse_size(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1 << 20:
        raise ConfigError('expected a size such as "512M" (or a number of bytes, at least 1 MiB)')
    return raw


def _seconds(raw: Any, base: Path | None) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError("expected a number of seconds")
    return parse_seconds(str(raw))


def choice(*choices: str) -> Kind:
    def convert(raw: Any, base: Path | None) -> str:
        if raw not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}")
        return str(raw)

    return Kind(convert, choices=choices)


def backend(*names: str) -> Kind:
    """A back end: one of `names`, or file:PATH (PATH relative to a machine file's folder)."""
    def convert(raw: Any, base: Path | None) -> str:
        if not isinstance(raw, str) or not (raw in names or raw.startswith("file:")):
            raise ConfigError(f"expected {', '.join(names)} or file:PATH")
        if raw.startswith("file:") and base is not None:
            return "file:" + str(base / Path(raw[5:]).expanduser())
        return raw

    return Kind(convert)


def name_or_path(*names: str) -> Kind:
    """One of `names`, or a path (relative to a machine file's folder)."""
    def convert(raw: Any, base: Path | None) -> str:
        if isinstance(raw, str) and raw in names:
            return raw
        return _path(raw, base)

    return Kind(convert)


def repeated(convert_one: Convert, what: str) -> Kind:
    """A list of items, each converted by `convert_one` (the command line gives one per flag)."""
    def convert(raw: Any, base: Path | None) -> list[Any]:
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)):
            raise ConfigError(f"expected a list of {what}")
        return [convert_one(item, base) for item in raw]

    return Kind(convert, Shape.REPEATED)


TEXT = Kind(_text)
PATH = Kind(_path)
COUNT = Kind(_count)
IDENTITY = Kind(_identity)
FLAG = Kind(_flag, Shape.FLAG)
SIZE = Kind(_size)
SECONDS = Kind(_seconds)


# --- options ----------------------------------------------------------------------------------------

@record(frozen=True)
class Option:
    kind: Kind
    help: str
    metavar: str | None = None
    short: str | None = None  # a one-letter command-line alias (-m)
    program: bool = False  # chooses what boots: at most one of these, and a later layer's choice wins
    api: bool = True  # also a keyword of the Python API's Machine (session options mostly are not)


def option(default: Any = MISSING, *, kind: Kind, help: str, metavar: str | None = None,
           short: str | None = None, program: bool = False, api: bool = True,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A record field described as a user's option."""
    metadata = {"option": Option(kind, help, metavar, short, program, api)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@record(frozen=True)
class Described:
    """One option of a described record: its name (the field's), description and default."""

    name: str
    option: Option
    default: Any

    @property
    def flag(self) -> str:
        """How the user types it: --name, or --no-name for a flag that is on by default."""
        spelled = self.name.replace("_", "-")
        return f"--no-{spelled}" if self.option.kind.shape is Shape.FLAG and self.default is True else f"--{spelled}"

    def convert(self, raw: Any, base: Path | None, where: str) -> Any:
        """The setting for `raw`; a ConfigError names `where` the value came from."""
        try:
            return self.option.kind.convert(raw, base)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None


def described(cls: type) -> Iterator[Described]:
    """The options of a record class whose fields were made with option()."""
    for one in fields(cls):
        if "option" in one.metadata:
            default = one.default_factory() if one.default_factory is not MISSING else one.default
            yield Described(one.name, one.metadata["option"], default)
