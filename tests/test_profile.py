"""The sampling profiler: symbols from System.map, nm output or an ELF file, and samples taken
from a running VM through its control socket."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worldswitch.errors import ConfigError
from worldswitch.guests import builtin_path
from worldswitch.vmx.api import Machine
from worldswitch.vmx.profile import Profile, Symbols, report, sample


def test_symbols_from_a_system_map_name_addresses_by_function(tmp_path: Path) -> None:
    (tmp_path / "System.map").write_text(
        "ffffffff81000000 T _stext\nffffffff81000100 t helper\nffffffff81001000 D some_data\n"
        "ffffffff81002000 W weak_one\nnot a line\n")
    symbols = Symbols.load(tmp_path / "System.map")
    assert symbols.name(0xFFFFFFFF81000050) == "_stext"
    assert symbols.name(0xFFFFFFFF81000FFF) == "helper"  # data symbols do not split functions
    assert symbols.name(0xFFFFFFFF81002010) == "weak_one"
    assert symbols.name(0x1000) is None


def test_symbols_from_an_elf_file_and_refusals(tmp_path: Path) -> None:
    symbols = Symbols.load(builtin_path("fault"))
    assert "misbehave" in symbols.names and "_start" not in symbols.names  # functions only
    (tmp_path / "empty.map").write_text("nothing here\n")
    with pytest.raises(ConfigError, match="lists no functions"):
        Symbols.load(tmp_path / "empty.map")
    with pytest.raises(ConfigError, match="cannot read symbols"):
        Symbols.load(tmp_path / "missing.map")
    stripped = tmp_path / "stripped.elf"
    subprocess.run(["strip", "-o", str(stripped), str(builtin_path("fault"))], check=True)
    with pytest.raises(ConfigError, match="no symbol table"):
        Symbols.load(stripped)


def test_a_report_counts_by_function_and_ring() -> None:
    profile = Profile()
    for rip, cpl in ((0x1010, 3), (0x1020, 3), (0x2000, 0), (0x500, 3)):
        profile.add([{"rip": hex(rip), "cpl": cpl}])
    text = report(profile, Symbols([(0x1000, "loop"), (0x2000, "kernel_entry")]), top=5)
    assert "4 samples of 1 vCPU(s): ring 0 25%, ring 3 75%" in text
    assert " 50.0        2  loop (user)" in text.splitlines()[3]  # the most samples first
    assert " 25.0        1  kernel_entry\n" in text
    assert " 25.0        1  0x500 (user)" in text  # before every symbol: the bare address


@pytest.mark.kvm
def test_profiling_a_spinning_guest_finds_its_loop(tmp_path: Path) -> None:
    socket = tmp_path / "vm.sock"
    with Machine(guest="fault", args="spin", control=str(socket)) as vm:
        vm.start()
        vm.console.expect("spinning in ring 3", timeout=30)  # past the runtime's ring-0 set-up
        # a sample size, not a time: under nested TCG one request takes ~25 ms (17 in 0.5 s)
        profile = sample(socket, seconds=120, interval=0.005, limit=20)
        assert vm.alive
    assert profile.samples == 20
    functions = profile.by_function(Symbols.load(builtin_path("fault")))
    name, count = functions.most_common(1)[0]
    assert name == "misbehave (user)" and count >= profile.samples * 0.9


@pytest.mark.kvm
def test_worldswitch_profile_on_the_command_line(tmp_path: Path) -> None:
    socket = tmp_path / "vm.sock"
    with Machine(guest="fault", args="spin", control=str(socket)) as vm:
        vm.start()
        vm.console.expect("spinning in ring 3", timeout=30)
        result = subprocess.run([sys.executable, "-m", "worldswitch", "profile", str(socket), "--samples", "10",
                                 "--symbols", str(builtin_path("fault"))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("10 samples of 1 vCPU(s): ring 3 100%")
    assert "misbehave (user)" in result.stdout
    result = subprocess.run([sys.executable, "-m", "worldswitch", "profile", str(tmp_path / "gone.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("worldswitch: error: cannot reach the VMX")
    result = subprocess.run([sys.executable, "-m", "worldswitch", "profile", str(socket), "--samples", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--samples must be positive" in result.stderr
