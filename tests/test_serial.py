"""The 16550A as a state machine, against the PC16550D data sheet's register behaviour."""

from __future__ import annotations

from worldswitch.devices import serial as u
from worldswitch.devices.serial import Serial

from .helpers import RecordingLine


def make() -> tuple[Serial, RecordingLine, list[bytes]]:
    line = RecordingLine()
    out: list[bytes] = []
    return Serial(line, out.append), line, out


def test_reset_state_matches_the_data_sheet() -> None:
    uart, line, _ = make()
    assert uart.read(u.LSR, 1) == u.LSR_THRE | u.LSR_TEMT
    assert uart.read(u.IIR_FCR, 1) == u.IIR_NO_INT
    assert uart.read(u.IER_DLM, 1) == 0
    assert not line.level


def test_transmit_goes_to_the_sink_and_the_thr_stays_empty() -> None:
    uart, _, out = make()
    for byte in b"hi\n":
        uart.write(u.RBR_THR_DLL, 1, byte)
    assert b"".join(out) == b"hi\n"
    assert uart.read(u.LSR, 1) & u.LSR_THRE


def test_divisor_latch_is_reached_with_dlab_and_does_not_transmit() -> None:
    uart, _, out = make()
    uart.write(u.LCR, 1, u.LCR_DLAB | 0x03)
    uart.write(u.RBR_THR_DLL, 1, 0x01)
    uart.write(u.IER_DLM, 1, 0x00)
    assert uart.read(u.RBR_THR_DLL, 1) == 0x01
    assert out == []
    uart.write(u.LCR, 1, 0x03)
    assert uart.read(u.IER_DLM, 1) == 0  # IER, not DLM, once DLAB is clear


def test_thre_interrupt_rises_when_enabled_and_clears_on_iir_read() -> None:
    uart, line, _ = make()
    uart.write(u.IER_DLM, 1, u.IER_THRI)
    assert line.level
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_THRI
    assert not line.level  # reading IIR acknowledged it
    uart.write(u.RBR_THR_DLL, 1, ord("x"))
    assert line.level  # the byte left at once: THR empty again


def test_received_data_interrupt_and_fifo_order() -> None:
    uart, line, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    uart.write(u.IER_DLM, 1, u.IER_RDI)
    uart.receive(b"abc")
    assert line.level
    assert uart.read(u.LSR, 1) & u.LSR_DR
    assert uart.read(u.IIR_FCR, 1) == u.IIR_FIFO_ENABLED | u.IIR_RDI  # 3 >= trigger level 1
    assert bytes(uart.read(u.RBR_THR_DLL, 1) for _ in range(3)) == b"abc"
    assert not line.level
    assert not uart.read(u.LSR, 1) & u.LSR_DR


def test_below_trigger_level_reports_character_timeout() -> None:
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE | 0xC0)  # trigger at 14 bytes
    uart.write(u.IER_DLM, 1, u.IER_RDI)
    uart.receive(b"a")
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_TIMEOUT


def test_input_beyond_the_fifo_waits_in_the_backlog_and_is_never_lost() -> None:
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    uart.read(u.LSR, 1)  # a polling driver
    data = bytes(range(48, 48 + 40))
    uart.receive(data)
    assert len(uart.rx_fifo) == u.FIFO_SIZE
    got = bytearray()
    while uart.read(u.LSR, 1) & u.LSR_DR:
        got.append(uart.read(u.RBR_THR_DLL, 1))
    assert bytes(got) == data


def test_input_that_arrives_before_the_driver_starts_survives_its_fifo_reset() -> None:
    uart, line, _ = make()
    uart.receive(b"early")
    assert not line.level and not uart.rx_fifo
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE | u.FCR_CLEAR_RX | u.FCR_CLEAR_TX)
    uart.write(u.IER_DLM, 1, u.IER_RDI)
    assert line.level
    assert bytes(uart.read(u.RBR_THR_DLL, 1) for _ in range(5)) == b"early"


