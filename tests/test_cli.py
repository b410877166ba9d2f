"""The `worldswitch` command as a user runs it: a separate process, its output, its exit status,
and the terminal it leaves behind."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

COMMAND = [sys.executable, "-m", "worldswitch"]


def worldswitch(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=stdin if stdin is not None else "")


def timed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """A command's result and its wall time in seconds."""
    started = time.monotonic()
    result = worldswitch(*args)
    return result, time.monotonic() - started


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert text in lines[0]


def test_the_main_command_runs_the_default_guest_and_reports_world_switches() -> None:
    """No bound on its wall time (a hang ends at the helper's timeout): how fast it starts is the
    bench's to measure, and under the nested host's TCG start-up alone took 8.7 s of a 10 s bound."""
    result = worldswitch("run")
    assert result.returncode == 0, result.stderr
    assert "Hello from a worldswitch guest" in result.stdout
    assert "worldswitch: guest exited with status 0" in result.stderr
    assert "world switches:" in result.stderr and " io)" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["-h", "run"]])
def test_the_help_lists_every_command(args: list[str]) -> None:
    """A command named first gets only its own parser (start-up time); a help before it, all of them."""
    result = worldswitch(*args)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("run", "restore", "ctl", "info", "fetch-debian", "trace"))


def test_a_commands_help_is_its_own() -> None:
    result = worldswitch("run", "--help")
    assert result.returncode == 0 and "--memory SIZE" in result.stdout and "fetch-debian" not in result.stdout


def test_stats_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    result = worldswitch("run", "--guest", "exits", "--args", "100", "--stats", "--stats-json", str(out))
    assert result.returncode == 0, result.stderr
    assert "exit reason" in result.stderr and "in KVM_RUN" in result.stderr
    data = json.loads(out.read_text())
    assert data["result"]["reason"] == "guest-done"
    assert data["stats"]["exits"] == {"io": 102, "mmio": 101}
    assert data["stats"]["vcpus"][0]["guest_ns"] > 0


