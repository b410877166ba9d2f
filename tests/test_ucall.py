from __future__ import annotations

import struct

from worldswitch.devices.ucall import UCALL_FORMAT, UCALL_SIZE, Ucall, UcallCommand, UcallPort
from worldswitch.memory.guest import GuestMemory


def test_layout_matches_the_guest_header() -> None:
    assert UCALL_SIZE == 4 + 4 + 4 * 8 + 32 + 96


def test_port_decodes_a_ucall_from_guest_memory() -> None:
    memory = GuestMemory([(0, 0x10000)])
    calls: list[Ucall] = []
    port = UcallPort(memory, calls.append)
    memory.write(0x800, struct.pack(UCALL_FORMAT, 3, 42, 1, 2, 3, 4, b"exits.c", b"n == 5 (4 != 5)"))
    port.write(0, 4, 0x800)
    assert calls[0].command == UcallCommand.ABORT
    assert calls[0].describe() == "guest assertion failed at exits.c:42: n == 5 (4 != 5)"
    assert calls[0].args == (1, 2, 3, 4)
    memory.close()


def test_hostile_ucall_addresses_and_commands_become_aborts() -> None:
    memory = GuestMemory([(0, 0x10000)])
    calls: list[Ucall] = []
    port = UcallPort(memory, calls.append)
    port.write(0, 4, 0xFFFFFFF0)
    port.write(0, 4, 0x10000 - 10)  # straddles the end of RAM
    memory.write(0x800, struct.pack(UCALL_FORMAT, 99, 0, 0, 0, 0, 0, b"", b""))
    port.write(0, 4, 0x800)
    assert [c.command for c in calls] == [UcallCommand.ABORT] * 3
    assert "outside guest RAM" in calls[0].text and "outside guest RAM" in calls[1].text
    assert "unknown ucall command 99" in calls[2].text
    memory.close()
