"""One option schema (worldswitch/options.py): the run flags, the machine-file keys and the API's
keywords are derived from MachineConfig's and SessionConfig's fields, so all three accept the same
names, with the same defaults and the same conversions."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest

from worldswitch.errors import ConfigError
from worldswitch.record import fields
from worldswitch.vmm.config import DiskConfig, MachineConfig, NetConfig
from worldswitch.vmx.api import Machine
from worldswitch.vmx.cli import build_parser
from worldswitch.vmx.machine_file import load_machine_file
from worldswitch.vmx.settings import (API_OPTIONS, MACHINE_OPTIONS, OPTIONS, SESSION_OPTIONS, SessionConfig,
                                      from_keywords)


def subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]  # type: ignore[no-any-return]


def dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.option_strings and action.dest != "help"}


def test_every_field_is_an_option_and_every_option_a_field() -> None:
    assert {f.name for f in fields(MachineConfig)} == {entry.name for entry in MACHINE_OPTIONS}
    assert {f.name for f in fields(SessionConfig)} == {entry.name for entry in SESSION_OPTIONS}


def test_the_command_line_the_machine_file_and_the_api_accept_the_same_names(tmp_path: Path) -> None:
    assert dests(subparser("run")) == set(OPTIONS)
    assert dests(subparser("restore")) == {entry.name for entry in SESSION_OPTIONS}
    # every name is a machine-file key: a file that sets each option to its default loads
    lines = []
    for entry in OPTIONS.values():
        if entry.default is None or (entry.option.program and entry.name != "guest"):
            continue
        value = entry.default
        lines.append(f"{entry.name} = {value!r}".replace("True", "true").replace("False", "false")
                     .replace("'", '"') if not isinstance(value, list) else f"{entry.name} = []")
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    assert set(load_machine_file(path)) == {line.split(" = ")[0] for line in lines}
    # every machine option is a Machine() keyword; the session options the API has are its parameters
    assert from_keywords({entry.name: entry.default for entry in MACHINE_OPTIONS
                          if entry.default is not None and entry.name != "guest"})
    parameters = set(inspect.signature(Machine).parameters)
    assert {name for name in API_OPTIONS if name in {e.name for e in SESSION_OPTIONS}} <= parameters


def test_one_value_reads_the_same_from_all_three(tmp_path: Path) -> None:
    (tmp_path / "vm.toml").write_text('memory = "256M"\ncpus = 2\nappend = "quiet"\ndisk = ["a.img,ro,serial=x"]\n'
                                     'net = ["tap=t0,mac=52:54:00:00:00:01"]\nrng = true\n')
    from_file = load_machine_file(tmp_path / "vm.toml")
    namespace = subparser("run").parse_args(["--memory", "256M", "--cpus", "2", "--append", "quiet",
                                             "--disk", "a.img,ro,serial=x", "--net", "tap=t0,mac=52:54:00:00:00:01",
                                             "--rng"])
    from worldswitch.vmx.settings import given

    typed = given(namespace, MACHINE_OPTIONS)
    api = from_keywords({"memory": "256M", "cpus": 2, "append": "quiet", "disk": ["a.img,ro,serial=x"],
                         "net": ["tap=t0,mac=52:54:00:00:00:01"], "rng": True})
    assert typed == api
    assert from_file == {**api, "disk": [DiskConfig(str(tmp_path / "a.img"), True, "x")]}  # relative to the file
    assert api["disk"] == [DiskConfig("a.img", True, "x")] and api["net"] == [NetConfig("t0", "52:54:00:00:00:01")]


@pytest.mark.parametrize("keywords, message", [
    ({"disks": ["a.img"]}, "no option 'disks'"),
    ({"timeout": 3}, "no option 'timeout'"),  # the session's, not the API's: run(timeout) is
    ({"memory": 512}, "memory: expected a size"),
    ({"cpus": 0}, "cpus: expected a positive integer"),
    ({"disk": "a.img"}, "disk: expected a list of disks"),
    ({"disk": ["a.img,shared"]}, "shared is for read-only disks"),
    ({"decompress": "sometimes"}, "decompress: expected one of auto, host, guest"),
])
def test_the_api_refuses_what_the_command_line_refuses(keywords: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Machine(**keywords)


def test_a_bad_flag_value_names_the_flag() -> None:
    from worldswitch.vmx.settings import given

    with pytest.raises(ConfigError, match="^--memory: 'lots' is not a size"):
        given(subparser("run").parse_args(["--memory", "lots"]), MACHINE_OPTIONS)
    with pytest.raises(ConfigError, match="^--disk: 'x.img,rw': expected PATH"):
        given(subparser("run").parse_args(["--disk", "x.img,rw"]), MACHINE_OPTIONS)
