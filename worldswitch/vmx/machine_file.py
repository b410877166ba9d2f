"""Machine files: a VM described in TOML, one key per `worldswitch run` option (vmx/settings.py).

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
from .settings import OPTIONS, merge, settings_of


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
    unknown = sorted(set(data) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"{file}: unknown key {unknown[0]!r} (known: {', '.join(OPTIONS)})")
    values = {key: OPTIONS[key].convert(raw, file.parent, f"{file}: {key}") for key, raw in data.items()}
    try:
        settings_of(merge(values))  # a kernel and a guest at once
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from None
    return values
