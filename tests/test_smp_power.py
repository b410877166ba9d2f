"""SMP through the in-kernel LAPIC (INIT/SIPI), and the clean ends: ACPI S5, resets, --reboot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worldswitch.devices.ucall import UcallCommand
from worldswitch.vmm.result import StopReason

from .helpers import run_guest

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_application_processors_start_and_report_from_their_own_vcpus(cpus: int) -> None:
    run = run_guest("smp", cpus=cpus, timeout=120)
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    running, mask, announced, _ = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert (running, mask, announced) == (cpus, (1 << cpus) - 1, cpus)
    syncs = sorted(call.args[0] for call in run.machine.outcome.ucalls if call.command == UcallCommand.SYNC)
    assert syncs == list(range(1, cpus))  # one SYNC per AP, carrying its APIC ID
    for vcpu in run.stats.vcpus[1:]:
        assert vcpu.exits.get("io") == 1  # each AP's SYNC was a world switch of its own vCPU


def test_acpi_s5_powers_off() -> None:
    run = run_guest("power", "off")
    assert run.result.reason is StopReason.POWER_OFF and run.result.exit_status == 0
    assert "power: ACPI S5" in run.text


@pytest.mark.parametrize("how", ["kbd", "acpi"])
def test_resets_end_the_machine(how: str) -> None:
    run = run_guest("power", how)
    assert run.result.reason is StopReason.RESET and run.result.exit_status == 0


def test_reboot_restarts_the_guest() -> None:
    result = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--guest", "power", "--args", "kbd",
                             "--reboot", "--timeout", "3"], capture_output=True, text=True, timeout=60)
    assert result.stdout.count("power: i8042 reset") >= 2
    assert "starting it again (boot 2)" in result.stderr
    assert result.returncode == 124  # it kept rebooting until the timeout


def test_without_reboot_a_reset_ends_the_vmx() -> None:
    result = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--guest", "power", "--args", "acpi"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "guest requested a reset" in result.stderr
    assert result.stdout.count("power: ACPI reset register") == 1
