"""Naming the instructions that make KVM's emulator give up (KVM_INTERNAL_ERROR_EMULATION)."""

from __future__ import annotations

import pytest

from worldswitch.driver import structs as s
from worldswitch.driver.exits import InternalErrorExit
from worldswitch.vmm.x86.insn import decode_mnemonic, describe_internal_error


@pytest.mark.parametrize(
    "code,name",
    [
        ("f0 48 0f c7 0e", "lock cmpxchg16b"),
        ("0f c7 0e", "cmpxchg8b"),
        ("48 0f ae 2f", "xrstor64"),
        ("0f ae 2f", "xrstor"),
        ("0f ae 27", "xsave"),
        ("0f ae e8", "lfence"),
        ("0f c7 1f", "xrstors"),
        ("0f 01 d1", "xsetbv"),
        ("0f 01 d0", "xgetbv"),
        ("0f 01 f9", "rdtscp"),
        ("0f 0b", "ud2"),
        ("f4", "hlt"),
        ("c5 f9 6f 07", "an AVX instruction (VEX-encoded)"),
        ("62 f1 fd 48 6f 07", "an AVX-512 instruction (EVEX-encoded)"),
        ("66 0f 38 00 c1", "an SSSE3/SSE4/AES-NI/SHA instruction (0F 38/0F 3A map)"),
        ("90", ""),
    ],
)
def test_decode(code: str, name: str) -> None:
    assert decode_mnemonic(bytes.fromhex(code)) == name


def test_description_names_bytes_address_and_ring() -> None:
    regs = s.kvm_regs(rip=0xFFFFFFFF81234567)
    sregs = s.kvm_sregs()
    failure = InternalErrorExit(1, (3, 0, 0), bytes.fromhex("f048 0fc7 0e"))
    text = describe_internal_error(failure, 0, regs, sregs)
    assert "rip 0xffffffff81234567" in text and "ring 0" in text
    assert "f0 48 0f c7 0e = lock cmpxchg16b" in text


def test_description_fetches_bytes_when_kvm_gave_none() -> None:
    regs, sregs = s.kvm_regs(rip=0x1000), s.kvm_sregs()
    text = describe_internal_error(InternalErrorExit(1, (), b""), 1, regs, sregs, lambda rip: bytes.fromhex("0fae2f"))
    assert "vCPU 1" in text and "0f ae 2f = xrstor" in text


def test_mandatory_f3_prefix_is_part_of_the_opcode() -> None:
    assert decode_mnemonic(bytes.fromhex("f3480fb8c7")) == "popcnt"
    assert decode_mnemonic(bytes.fromhex("f30fbcc0")) == "tzcnt"
    assert decode_mnemonic(bytes.fromhex("0fbcc0")) == "bsf"
