"""Disk images (worldswitch/devices/disk/): qcow2 read and written by worldswitch, with qemu-img as the
reference implementation of the format: it makes the images (plain, version 2, compressed, with
backing files), `qemu-img check` must find them clean after worldswitch wrote to them, and
`qemu-img convert -O raw` must give back exactly the bytes worldswitch says the guest sees. Every
feature worldswitch does not implement is refused by name, one test each."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from worldswitch.devices.disk.opener import open_disk
from worldswitch.devices.disk.qcow2 import create_qcow2
from worldswitch.errors import ConfigError
from worldswitch.vmm.config import DiskConfig
from worldswitch.vmm.result import StopReason

from .helpers import run_guest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils is not installed (.ci/run installs it)")
MIB = 1 << 20


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make(path: Path, size: str = "8M", *options: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), size)
    return path


def read(image, offset: int, length: int) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray(length)
    # two buffers, split off the sector grid, as a guest's scatter list may be
    image.readv([memoryview(out)[: length // 3], memoryview(out)[length // 3 :]], offset)
    return bytes(out)


def write(image, offset: int, data: bytes) -> None:  # type: ignore[no-untyped-def]
    image.writev([memoryview(bytearray(data[:100])), memoryview(bytearray(data[100:]))], offset)


def as_raw(path: Path) -> bytes:
    out = path.with_suffix(".converted")
    qemu_img("convert", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def check_clean(path: Path) -> None:
    done = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "No errors were found" in done.stdout, done.stdout + done.stderr
    assert "leaked" not in done.stdout, done.stdout


def random_writes(image, model: bytearray, rounds: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    for _ in range(rounds):
        length = rng.choice([512, 4096, 65536, 65536 + 512, 3 * 65536 + 1024])
        offset = rng.randrange(0, (len(model) - length) // 512) * 512
        data = rng.randbytes(length)
        write(image, offset, data)
        model[offset : offset + length] = data


def test_what_qemu_img_made_reads_and_writes_and_stays_clean(tmp_path: Path) -> None:
    path = make(tmp_path / "disk.qcow2")
    model = bytearray(8 * MIB)
    image = open_disk(str(path), read_only=False)
    assert image.format == "qcow2" and image.size == 8 * MIB and not image.can_discard
    assert read(image, 0, 4096) == bytes(4096)
    random_writes(image, model, 60, seed=1)
    assert read(image, 0, 8 * MIB) == bytes(model)
    image.close()
    check_clean(path)
    assert as_raw(path) == bytes(model)
    again = open_disk(str(path), read_only=True)  # what was written is there after reopening
    assert read(again, 0, 8 * MIB) == bytes(model)
    again.close()


def written_and_checked(path: Path, model: bytearray, rounds: int, seed: int) -> None:
    """Random writes into the image as into `model`; then qemu-img finds it clean and reads `model`."""
    image = open_disk(str(path), read_only=False)
    random_writes(image, model, rounds, seed)
    image.close()
    check_clean(path)
    assert as_raw(path) == bytes(model)


def test_version_2_images(tmp_path: Path) -> None:
    written_and_checked(make(tmp_path / "v2.qcow2", "4M", "-o", "compat=0.10"), bytearray(4 * MIB), 30, seed=2)


def test_a_backing_file_shows_through_where_the_overlay_has_nothing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    model = bytearray(random.Random(3).randbytes(4 * MIB))
    base.write_bytes(bytes(model))
    overlay = make(tmp_path / "overlay.qcow2", "6M", "-b", "base.raw", "-F", "raw")  # relative to the overlay
    image = open_disk(str(overlay), read_only=False)
    model += bytes(2 * MIB)  # beyond the backing file: zeros
    assert read(image, 0, 6 * MIB) == bytes(model)
    random_writes(image, model, 40, seed=4)  # partial clusters: the rest comes from the base
    assert read(image, 0, 6 * MIB) == bytes(model)
    image.close()
    check_clean(overlay)
    assert as_raw(overlay) == bytes(model)
    assert base.read_bytes() == bytes(random.Random(3).randbytes(4 * MIB))  # the base is never written


def test_a_compressed_qcow2_base_under_a_qcow2_overlay_and_writes_over_compressed_clusters(tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    rng = random.Random(5)
    data = bytearray()
    for _ in range(64):  # compressible: every cluster of a few repeated bytes
        data += bytes([rng.randrange(256)]) * 32768 + rng.randbytes(32768)
    source.write_bytes(bytes(data))
    compressed = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(source), str(compressed))
    overlay = make(tmp_path / "top.qcow2", "4M", "-b", str(compressed), "-F", "qcow2")
    image = open_disk(str(overlay), read_only=True)
    assert read(image, 0, 4 * MIB) == bytes(data)
    image.close()
    # writing into the compressed image itself: each written cluster leaves its compressed home
    written_and_checked(compressed, bytearray(data), 30, seed=6)


def test_a_disk_worldswitch_creates_is_what_qemu_img_expects(tmp_path: Path) -> None:
    path = tmp_path / "new.qcow2"
    create_qcow2(str(path), 3 << 30)
    info = qemu_img("info", "--output=json", str(path))
    assert '"virtual-size": 3221225472' in info and '"format": "qcow2"' in info
    check_clean(path)
    model = bytearray(3 << 30)
    image = open_disk(str(path), read_only=False)
    for offset in (0, 1 << 30, (3 << 30) - 65536):  # far apart: three L2 tables
        write(image, offset, b"x" * 65536)
        model[offset : offset + 65536] = b"x" * 65536
    image.close()
    check_clean(path)
    with pytest.raises(ConfigError, match="exists"):
        create_qcow2(str(path), 1 << 20)
    assert subprocess.run([sys.executable, "-m", "worldswitch", "disk", "create", str(tmp_path / "cli.qcow2"), "64M"],
                          capture_output=True, timeout=60).returncode == 0
    check_clean(tmp_path / "cli.qcow2")


def _set_header_bits(path: Path, at: int, bits: int) -> None:
    with open(path, "r+b") as file:
        file.seek(at)
        value = struct.unpack(">Q", file.read(8))[0] | bits
        file.seek(at)
        file.write(struct.pack(">Q", value))


@pytest.mark.parametrize("make_image, read_only, message", [
    (lambda p: make(p, "1M", "-o", "compression_type=zstd"), True, "a compression type other than zlib"),
    (lambda p: make(p, "1M", "-o", "extended_l2=on"), True, "extended L2 entries"),
    (lambda p: make(p, "1M", "-o", f"data_file={p.with_suffix('.data')}"), True, "an external data file"),
    # SHA-512: qemu-img times its first 32,768 PBKDF2 rounds by the thread's CPU time and gives up when
    # that reads 0 ms; SHA-256's take 7 ms here, often within one accounting tick (8 of 30 creates
    # failed), SHA-512's 18 ms (0 of 40 failed)
    (lambda p: make(p, "1M", "--object", "secret,id=s0,data=pw", "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.hash-alg=sha512"), True, "is encrypted (LUKS)"),
    (lambda p: (make(p, "1M"), _set_header_bits(p, 72, 1)), True, "the dirty bit"),
    (lambda p: (make(p, "1M"), _set_header_bits(p, 72, 2)), True, "the corrupt bit"),
    (lambda p: (make(p, "1M"), _set_header_bits(p, 72, 1 << 40)), True, "unknown incompatible feature bit 40"),
    (lambda p: make(p, "1M", "-o", "refcount_bits=8"), False, "8-bit entries"),
    (lambda p: (make(p, "1M"), qemu_img("snapshot", "-c", "first", str(p))), False, "1 internal snapshots"),
    (lambda p: make(p, "1M", "-b", p.name, "-F", "qcow2", "-u"), True, "backing files deep (a loop?)"),
])
def test_what_is_not_implemented_is_refused_by_name(tmp_path: Path, make_image, read_only: bool, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "image.qcow2"
    make_image(path)
    with pytest.raises(ConfigError) as caught:
        open_disk(str(path), read_only=read_only)
    assert message in str(caught.value) and str(path) in str(caught.value)
    if not read_only and "snapshot" in message:  # what cannot be written can still be read
        open_disk(str(path), read_only=True).close()


def test_a_probed_raw_image_keeps_its_guest_from_making_it_a_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "raw.img"
    path.write_bytes(bytes(MIB))
    image = open_disk(str(path), read_only=False)
    assert image.format == "raw"
    with pytest.raises(PermissionError):
        write(image, 0, b"QFI\xfb" + bytes(508))
    write(image, 512, b"QFI\xfb" + bytes(508))  # anywhere else is the guest's business
    image.close()
    named = open_disk(str(path), read_only=False, format="raw")  # the user said raw: nothing to fear
    write(named, 0, b"QFI\xfb" + bytes(508))
    named.close()
    assert path.read_bytes()[:4] == b"QFI\xfb"


@pytest.mark.kvm
def test_a_guest_driver_on_a_qcow2_disk(tmp_path: Path) -> None:
    """The vblk guest's test on a qcow2 image with a raw backing file: sector 0 comes from the base,
    the guest's writes land in the overlay, and qemu-img finds the overlay clean."""
    base = tmp_path / "base.raw"
    sector0 = b"worldswitch disk 0 sector 0"
    base.write_bytes(sector0 + bytes((8 << 20) - len(sector0)))
    overlay = make(tmp_path / "disk.qcow2", "8M", "-b", "base.raw", "-F", "raw")
    run = run_guest("vblk", "test", disk=[DiskConfig(str(overlay), serial="ws-qcow2")])
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    passed, capacity, _serial, _ = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert passed == 7 and capacity == (8 << 20) // 512
    check_clean(overlay)
    assert as_raw(overlay)[8 * 512 : 8 * 512 + 4] == bytes([3, 10, 17, 24])  # the guest's pattern
    assert base.read_bytes()[8 * 512 : 8 * 512 + 4] == bytes(4)
    assert os.path.getsize(overlay) < 1 << 20  # one data cluster and an L2 table, not the whole disk
