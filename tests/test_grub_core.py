"""GRUB's core image unpacked by the VMM (vmm/x86/grub_core.py) as GRUB's own decoder unpacks it: Debian's
lzma_decompress.img, placed where diskboot.img loads it, runs its startup's call of the decoder on /dev/kvm
twice from the same state, once through the decoder and once stopped at the call and served."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from worldswitch.driver import structs as s
from worldswitch.driver.constants import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, ExitReason
from worldswitch.driver.exits import IoOut, decode_exit
from worldswitch.driver.kvm import Vcpu
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.x86.copyloop import FLAG_AF, FLAG_CF, FLAG_DF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF
from worldswitch.vmm.x86.grub_core import (CORE_START, DECODERS, CoreDecoder, find_call_site, find_core_decoder,
                                           serve_core_decoder)

from .helpers import finish_exit

DECOMPRESSOR = Path("/usr/lib/grub/i386-pc/lzma_decompress.img")  # grub-pc-bin
DEBIAN_12 = CoreDecoder(site=0x89B6, call=0x89CB, stream=0x8D20, size_field=0x820C)  # grub 2.06-13+deb12u2
OUTPUT = 0x100000
STACK = 0x7000
SCRATCH = 0x1F36 * 4  # the decoder's probabilities, after its output
RAM = 2 << 20  # the flat32 fixture's (conftest.py)
ARITHMETIC = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF

pytestmark = pytest.mark.skipif(not DECOMPRESSOR.exists(), reason="grub-pc-bin is not installed")


def _payload() -> bytes:
    """What the core unpacks to: here `out %al, $0x10` first, where the startup jumps after the call."""
    words = b" ".join(b"grub%d" % (i * i % 97) for i in range(600))
    return b"\xe6\x10" + words


def _compressed(payload: bytes) -> bytes:
    filters = [{"id": lzma.FILTER_LZMA1, "lc": 3, "lp": 0, "pb": 2, "dict_size": 1 << 16}]
    return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=filters)


def _prepare(vcpu: Vcpu, memory: GuestMemory, payload: bytes, stream: bytes) -> CoreDecoder:
    """The installed grub-pc-bin's decompressor where diskboot.img puts it, with `stream` after it."""
    memory.fill(0, RAM)
    memory.write(CORE_START, DECOMPRESSOR.read_bytes())
    found = find_call_site(memory)
    assert found is not None, "no call of the decoder in lzma_decompress.img"
    decoder, _ = found
    memory.write(decoder.size_field, struct.pack("<I", len(payload)))
    memory.write(decoder.stream, stream)
    vcpu.set_regs(s.kvm_regs(rip=decoder.site, rsp=STACK, rflags=2 | FLAG_DF | FLAG_CF))
    return decoder


def _placed(vcpu: Vcpu, memory: GuestMemory) -> tuple[bytes, bytes, CoreDecoder]:
    """The core image with a stream of _payload() in place, the vCPU at the call site."""
    payload = _payload()
    stream = _compressed(payload)
    return payload, stream, _prepare(vcpu, memory, payload, stream)


def test_the_decoder_known_is_debian_12s_and_only_a_known_one_is_found(flat32: tuple[Vcpu, GuestMemory]) -> None:
    """The VMM stands in for a decoder only where its bytes are those read and tested here: another
    build of GRUB (the grub-pc-bin installed may be newer) keeps its own decoder."""
    vcpu, memory = flat32
    _, _, decoder = _placed(vcpu, memory)
    found = find_call_site(memory)
    assert found is not None
    known = found[1] in DECODERS
    assert find_core_decoder(memory) == (decoder if known else None)
    if known:
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
def test_the_served_call_leaves_what_grubs_decoder_leaves(flat32: tuple[Vcpu, GuestMemory]) -> None:
    vcpu, memory = flat32
    payload, stream, decoder = _placed(vcpu, memory)  # whatever build is installed: the decoder's output is what counts
    ran = _ends_in_the_output(vcpu)  # GRUB's decoder, every instruction
    expected = memory.read(0, RAM)

    _prepare(vcpu, memory, payload, stream)
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
def test_a_call_the_vmm_cannot_serve_is_left_to_the_decoder(flat32: tuple[Vcpu, GuestMemory]) -> None:
    vcpu, memory = flat32
    payload, _, decoder = _placed(vcpu, memory)
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
