"""GRUB's core image unpacked by the VMM (vmm/x86/grub_core.py) as GRUB's own decoder unpacks it: Debian's
lzma_decompress.img, placed where diskboot.img loads it, runs its startup's call of the decoder on /dev/kvm
twice from the same state, once through the decoder and once stopped at the call and served."""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from worldswitch.driver import structs as s
from worldswitch.driver.constants import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, ExitReason
from worldswitch.driver.exits import IoOut, decode_exit
from worldswitch.driver.kvm import Vcpu
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.x86.copyloop import FLAG_AF, FLAG_CF, FLAG_DF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF
from worldswitch.vmm.x86.grub_core import (CORE_START, DECODERS, CoreDecoder, find_call_site, find_core_decoder,
                                           serve_core_decoder)

from .helpers import CACHE, finish_exit

DECOMPRESSOR = Path("/usr/lib/grub/i386-pc/lzma_decompress.img")  # grub-pc-bin, the host's
DEBIAN_12 = CoreDecoder(site=0x89B6, call=0x89CB, stream=0x8D20, size_field=0x820C)  # grub 2.06-13+deb12u2


class GrubBuild(NamedTuple):
    """A grub-pc-bin package whose decoder DECODERS names: fetched (MIT code does not carry GRUB's
    GPL binaries), checked against its SHA-256, and its call site as read from its disassembly."""

    url: str
    sha256: str
    decoder: CoreDecoder


BUILDS = {
    "debian-13": GrubBuild("http://deb.debian.org/debian/pool/main/g/grub2/grub-pc-bin_2.12-9+deb13u4_amd64.deb",
                           "f8f78f08e57bb90cb030d70303286bc71a759bad1ec89eac2e3e20916d5c42cd",
                           CoreDecoder(site=0x89C2, call=0x89D7, stream=0x8D20, size_field=0x820C)),
    # Debian 11's 2.06-3~deb11u6 has the same bytes from the call site to the stream
    "ubuntu-22.04": GrubBuild("http://archive.ubuntu.com/ubuntu/pool/main/g/grub2/grub-pc-bin_2.06-2ubuntu7.2_amd64.deb",
                              "51e3fc7d1758f9d72f09e12bfe51295d3f8a8da49b018a81e45c6d2f127d60c2",
                              CoreDecoder(site=0x89BA, call=0x89CF, stream=0x8D20, size_field=0x820C)),
    "ubuntu-24.04": GrubBuild("http://archive.ubuntu.com/ubuntu/pool/main/g/grub2/grub-pc-bin_2.12-1ubuntu7.3_amd64.deb",
                              "698d80bc51c0c593fbc829758365a0e4bce96819e2c8c754ae77dfe39b0388df",
                              CoreDecoder(site=0x89B2, call=0x89C7, stream=0x8D10, size_field=0x820C)),
}
OUTPUT = 0x100000
STACK = 0x7000
SCRATCH = 0x1F36 * 4  # the decoder's probabilities, after its output
RAM = 2 << 20  # the flat32 fixture's (conftest.py)
ARITHMETIC = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF


def _fetched(name: str, build: GrubBuild) -> Path:
    """The build's lzma_decompress.img, from .cache/grub or downloaded there. Skips where the mirror
    cannot be reached or no longer has that version (a point release replaces it)."""
    image = CACHE / "grub" / name / "lzma_decompress.img"
    if image.exists():
        return image
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not available to unpack grub-pc-bin")
    try:
        with urllib.request.urlopen(build.url, timeout=60) as response:
            package = response.read()
    except (urllib.error.URLError, OSError) as error:
        pytest.skip(f"{build.url}: {error}")
    assert hashlib.sha256(package).hexdigest() == build.sha256, f"{build.url} is not the package pinned here"
    unpacked = image.parent / "root"
    unpacked.mkdir(parents=True, exist_ok=True)
    deb = image.parent / "grub-pc-bin.deb"
    deb.write_bytes(package)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    (unpacked / "usr/lib/grub/i386-pc/lzma_decompress.img").rename(image)
    shutil.rmtree(unpacked)
    deb.unlink()
    return image


@pytest.fixture(params=["host", *BUILDS])
def decompressor(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(name, lzma_decompress.img) of the host's grub-pc-bin (whatever version), and of each pinned build."""
    if request.param == "host":
        if not DECOMPRESSOR.exists():
            pytest.skip("grub-pc-bin is not installed")
        return request.param, DECOMPRESSOR
    return request.param, _fetched(request.param, BUILDS[request.param])


def _payload() -> bytes:
    """What the core unpacks to: here `out %al, $0x10` first, where the startup jumps after the call."""
    words = b" ".join(b"grub%d" % (i * i % 97) for i in range(600))
    return b"\xe6\x10" + words


def _compressed(payload: bytes) -> bytes:
    filters = [{"id": lzma.FILTER_LZMA1, "lc": 3, "lp": 0, "pb": 2, "dict_size": 1 << 16}]
    return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=filters)


def _prepare(vcpu: Vcpu, memory: GuestMemory, image: Path, payload: bytes, stream: bytes) -> CoreDecoder:
    """A grub-pc-bin's decompressor where diskboot.img puts it, with `stream` after it."""
    memory.fill(0, RAM)
    memory.write(CORE_START, image.read_bytes())
    found = find_call_site(memory)
    assert found is not None, "no call of the decoder in lzma_decompress.img"
    decoder, _ = found
    memory.write(decoder.size_field, struct.pack("<I", len(payload)))
    memory.write(decoder.stream, stream)
    vcpu.set_regs(s.kvm_regs(rip=decoder.site, rsp=STACK, rflags=2 | FLAG_DF | FLAG_CF))
    return decoder


