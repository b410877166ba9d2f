"""GRUB's core image unpacked by the VMM (vmm/x86/grub_core.py) as GRUB's own decoder unpacks it: Debian's
lzma_decompress.img, placed where diskboot.img loads it, runs its startup's call of the decoder on /dev/kvm
twice from the same state, once through the decoder and once stopped at the call and served."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from worldswitch.driver import structs as s
from worldswitch.driver.constants import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, ExitReason
from worldswitch.driver.exits import IoOut, decode_exit
from worldswitch.driver.kvm import Vcpu
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.x86.copyloop import FLAG_AF, FLAG_CF, FLAG_DF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF
from worldswitch.vmm.x86.grub_core import CORE_START, CoreDecoder, find_core_decoder, serve_core_decoder

DECOMPRESSOR = Path("/usr/lib/grub/i386-pc/lzma_decompress.img")  # grub-pc-bin
CALL_SITE, CALL, STREAM = 0x89B6, 0x89CB, 0x8D20  # in Debian 12's build (grub 2.06-13+deb12u2)
UNCOMPRESSED_SIZE = 0x820C  # the header field the call site reads
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


def _prepare(vcpu: Vcpu, memory: GuestMemory, payload: bytes, stream: bytes) -> None:
    memory.fill(0, RAM)
    memory.write(CORE_START, DECOMPRESSOR.read_bytes())
    memory.write(UNCOMPRESSED_SIZE, struct.pack("<I", len(payload)))
    memory.write(STREAM, stream)
    vcpu.set_regs(s.kvm_regs(rip=CALL_SITE, rsp=STACK, rflags=2 | FLAG_DF | FLAG_CF))


def _placed(vcpu: Vcpu, memory: GuestMemory) -> tuple[bytes, bytes]:
    """The core image with a stream of _payload() in place, the vCPU at the call site: (payload, stream)."""
    payload = _payload()
    stream = _compressed(payload)
    _prepare(vcpu, memory, payload, stream)
    return payload, stream


def _ends_in_the_output(vcpu: Vcpu) -> s.kvm_regs:
    assert vcpu.run() == ExitReason.IO  # the startup's jump to the output, which begins with `out`
    assert decode_exit(ExitReason.IO, vcpu.kvm_run, vcpu.run_mmap) == IoOut(0x10, 1, 1, bytes([0xC6]))
    return vcpu.get_regs()


@pytest.mark.kvm
def test_the_served_call_leaves_what_grubs_decoder_leaves(flat32: tuple[Vcpu, GuestMemory]) -> None:
    vcpu, memory = flat32
    payload, stream = _placed(vcpu, memory)
    assert find_core_decoder(memory) == CoreDecoder(CALL, STREAM)
    ran = _ends_in_the_output(vcpu)  # GRUB's decoder, every instruction
    expected = memory.read(0, RAM)

    _prepare(vcpu, memory, payload, stream)
    vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [CALL, 0, 0, 0, 0, 0, 0, 1])
    assert vcpu.run() == ExitReason.DEBUG
    regs = vcpu.get_regs()
    assert serve_core_decoder(CoreDecoder(CALL, STREAM), memory, regs, vcpu.get_sregs()) == len(payload)
    vcpu.set_regs(regs)
    vcpu.set_guest_debug(0)
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
    payload, _ = _placed(vcpu, memory)
    decoder = CoreDecoder(CALL, STREAM)
    sregs = vcpu.get_sregs()
    size = len(payload)
    for regs in (s.kvm_regs(rip=CALL, rsi=STREAM, rdi=OUTPUT, rcx=size + 100),  # the stream ends before that
                 s.kvm_regs(rip=CALL, rsi=STREAM, rdi=RAM - 16, rcx=size),  # the output leaves RAM
                 s.kvm_regs(rip=CALL, rsi=STREAM + 1, rdi=OUTPUT, rcx=size),  # not the stream after the decoder
                 s.kvm_regs(rip=CALL + 1, rsi=STREAM, rdi=OUTPUT, rcx=size)):  # not at the call
        kept = bytes(regs)
        assert serve_core_decoder(decoder, memory, regs, sregs) is None and bytes(regs) == kept
    memory.write(STREAM, b"\xff" * 64)  # not LZMA
    assert serve_core_decoder(decoder, memory, s.kvm_regs(rip=CALL, rsi=STREAM, rdi=OUTPUT, rcx=size), sregs) is None
    memory.write(CALL + 20, b"\x90")  # another decoder: not one this module knows
    assert find_core_decoder(memory) is None