@pytest.mark.parametrize(
    "args,status,text",
    [
        (["--elf", "/nonexistent/prog.elf"], 2, "guest program /nonexistent/prog.elf does not exist"),
        (["--elf", "/etc/hostname"], 2, "is not an ELF file"),
        (["--elf", "/"], 2, "is a directory"),
        (["--guest", "nosuch"], 2, "no built-in guest named 'nosuch'"),
        (["--memory", "lots"], 2, "--memory: 'lots' is not a size"),
        (["--memory", "1M"], 2, "memory must be at least 2 MiB"),
        (["--cpus", "0"], 2, "--cpus: expected a positive integer"),
        (["--serial", "tcp:1"], 2, "--serial: expected stdio, none or file:PATH"),
        (["--timeout", "never"], 2, "is not a number of seconds"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_status(args: list[str], status: int, text: str) -> None:
    assert_one_line_error(worldswitch("run", *args), status, text)


def test_an_unknown_debian_release_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(worldswitch("fetch-debian", "--release", "hamm", "--dir", str(tmp_path)), 2,
                          "unknown Debian release 'hamm': one of bookworm, trixie, forky, sid")
    assert not (tmp_path / "apt").exists()  # nothing written for it


def test_a_dynamically_linked_program_is_refused() -> None:
    assert_one_line_error(worldswitch("run", "--elf", shutil.which("ls") or "/bin/ls"), 2, "not a static executable")


def test_missing_kvm_device_is_one_line() -> None:
    result = worldswitch("run", env={"WORLDSWITCH_KVM": "/nonexistent/kvm"})
    assert_one_line_error(result, 2, "/nonexistent/kvm does not exist")


def test_a_triple_faulting_guest_is_one_line() -> None:
    result = worldswitch("run", "--guest", "fault", "--args", "triple", "--quiet")
    assert_one_line_error(result, 3, "guest triple-faulted on vCPU 0")


def test_an_invalid_instruction_is_one_line() -> None:
    result = worldswitch("run", "--guest", "fault", "--args", "ud", "--quiet")
    assert_one_line_error(result, 1, "unhandled #UD (invalid opcode)")


def test_a_guest_that_never_ends_is_stopped_by_the_timeout() -> None:
    """The timeout adds its 0.5 s and a stop to what a run costs anyway: measured against a guest that
    ends at once, so that a slow start (about 6 s under the nested host's TCG) is not counted."""
    result, seconds = timed("run", "--guest", "fault", "--args", "spin", "--timeout", "0.5", "--quiet")
    assert_one_line_error(result, 124, "did not finish within 0.5 s")
    reference, reference_seconds = timed("run", "--guest", "hello", "--quiet")
    assert reference.returncode == 0, reference.stderr
    assert seconds - reference_seconds < 5


def test_unmapped_mmio_warns_a_few_times_and_the_vm_keeps_running() -> None:
    result = worldswitch("run", "--guest", "fault", "--args", "unmapped 5000")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "unmapped MMIO" in line]
    assert 1 <= len(warnings) <= 10


def test_serial_to_a_file(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = worldswitch("run", "--serial", f"file:{log}")
    assert result.returncode == 0
    assert "Hello from a worldswitch guest" in log.read_text()
    assert result.stdout == ""


def test_console_input_from_a_pipe() -> None:
    result = worldswitch("run", "--guest", "echo", "--timeout", "20", stdin="one\ntwo\nquit\n")
    assert result.returncode == 0, result.stderr
    assert "ONE" in result.stdout and "TWO" in result.stdout


def test_info_and_guests() -> None:
    info = worldswitch("info", "--no-measure")
    assert info.returncode == 0
    assert "API version 12" in info.stdout and "host kind" in info.stdout
    data = json.loads(worldswitch("info", "--json", "--no-measure").stdout)
    assert data["api_version"] == 12 and data["kind"]["driver"] in ("vmx", "svm", "pvm", "unknown")
    guests = worldswitch("guests")
    assert "hello" in guests.stdout and "(default)" in guests.stdout


def printing_program(tmp_path: Path, ending: str = "hlt\n    jmp 2b") -> Path:
    """A bare-metal program that prints its argument string on COM1, then does `ending` (label 2)."""
    source = tmp_path / "say.S"
    source.write_text(
        f"""
        .globl _start
        _start:
            mov %rdi, %rsi          /* the argument string */
        1:  movb (%rsi), %al
            test %al, %al
            jz 2f
            mov $0x3f8, %dx
            outb %al, %dx
            inc %rsi
            jmp 1b
        2:  {ending}
        """
    )
    program = tmp_path / "say.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x200000", "-o", str(program), str(source)],
                   check=True)
    return program


def test_a_users_own_elf_program(tmp_path: Path) -> None:
    """The README's promise: a static ELF64 entered in ring 0, RDI = arguments, port I/O to COM1."""
    program = printing_program(tmp_path, ending="mov $42, %eax\n    mov $0xf4, %dx\n    outl %eax, %dx")
    result = worldswitch("run", "--elf", str(program), "--args", "my own program", "--quiet")
    assert result.stdout == "my own program"
    assert result.returncode == 42


def test_a_guest_kernel_panic_ends_the_vm_or_pauses_it(tmp_path: Path) -> None:
    program = printing_program(tmp_path)
    panic = "Kernel panic - not syncing: VFS: Unable to mount root fs\n"
    result = worldswitch("run", "--elf", str(program), "--args", panic, "--timeout", "30")
    assert result.returncode == 3, result.stderr
    assert "guest kernel panic: Kernel panic - not syncing: VFS: Unable to mount root fs" in result.stderr
    socket = tmp_path / "vm.sock"
    process = subprocess.Popen([*COMMAND, "run", "--elf", str(program), "--args", panic, "--on-panic", "pause",
                                "--control", str(socket), "--timeout", "30"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        state = None
        while time.monotonic() < deadline and state != "paused":
            time.sleep(0.1)
            if socket.exists():
                state = json.loads(worldswitch("ctl", str(socket), "status").stdout or "{}").get("state")
        assert state == "paused"  # kept for inspection
        assert worldswitch("ctl", str(socket), "stop").returncode == 0
        _, err = process.communicate(timeout=30)
        assert "guest panicked; paused for inspection" in err
    finally:
        process.kill()


def test_elf_loaded_over_vmm_memory_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "low.S"
    source.write_text(".globl _start\n_start: hlt\n")
    program = tmp_path / "low.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x1000", "-o", str(program), str(source)],
                   check=True)
    assert_one_line_error(worldswitch("run", "--elf", str(program)), 2, "overlaps memory the VMM uses")


class Terminal:
    """`worldswitch run` on a pseudo-terminal, as on a user's screen."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.slave_attrs = termios.tcgetattr(slave)
        self.slave = slave
        self.process = subprocess.Popen([*COMMAND, "run", *args], stdin=slave, stdout=slave, stderr=slave,
                                        start_new_session=True)
        self.output = b""

    def read_until(self, needle: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:
                    break
        assert needle in self.output, self.output
        return self.output

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 20) -> int:
        status = self.process.wait(timeout)
        try:
            while select.select([self.master], [], [], 0.2)[0]:
                chunk = os.read(self.master, 4096)
                if not chunk:
                    break
                self.output += chunk
        except OSError:
            pass
        return status

    def attrs(self) -> list:  # type: ignore[type-arg]
        return termios.tcgetattr(self.slave)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


def test_terminal_raw_mode_keys_reach_the_guest_and_ctrl_a_x_quits() -> None:
    term = Terminal("--guest", "echo")
    try:
        term.read_until(b"type a line")
        raw = term.attrs()
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO  # raw while the VM runs
        term.send(b"abc\x03def\r")  # Ctrl-C goes to the guest, it does not kill the VMX
        term.read_until(b"ABC\x03DEF")
        term.send(b"\x01x")
        assert term.finish() == 0
        assert b"stopped by the user" in term.output
        assert term.attrs() == term.slave_attrs  # the terminal is back as it was
    finally:
        term.close()


def test_terminal_is_restored_when_the_guest_ends_and_on_sigterm() -> None:
    term = Terminal("--guest", "echo")
    try:
        term.read_until(b"type a line")
        term.send(b"quit\r")
        assert term.finish() == 0
        assert term.attrs() == term.slave_attrs
    finally:
        term.close()
    term = Terminal("--guest", "fault", "--args", "spin")
    try:
        term.read_until(b"control socket", timeout=60)  # the VM runs: a signal now meets the VMX's handlers
        term.process.send_signal(signal.SIGTERM)
        assert term.finish() == 0
        assert b"stopped by the user" in term.output
        assert term.attrs() == term.slave_attrs
    finally:
        term.close()


def test_sigint_without_a_terminal_stops_the_vm_cleanly() -> None:
    # SIGINT as a terminal's Ctrl-C sends it (a test run in the background inherits it ignored)
    process = subprocess.Popen([*COMMAND, "run", "--guest", "fault", "--args", "spin"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stderr is not None
    started = process.stderr.readline()  # the VM runs: a signal now meets the VMX's handlers
    assert "control socket" in started, started
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    err = started + err
    assert process.returncode == 130
    assert "interrupted" in err and "Traceback" not in err


LAUNCH_WITH_CTRL_C_DURING_IMPORTS = """
import importlib.abc, os, signal, sys
class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "worldswitch.vmx.cli":
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = ["worldswitch", "info"]
from worldswitch.vmx.launch import main
sys.exit(main())
"""


def test_ctrl_c_while_the_command_is_still_importing_ends_it_quietly() -> None:
    # The signal arrives while the CLI's modules load, before main() has handlers of its own.
    result = subprocess.run([sys.executable, "-c", LAUNCH_WITH_CTRL_C_DURING_IMPORTS], capture_output=True, text=True,
                            timeout=30, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == -signal.SIGINT
    assert result.stderr == "" and result.stdout == ""


def test_an_ignored_sighup_stays_ignored() -> None:
    """`nohup worldswitch run ... &`: the VM survives the hang-up."""
    process = subprocess.Popen([*COMMAND, "run", "--guest", "fault", "--args", "spin", "--timeout", "3"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    time.sleep(1.5)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 124, err  # it ran on until its timeout


def test_a_pty_console_says_where_it_is() -> None:
    result = worldswitch("run", "--vconsole", "pty", "--quiet")
    assert result.returncode == 0 and re.search(r"worldswitch: virtio console on /dev/pts/\d+", result.stderr), result.stderr


def test_the_timeout_counts_from_when_the_guest_runs(monkeypatch) -> None:
    """Building (and restoring a big snapshot) can take a while; --timeout is the guest's time."""
    from worldswitch.vmx import api, cli

    build = api.Machine.build

    def slow_build(self):  # type: ignore[no-untyped-def]
        time.sleep(2)
        return build(self)

    monkeypatch.setattr(api.Machine, "build", slow_build)
    started = time.monotonic()
    assert cli.main(["run", "--guest", "fault", "--args", "spin", "--timeout", "1", "--quiet", "--serial", "none"]) == 124
    assert time.monotonic() - started >= 3  # 2 s building, then a whole second of guest time