def _placed(vcpu: Vcpu, memory: GuestMemory, image: Path) -> tuple[bytes, bytes, CoreDecoder]:
    """The core image with a stream of _payload() in place, the vCPU at the call site."""
    payload = _payload()
    stream = _compressed(payload)
    return payload, stream, _prepare(vcpu, memory, image, payload, stream)


def test_the_decoders_known_are_the_builds_tested_and_only_a_known_one_is_found(
        flat32: tuple[Vcpu, GuestMemory], decompressor: tuple[str, Path]) -> None:
    """The VMM stands in for a decoder only where its bytes are those read and tested here (Debian 12's,
    and the pinned builds): another build of GRUB (the host's grub-pc-bin may be newer) keeps its own."""
    vcpu, memory = flat32
    name, image = decompressor
    _, _, decoder = _placed(vcpu, memory, image)
    found = find_call_site(memory)
    assert found is not None
    known = found[1] in DECODERS
    assert find_core_decoder(memory) == (decoder if known else None)
    if name in BUILDS:
        assert known and decoder == BUILDS[name].decoder
    elif known:
        assert decoder == DEBIAN_12


def _ends_in_the_output(vcpu: Vcpu) -> s.kvm_regs:
    assert vcpu.run() == ExitReason.IO  # the startup's jump to the output, which begins with `out`
    assert decode_exit(ExitReason.IO, vcpu.kvm_run, vcpu.run_mmap) == IoOut(0x10, 1, 1, bytes([0xC6]))
    finish_exit(vcpu)
    return vcpu.get_regs()


def _step_to(vcpu: Vcpu, address: int) -> s.kvm_regs:
    """The startup run an instruction at a time to `address` (six instructions from the call site). A
    single step, not the handoff's breakpoint, so that the nested host, whose QEMU ignores L2's
    breakpoints (docs/hosts.md, issue 13), runs this test too."""
    vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
    for _ in range(STEPS):
        regs = vcpu.get_regs()
        if regs.rip == address:
            vcpu.set_guest_debug(0)
            return vcpu.get_regs()  # without the step's TF
        assert vcpu.run() == ExitReason.DEBUG
    raise AssertionError(f"the startup did not reach {address:#x} in {STEPS} instructions")


STEPS = 32


@pytest.mark.kvm
def test_the_served_call_leaves_what_grubs_decoder_leaves(flat32: tuple[Vcpu, GuestMemory], decompressor: tuple[str, Path]) -> None:
    vcpu, memory = flat32
    _, image = decompressor
    payload, stream, decoder = _placed(vcpu, memory, image)  # known or not: the decoder's output is what counts
    ran = _ends_in_the_output(vcpu)  # GRUB's decoder, every instruction
    expected = memory.read(0, RAM)

    _prepare(vcpu, memory, image, payload, stream)
    regs = _step_to(vcpu, decoder.call)
    assert serve_core_decoder(decoder, memory, regs, vcpu.get_sregs()) == len(payload)
    vcpu.set_regs(regs)
    served = _ends_in_the_output(vcpu)

    # The registers the startup goes on with, and DF; the decoder's last arithmetic flags nothing reads.
    names = ("rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
    assert {name: getattr(served, name) & 0xFFFFFFFF for name in names} == \
        {name: getattr(ran, name) & 0xFFFFFFFF for name in names}
    assert served.rflags & ~ARITHMETIC == ran.rflags & ~ARITHMETIC
    # All of RAM but what the decoder alone writes and nobody reads after it: its stack frame, below
    # the startup's, and its probabilities, after the output.
    after = memory.read(0, RAM)
    scratch = [(STACK - 0x1000, STACK - 8), (OUTPUT + len(payload), OUTPUT + len(payload) + SCRATCH)]
    keep = [(0, scratch[0][0]), (scratch[0][1], scratch[1][0]), (scratch[1][1], RAM)]
    assert all(after[start:end] == expected[start:end] for start, end in keep)
    assert after[OUTPUT : OUTPUT + len(payload)] == payload


@pytest.mark.kvm
def test_a_call_the_vmm_cannot_serve_is_left_to_the_decoder(flat32: tuple[Vcpu, GuestMemory], decompressor: tuple[str, Path]) -> None:
    vcpu, memory = flat32
    _, image = decompressor
    payload, _, decoder = _placed(vcpu, memory, image)
    call, stream = decoder.call, decoder.stream
    sregs = vcpu.get_sregs()
    size = len(payload)
    for regs in (s.kvm_regs(rip=call, rsi=stream, rdi=OUTPUT, rcx=size + 100),  # the stream ends before that
                 s.kvm_regs(rip=call, rsi=stream, rdi=RAM - 16, rcx=size),  # the output leaves RAM
                 s.kvm_regs(rip=call, rsi=stream + 1, rdi=OUTPUT, rcx=size),  # not the stream after the decoder
                 s.kvm_regs(rip=call + 1, rsi=stream, rdi=OUTPUT, rcx=size)):  # not at the call
        kept = bytes(regs)
        assert serve_core_decoder(decoder, memory, regs, sregs) is None and bytes(regs) == kept
    memory.write(stream, b"\xff" * 64)  # not LZMA
    assert serve_core_decoder(decoder, memory, s.kvm_regs(rip=call, rsi=stream, rdi=OUTPUT, rcx=size), sregs) is None
    memory.write(call + 20, b"\x90")  # another decoder: not one this module knows
    assert find_core_decoder(memory) is None and find_call_site(memory) is not None
