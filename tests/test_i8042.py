from __future__ import annotations

from worldswitch.devices import i8042 as k

STATUS = k.COMMAND_PORT - k.DATA_PORT


def make() -> tuple[k.I8042, list[int]]:
    resets: list[int] = []
    return k.I8042(on_reset=lambda: resets.append(1)), resets


def test_pulse_reset_command_resets_the_machine() -> None:
    dev, resets = make()
    dev.write(STATUS, 1, k.CMD_PULSE_RESET)
    assert resets == [1]


def test_output_port_write_with_bit0_clear_resets() -> None:
    dev, resets = make()
    dev.write(STATUS, 1, k.CMD_WRITE_OUTPUT_PORT)
    dev.write(0, 1, 0xFE)
    assert resets == [1]
    dev.write(STATUS, 1, k.CMD_WRITE_OUTPUT_PORT)
    dev.write(0, 1, 0xFF)
    assert resets == [1]


def test_self_test_and_command_byte_round_trip() -> None:
    dev, resets = make()
    dev.write(STATUS, 1, k.CMD_SELF_TEST)
    assert dev.read(STATUS, 1) & k.STATUS_OBF
    assert dev.read(0, 1) == k.SELF_TEST_OK
    assert not dev.read(STATUS, 1) & k.STATUS_OBF
    dev.write(STATUS, 1, k.CMD_WRITE_COMMAND_BYTE)
    dev.write(0, 1, 0x61)
    dev.write(STATUS, 1, k.CMD_READ_COMMAND_BYTE)
    assert dev.read(0, 1) == 0x61
    assert resets == []


def test_pulses_that_leave_the_reset_line_alone_do_not_reset() -> None:
    dev, resets = make()
    dev.write(STATUS, 1, 0xFF)  # pulse no line
    assert resets == []


def test_bytes_for_the_absent_keyboard_time_out() -> None:
    dev, _ = make()
    dev.write(0, 1, 0xFF)  # keyboard reset
    assert dev.read(0, 1) == 0xFE
