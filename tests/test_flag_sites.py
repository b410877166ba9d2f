"""PUSHF and POPF found by decoding and made to trap (boot/flag_sites.py), on code whose bytes hold
the same values where they are no such instruction: only decoded boundaries count."""

from __future__ import annotations

import pytest

from worldswitch.boot.flag_sites import POPF_TRAP, PUSHF_TRAP, CodeRange, FlagSites, trap_flag_instructions
from worldswitch.errors import GuestImageError

BASE = 0xFFFF_FFFF_8100_0000
# native_save_fl and local_irq_restore's shapes, and a PUSHF and POPF value in an immediate, a
# displacement and a ModRM byte (mov $0x9d9c, %eax; mov 0x9c(%rax), %rbx; lea -0x63(%rbp), %rbx)
SAVE_FLAGS = b"\x9c\x58"  # pushf; pop %rax
RESTORE_FLAGS = b"\x57\x9d"  # push %rdi; popf
LOOKALIKES = b"\xb8\x9c\x9d\x00\x00" + b"\x48\x8b\x98\x9c\x00\x00\x00" + b"\x48\x8d\x5d\x9d"
RET, INT3 = b"\xc3", b"\xcc"


def test_each_pushf_and_popf_becomes_its_trap_and_nothing_else_changes() -> None:
    first = SAVE_FLAGS + LOOKALIKES + RESTORE_FLAGS + RET + INT3 * 3
    second = LOOKALIKES + SAVE_FLAGS + RET
    image = bytearray(b"\x00" * 16 + first + second)
    code = [CodeRange(BASE, 16, len(first)), CodeRange(BASE + len(first), 16 + len(first), len(second))]
    assert trap_flag_instructions(image, code) == FlagSites(2, 1)
    expected = (bytes([PUSHF_TRAP]) + SAVE_FLAGS[1:] + LOOKALIKES + RESTORE_FLAGS[:1] + bytes([POPF_TRAP]) + RET
                + INT3 * 3 + LOOKALIKES + bytes([PUSHF_TRAP]) + SAVE_FLAGS[1:] + RET)
    assert bytes(image) == b"\x00" * 16 + expected


def test_code_made_to_trap_again_keeps_its_traps_and_finds_the_sites_after_them() -> None:
    """A range decoded twice (code two ranges share): the trap bytes are no instruction to the
    decoder, which goes on past them to the sites after."""
    code = SAVE_FLAGS + RESTORE_FLAGS + RET
    image = bytearray(code)
    trap_flag_instructions(image, [CodeRange(BASE, 0, len(code))])
    once = bytes(image)
    image[3] = 0x9D  # a POPF after the first trap, not yet made one
    assert trap_flag_instructions(image, [CodeRange(BASE, 0, len(code))]) == FlagSites(0, 1)
    assert bytes(image) == once


def test_decoding_stops_at_bytes_that_are_no_instruction() -> None:
    """Past a byte no decoder takes for an instruction lies no code to patch (data, or a desync)."""
    code = SAVE_FLAGS + b"\x0e" + b"\x9c" + RET  # PUSH CS is invalid in 64-bit mode
    image = bytearray(code)
    assert trap_flag_instructions(image, [CodeRange(BASE, 0, len(code))]) == FlagSites(1, 0)
    assert image[3] == 0x9C


def test_a_pushf_with_an_operand_size_prefix_is_refused_by_its_address() -> None:
    code = RET + b"\x66\x9c" + RET  # pushfw
    with pytest.raises(GuestImageError, match=f"{BASE + 1:#x} has a prefix"):
        trap_flag_instructions(bytearray(code), [CodeRange(BASE, 0, len(code))])
