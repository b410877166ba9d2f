"""Parsing the sizes and durations users type."""

from __future__ import annotations

import math
import re

from ..errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_FACTORS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """'512M', '2G', '64MiB', '1024k'; a bare number means MiB, as in QEMU's -m."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size (use e.g. 512M or 2G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = int(number * _FACTORS[unit])
    if value <= 0:
        raise ConfigError(f"{what} must be positive")
    return value


def parse_seconds(text: str, what: str = "duration") -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive, finite number of seconds")
    return value