def test_without_fifo_one_byte_is_buffered_at_a_time() -> None:
    uart, _, _ = make()
    uart.read(u.LSR, 1)
    uart.receive(b"xy")
    assert len(uart.rx_fifo) == 1
    assert uart.read(u.RBR_THR_DLL, 1) == ord("x")
    assert uart.read(u.RBR_THR_DLL, 1) == ord("y")


def test_interrupt_priority_line_status_over_data_over_thre() -> None:
    uart, _, _ = make()
    uart.write(u.IER_DLM, 1, u.IER_RDI | u.IER_THRI | u.IER_RLSI)
    uart.write(u.MCR, 1, u.MCR_LOOP)
    for _ in range(3):  # no FIFO: the second and third loopback bytes overrun
        uart.write(u.RBR_THR_DLL, 1, 0x55)
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_RLSI
    assert uart.read(u.LSR, 1) & u.LSR_OE
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_RDI  # LSR read cleared the overrun
    uart.read(u.RBR_THR_DLL, 1)
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_THRI


def test_loopback_reflects_modem_control_in_modem_status() -> None:
    uart, _, out = make()
    uart.write(u.MCR, 1, u.MCR_LOOP | u.MCR_DTR | u.MCR_OUT2)
    assert uart.read(u.MSR, 1) == u.MSR_DSR | u.MSR_DCD
    uart.write(u.RBR_THR_DLL, 1, 0x41)
    assert out == []  # loopback keeps bytes inside the UART
    assert uart.read(u.RBR_THR_DLL, 1) == 0x41


def test_scratch_register_and_fifo_identification_like_linux_probes_it() -> None:
    uart, _, _ = make()
    uart.write(u.SCR, 1, 0xA5)
    assert uart.read(u.SCR, 1) == 0xA5
    uart.write(u.IIR_FCR, 1, 0xE7)  # Linux autoconfig: enable FIFOs, 14-byte trigger
    assert uart.read(u.IIR_FCR, 1) & 0xC0 == 0xC0  # a 16550A, not a 16550 or 16450
    uart.write(u.IIR_FCR, 1, 0)
    assert uart.read(u.IIR_FCR, 1) & 0xC0 == 0


def test_snapshot_state_round_trips() -> None:
    uart, line, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    uart.write(u.IER_DLM, 1, u.IER_RDI)
    uart.receive(b"x" * 20)
    state = uart.state()
    copy, copy_line, _ = make()
    copy.restore(state)
    assert copy.state() == state
    assert copy_line.level == line.level


def test_the_uart_says_when_a_byte_written_to_thr_may_raise_its_interrupt() -> None:
    """What the VMM's coalescing of THR writes relies on (vmm/platform/coalesced.py): told at
    construction, at each change and on restore, and only then."""
    told: list[bool] = []
    uart = Serial(RecordingLine(), [].append, told.append)
    assert told == [False]  # reset: IER clear, no loopback
    uart.write(u.LCR, 1, u.LCR_DLAB)
    uart.write(u.IER_DLM, 1, u.IER_THRI)  # DLM, with DLAB set: nothing changes
    uart.write(u.LCR, 1, 0x03)
    uart.write(u.RBR_THR_DLL, 1, 0x41)
    assert told == [False]
    uart.write(u.IER_DLM, 1, u.IER_RDI)
    assert told == [False]
    uart.write(u.MCR, 1, u.MCR_LOOP)  # looped back into a FIFO whose interrupt is on
    assert told == [False, True]
    uart.write(u.IER_DLM, 1, 0)
    assert told == [False, True, False]
    uart.write(u.IER_DLM, 1, u.IER_THRI)
    assert told == [False, True, False, True]
    saved = uart.state()
    uart.restore(u.SerialState())
    uart.restore(saved)
    assert told == [False, True, False, True, False, True]
