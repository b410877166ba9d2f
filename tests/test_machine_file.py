"""Machine files: a VM described in TOML, checked key by key, and the command line winning over it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worldswitch.errors import ConfigError
from worldswitch.vmm.config import DiskConfig, NetConfig
from worldswitch.vmx.machine_file import load_machine_file
from worldswitch.vmx.settings import merge, settings_of


def write(tmp_path: Path, text: str, name: str = "vm.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_machine_file_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "machines"
    folder.mkdir()
    path = write(folder, """
memory = "1G"
cpus = 2
kernel = "vmlinuz"
initrd = "../initrd.img"
append = "console=ttyS0 quiet"
disk = ["root.img,serial=root", { path = "data.img", read_only = true, serial = "data" }]
net = ["tap=tap7,mac=52:54:00:00:00:07", { tap = "tap8" }, "tap=tap9,offloads=off", { tap = "tap10", offloads = false }]
rng = true
vconsole = "file:console.log"
timeout = 90
serial = "file:serial.log"
reboot = true
""")
    values = load_machine_file(path)
    config = settings_of(merge(values)).machine
    assert config.memory == 1 << 30 and config.cpus == 2
    assert config.kernel == str(folder / "vmlinuz")
    assert config.initrd == str(folder / "../initrd.img")
    assert config.append == "console=ttyS0 quiet"
    assert config.disk == [DiskConfig(str(folder / "root.img"), False, "root"), DiskConfig(str(folder / "data.img"), True, "data")]
    assert config.net == [NetConfig("tap7", "52:54:00:00:00:07"), NetConfig("tap8", None), NetConfig("tap9", None, False),
                          NetConfig("tap10", None, False)]
    assert config.rng and config.vconsole == f"file:{folder / 'console.log'}"
    assert values["timeout"] == 90.0 and values["serial"] == f"file:{folder / 'serial.log'}" and values["reboot"] is True


@pytest.mark.parametrize("text, message", [
    ("memroy = '1G'", "unknown key 'memroy'"),
    ("cpus = 'two'", "cpus: expected a positive integer"),
    ("cpus = 0", "cpus: expected a positive integer"),
    ("memory = 'lots'", "memory: 'lots' is not a size"),
    ("memory = 512", "memory: expected a size such as"),
    ("memory = true", "memory: expected a size"),
    ("rng = 'yes'", "rng: expected true or false"),
    ("decompress = 'maybe'", "decompress: expected one of auto, host, guest"),
    ("serial = 'tty'", "serial: expected stdio, none or file:PATH"),
    ("vconsole = 'stdio'", "vconsole: expected pty, none or file:PATH"),
    ("timeout = -1", "timeout: expected a positive, finite number of seconds"),
    ("timeout = 'soon'", "timeout: 'soon' is not a number of seconds"),
    ("disk = 'a.img'", "disk: expected a list of disks"),
    ("disk = [{ file = 'a.img' }]", "disk: a disk table has a path"),
    ("disk = ['a.img,rw']", "expected PATH[,ro[,shared]][,serial=ID][,format=raw|qcow2], not rw"),
    ("net = ['tap0']", "expected tap=NAME"),
    ("net = ['tap=tap0,offloads=no']", "expected tap=NAME[,mac=MAC][,offloads=off]"),
    ("net = [{ tap = 'tap0', offloads = 'off' }]", "offloads (true or false)"),
    ("kernel = ''", "kernel: expected a path"),
    ("kernel = 'vmlinuz'\nguest = 'hello'", "give one of a built-in guest, an ELF program or a Linux kernel"),
    ("initrd = 'x.img'", "an initrd needs a Linux kernel"),
    ("cpus = [", "is not valid TOML"),
])
def test_unknown_keys_and_bad_values_name_the_key_and_the_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_machine_file(write(tmp_path, text))
    assert message in str(caught.value)
    assert str(tmp_path / "vm.toml") in str(caught.value)


def test_a_missing_or_binary_machine_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_machine_file(tmp_path / "nope.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="not text|not valid TOML"):
        load_machine_file(tmp_path / "binary.toml")


def test_a_program_chosen_later_replaces_the_files_program() -> None:
    settings = merge({"kernel": "/k", "initrd": "/i", "cpus": 2}, {"guest": "exits"})
    assert settings["guest"] == "exits" and settings["kernel"] is None and settings["initrd"] is None
    assert settings["cpus"] == 2
    assert merge({"kernel": "/k", "initrd": "/i"}, {"kernel": "/k2"})["initrd"] == "/i"


@pytest.mark.kvm
def test_run_a_machine_file_and_override_it_on_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'guest = "exits"\nargs = "100 io"\ncpus = 1\nstats_json = "stats.json"\nquiet = true\n')
    command = [sys.executable, "-m", "worldswitch", "run", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # quiet came from the file
    assert json.loads((tmp_path / "stats.json").read_text())["result"]["value"] == 100
    result = subprocess.run([*command, "--args", "250 io"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "stats.json").read_text())["result"]["value"] == 250


@pytest.mark.kvm
def test_a_bad_machine_file_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, "cpus = 'many'\n")
    result = subprocess.run([sys.executable, "-m", "worldswitch", "run", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"worldswitch: error: {path}: cpus: expected a positive integer"]
