from __future__ import annotations

import time

from worldswitch.devices.acpi_pm import CONTROL, EVT_ENABLE, EVT_STATUS, PM1_CNT_SCI_EN, TIMER, AcpiPm, ResetRegister


def make():
    events: list[str] = []
    pm = AcpiPm(on_power_off=lambda: events.append("off"), on_sleep=lambda typ: events.append(f"S{typ}"))
    return pm, events


def test_sci_en_always_reads_set() -> None:
    pm, _ = make()
    assert pm.read(CONTROL, 2) & PM1_CNT_SCI_EN
    pm.write(CONTROL, 2, 0)
    assert pm.read(CONTROL, 2) & PM1_CNT_SCI_EN


def test_s5_powers_off_and_other_sleep_states_are_reported() -> None:
    pm, events = make()
    pm.write(CONTROL, 2, (5 << 10) | (1 << 13))
    pm.write(CONTROL, 2, (3 << 10) | (1 << 13))
    pm.write(CONTROL, 2, 5 << 10)  # without SLP_EN nothing happens
    assert events == ["off", "S3"]
    assert not pm.read(CONTROL, 2) & (1 << 13)  # SLP_EN reads back as 0


def test_s5_written_a_byte_at_a_time() -> None:
    pm, events = make()
    pm.write(CONTROL, 1, 0x00)
    pm.write(CONTROL + 1, 1, (5 << 2) | (1 << 5))
    assert events == ["off"]


def test_status_bits_are_write_one_to_clear_and_enable_is_plain() -> None:
    pm, _ = make()
    pm.status = 0x8001
    pm.write(EVT_STATUS, 2, 0x0001)
    assert pm.read(EVT_STATUS, 2) == 0x8000
    pm.write(EVT_ENABLE, 2, 0x0120)
    assert pm.read(EVT_ENABLE, 2) == 0x0120
    pm.write(EVT_STATUS, 4, 0x8000)  # a 32-bit write covers status and enable
    assert pm.read(EVT_STATUS, 2) == 0 and pm.read(EVT_ENABLE, 2) == 0


def test_pm_timer_counts_at_3_58_mhz() -> None:
    pm, _ = make()
    first = pm.read(TIMER, 4)
    time.sleep(0.05)
    ticks = (pm.read(TIMER, 4) - first) & 0xFFFFFFFF
    assert 0.04 * 3_579_545 < ticks < 0.5 * 3_579_545


def test_reset_register() -> None:
    resets: list[int] = []
    register = ResetRegister(lambda: resets.append(1))
    register.write(0, 1, 0x00)
    register.write(0, 1, 0x06)
    assert resets == [1]
