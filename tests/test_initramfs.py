"""The busybox initramfs as the kernel will unpack it (newc, Documentation/driver-api/early-userspace/
buffer-format.rst), read back entry by entry: directories before their contents, the console device
for the first process, an executable /init that prints the marker, every module in load order."""

from __future__ import annotations

import gzip
import lzma
import stat
from pathlib import Path

import pytest

from worldswitch.boot.initramfs import (CpioEntry, InitramfsSpec, build_initramfs, cpio_newc, modinfo, read_cpio_newc,
                                        resolve_modules)
from worldswitch.errors import ConfigError, GuestImageError

from .helpers import DEBIAN_13, DEBIAN_14, debian


def fake_busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return path


def test_what_the_kernel_unpacks(tmp_path: Path) -> None:
    module = tmp_path / "virtio_blk.ko"
    module.write_bytes(b"\x7fELF module")
    spec = InitramfsSpec(fake_busybox(tmp_path), [module], marker="MARK", commands=["echo hi"])
    archive = gzip.decompress(build_initramfs(spec))
    assert archive[:6] == b"070701" and len(archive) % 4 == 0
    entries = {entry.name: entry for entry in read_cpio_newc(archive)}
    names = list(entries)
    for name, entry in entries.items():  # every parent before its child
        parent = name.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(name)
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)
    assert stat.S_ISLNK(entries["bin/sh"].mode) and entries["bin/sh"].data == b"busybox"
    init = entries["init"]
    assert stat.S_IMODE(init.mode) == 0o755 and init.data.startswith(b"#!/bin/busybox sh\n")
    lines = init.data.decode().splitlines()
    assert lines.index("insmod /lib/modules/virtio_blk.ko || echo 'worldswitch: insmod virtio_blk.ko failed'") \
        < lines.index("echo 'MARK'") < lines.index("echo hi") < lines.index("poweroff -f")
    assert entries["lib/modules/virtio_blk.ko"].data == b"\x7fELF module"


def test_xz_compressed_modules_go_in_decompressed_and_built_in_ones_not_at_all(tmp_path: Path) -> None:
    """Debian 13's modules are .ko.xz, and its cloud kernel has virtio_pci built in (modules.builtin):
    busybox's insmod gets the plain ELF, under its .ko name; a built-in module needs no loading."""
    modules = tmp_path / "lib" / "modules" / "6.12.0"
    (modules / "kernel" / "drivers").mkdir(parents=True)
    blk = modules / "kernel" / "drivers" / "virtio_blk.ko.xz"
    blk.write_bytes(lzma.compress(b"\x7fELF blk", format=lzma.FORMAT_XZ))
    (modules / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio.ko\n")
    assert resolve_modules(["virtio_pci", "virtio"], modules) == []
    archive = build_initramfs(InitramfsSpec(fake_busybox(tmp_path), [blk]), compress=False)
    entries = {entry.name: entry for entry in read_cpio_newc(archive)}
    assert entries["lib/modules/virtio_blk.ko"].data == b"\x7fELF blk" and "lib/modules/virtio_blk.ko.xz" not in entries
    assert "insmod /lib/modules/virtio_blk.ko ||" in entries["init"].data.decode()
    blk.write_bytes(b"not xz")
    with pytest.raises(GuestImageError, match="virtio_blk.ko.xz is not a valid xz file"):
        build_initramfs(InitramfsSpec(fake_busybox(tmp_path), [blk]))


@pytest.mark.parametrize("release", [DEBIAN_13, DEBIAN_14], ids=["debian-13", "debian-14"])
def test_debians_virtio_modules_resolve_from_its_packages(release: str) -> None:
    """The real thing: Debian 13's cloud kernel package (merged /usr: usr/lib/modules), and 14's, whose
    modules and modules.builtin come in two packages of their own (linux-modules-V, linux-base-V)."""
    linux = debian(release)
    resolved = resolve_modules(["virtio_pci", "virtio_blk", "virtio_net"], linux.modules)
    names = [path.name for path in resolved]
    assert names[-1] == "virtio_net.ko.xz" and "virtio_blk.ko.xz" in names
    assert not any(path.name.startswith("virtio_pci") for path in resolved)  # built in
    assert modinfo(lzma.decompress(resolved[-1].read_bytes()))["name"] == "virtio_net"


def test_the_archive_reads_back_as_written() -> None:
    written = [CpioEntry("d", stat.S_IFDIR | 0o755), CpioEntry("d/f", stat.S_IFREG | 0o600, b"x" * 5),
               CpioEntry("d/e", stat.S_IFREG | 0o644)]
    assert read_cpio_newc(cpio_newc(written)) == written
    with pytest.raises(GuestImageError, match="not a newc cpio archive"):
        read_cpio_newc(b"x" * 200)


def test_what_cannot_be_an_initramfs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read busybox"):
        build_initramfs(InitramfsSpec(tmp_path / "missing"))
    text = tmp_path / "busybox.txt"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match="not an ELF executable"):
        build_initramfs(InitramfsSpec(text))
    with pytest.raises(ConfigError, match="single quote"):
        build_initramfs(InitramfsSpec(fake_busybox(tmp_path), marker="it's"))
