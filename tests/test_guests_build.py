"""The shipped guest binaries are what their sources build to."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from worldswitch.guests import BIN_DIR, BUILTIN_GUESTS
from worldswitch.guests.build import MANIFEST, MONITOR, build, toolchain


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def test_every_builtin_guest_is_shipped_and_matches_the_manifest() -> None:
    recorded = manifest()["sha256"]
    assert set(recorded) == {*BUILTIN_GUESTS, MONITOR}
    for name in recorded:
        data = (BIN_DIR / f"{name}.elf").read_bytes()
        assert hashlib.sha256(data).hexdigest() == recorded[name], name


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ld") is None, reason="needs gcc and ld")
def test_rebuilding_gives_the_same_bytes(tmp_path) -> None:
    recorded = manifest()
    local = toolchain()
    if local != recorded["toolchain"]:
        pytest.skip(f"the binaries were built with {recorded['toolchain']}; this host has {local}")
    digests = build(tmp_path)
    assert digests == recorded["sha256"]
    for name in recorded["sha256"]:
        assert (tmp_path / f"{name}.elf").read_bytes() == (BIN_DIR / f"{name}.elf").read_bytes()
