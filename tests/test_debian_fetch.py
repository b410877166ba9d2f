"""Fetching Debian (vmx/debian.py) without the network: where a release's apt state goes, what apt is
told, and where an unpacked package keeps busybox and the modules (Debian 13's merged /usr)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from worldswitch.errors import ConfigError
from worldswitch.vmx import debian
from worldswitch.vmx.debian import ARCHIVE_KEYRING, MIRROR, apt_options, fetch_debian, find_extracted, release_cache


def test_a_release_gets_an_apt_of_its_own_in_its_cache(tmp_path: Path) -> None:
    assert apt_options(tmp_path, None) == []  # the host's own sources and state
    if not ARCHIVE_KEYRING.exists():
        pytest.skip("debian-archive-keyring is not installed")
    options = apt_options(tmp_path / "debian-trixie", "trixie")
    sources = tmp_path / "debian-trixie" / "apt" / "sources.list"
    assert sources.read_text() == f"deb [signed-by={ARCHIVE_KEYRING}] {MIRROR} trixie main\n"
    settings = dict(option.split("=", 1) for option in options[1::2])
    assert settings["Dir::Etc::SourceList"] == str(sources) and settings["Dir::State::Status"] == "/dev/null"
    assert Path(settings["Dir::State::Lists"], "partial").is_dir()  # apt's own, not the host's
    assert Path(settings["Dir::Cache"]).parent == sources.parent
    assert release_cache(tmp_path / "debian", "trixie") == tmp_path / "debian-trixie"
    assert release_cache(tmp_path / "debian", None) == tmp_path / "debian"


def test_an_unknown_release_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown Debian release 'potato'"):
        apt_options(tmp_path, "potato")
    assert list(tmp_path.iterdir()) == []


def test_a_mirror_that_cannot_be_reached_is_named_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apt-get update exits 0 when its indexes fail to download; the fetch must say what failed, not
    that apt-cache knows no kernel. A local port that refuses connections stands for the mirror."""
    if not ARCHIVE_KEYRING.exists() or shutil.which("apt-get") is None:
        pytest.skip("needs apt-get and debian-archive-keyring")
    monkeypatch.setattr(debian, "MIRROR", "http://127.0.0.1:9/debian")
    refused = r"update failed: E: Failed to fetch http://127\.0\.0\.1:9/debian/dists/trixie/"
    with pytest.raises(ConfigError, match=refused):
        fetch_debian(tmp_path / "debian-trixie", release="trixie")


@pytest.mark.parametrize("usr", ["", "usr/"], ids=["debian-12", "debian-13"])
def test_busybox_and_the_modules_are_found_with_and_without_merged_usr(tmp_path: Path, usr: str) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.12.0-cloud-amd64").write_bytes(b"kernel")
    assert find_extracted(tmp_path) is None  # no busybox yet
    (tmp_path / f"{usr}bin").mkdir(parents=True)
    (tmp_path / f"{usr}bin" / "busybox").write_bytes(b"\x7fELF")
    (tmp_path / f"{usr}lib" / "modules" / "6.12.0-cloud-amd64").mkdir(parents=True)
    found = find_extracted(tmp_path)
    assert found is not None and found.busybox == tmp_path / f"{usr}bin" / "busybox"
    assert found.modules == tmp_path / f"{usr}lib" / "modules" / "6.12.0-cloud-amd64"
    assert found.version == "6.12.0-cloud-amd64"


def test_debian_14s_kernel_is_found_where_its_linux_binary_package_puts_it(tmp_path: Path) -> None:
    """Debian 14 ships the image as /usr/lib/modules/V/vmlinuz (linux-binary-V), not /boot/vmlinuz-V."""
    modules = tmp_path / "usr" / "lib" / "modules" / "7.2.12+deb14-cloud-amd64"
    modules.mkdir(parents=True)
    (modules / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "usr" / "bin").mkdir()
    (tmp_path / "usr" / "bin" / "busybox").write_bytes(b"\x7fELF")
    found = find_extracted(tmp_path)
    assert found is not None and found.kernel == modules / "vmlinuz" and found.modules == modules
    assert found.version == "7.2.12+deb14-cloud-amd64"
