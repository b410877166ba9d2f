from __future__ import annotations

import pytest

from worldswitch.errors import ConfigError
from worldswitch.options import parse_seconds, parse_size


@pytest.mark.parametrize("text,value", [("512M", 512 << 20), ("2G", 2 << 30), ("64MiB", 64 << 20), ("1024k", 1 << 20),
                                        ("256", 256 << 20), ("1.5G", 3 << 29)])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "5X"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_seconds() -> None:
    assert parse_seconds("2.5") == 2.5
    for bad in ("soon", "0", "-3"):
        with pytest.raises(ConfigError):
            parse_seconds(bad)
