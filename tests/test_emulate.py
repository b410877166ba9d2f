from __future__ import annotations

from worldswitch.vmm.x86.emulate import SoftwareInterrupt, software_interrupt


def test_software_interrupt_decoding() -> None:
    assert software_interrupt(b"\xcc\x90") == SoftwareInterrupt(3, 1)
    assert software_interrupt(b"\xf1") == SoftwareInterrupt(1, 1)
    assert software_interrupt(b"\xcd\x80") == SoftwareInterrupt(0x80, 2)
    assert software_interrupt(b"\xcd") is None  # truncated
    assert software_interrupt(b"\x0f\x0b") is None  # ud2 is not ours to emulate
    assert software_interrupt(b"") is None
