"""The Python API (`from worldswitch import Machine`), as a script that drives a VM uses it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import worldswitch
from worldswitch.errors import ConfigError
from worldswitch.vmm.result import StopReason

pytestmark = pytest.mark.kvm


def test_expect_and_send_with_the_echo_guest() -> None:
    events: list[str] = []
    with worldswitch.Machine(guest="echo") as vm:
        vm.on_event.append(lambda name, details: events.append(name))
        vm.start()
        assert vm.console.expect(r"type a line \('(\w+)' ends\)").group(1) == b"quit"
        vm.console.send("hello, world\n")
        vm.console.expect("HELLO, WORLD")
        with pytest.raises(TimeoutError, match="did not show 'never printed'"):
            vm.console.expect("never printed", timeout=0.2)
        vm.console.send(b"quit\n")
        result = vm.wait(10)
        assert vm.status()["state"] == "ended"
    assert result is not None and result.reason is StopReason.GUEST_DONE and result.value == 1
    assert events == ["started", "shutdown"]


def test_the_context_manager_always_tears_the_vm_down(tmp_path: Path) -> None:
    socket_path = tmp_path / "vm.sock"
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="the test's own failure"):
        with worldswitch.Machine(guest="fault", args="spin", cpus=2, control=str(socket_path)) as vm:
            vm.start()
            assert socket_path.exists() and vm.alive
            raise RuntimeError("the test's own failure")
    assert not vm.alive and vm.vmm.result is not None
    assert vm.vmm.result.reason is StopReason.STOPPED
    assert not socket_path.exists()
    assert all(runner.finished.is_set() for runner in vm.vmm.runners)
    assert threading.active_count() <= before + 1  # vCPU, device and control threads are gone (an accept may linger)


def test_a_machine_from_a_file_and_run_with_a_timeout(tmp_path: Path) -> None:
    (tmp_path / "spin.toml").write_text('guest = "fault"\nargs = "spin"\n')
    with worldswitch.Machine.from_file(tmp_path / "spin.toml") as vm:
        result = vm.run(timeout=0.3)
    assert result.reason is StopReason.TIMEOUT


def test_keywords_are_checked_when_the_machine_is_made() -> None:
    with pytest.raises(ConfigError, match="not a size"):
        worldswitch.Machine(memory="lots")
    with pytest.raises(ConfigError, match="give one of"):
        worldswitch.Machine(guest="hello", kernel="vmlinuz")
    with pytest.raises(ConfigError, match="expected PATH"):
        worldswitch.Machine(disk=["disk.img,bogus"])
    with pytest.raises(RuntimeError, match="not been started"):
        worldswitch.Machine().stats()


def test_stats_and_snapshot_from_python(tmp_path: Path) -> None:
    with worldswitch.Machine(guest="exits", args="2000 io") as vm:
        result = vm.run(timeout=30)
        stats = vm.stats()
    assert result.value == 2000
    assert stats["exits"]["io"] >= 2000 and stats["vcpus"][0]["exits"]["io"] >= 2000
