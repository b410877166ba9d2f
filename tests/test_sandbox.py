"""The sandboxed VMX (worldswitch/sandbox/): on by default for `worldswitch run` and `restore`, it
runs guests with disks, consoles, snapshots and the control socket, and a thread that tries what the
filters forbid is stopped, not obeyed. Each run is a real `worldswitch` process on /dev/kvm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worldswitch.sandbox import describe_process

pytestmark = pytest.mark.kvm

COMMAND = [sys.executable, "-m", "worldswitch"]
SIGSYS_STATUS = 128 + signal.SIGSYS
NOBODY = 65534


def ctl(socket_path: Path, *request: str) -> str:
    done = subprocess.run([*COMMAND, "ctl", str(socket_path), *request], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_for_socket(process: subprocess.Popen[str], path: Path) -> None:
    """Until the VMX says where its control socket is: it says so once the sandbox is applied."""
    assert process.stderr is not None
    said = []
    while True:
        line = process.stderr.readline()
        assert line, (process.wait(), "".join(said))  # its status and what it said before it ended
        if f"control socket {path}" in line:
            return
        said.append(line)


def thread_filters(pid: int) -> list[int]:
    """Seccomp_filters of every thread of `pid`: 1 for the process filter, 2 with the guest-facing one."""
    counts = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        counts.append(int(describe_process(f"{pid}/task/{task.name}").get("Seccomp_filters", 0)))
    return counts


def echo_vm(tmp_path: Path, *options: str) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp_path / "ctl.sock"
    process = subprocess.Popen([*COMMAND, "run", "--guest", "echo", "--control", str(sock), "--timeout", "300", *options],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_socket(process, sock)
    return process, sock


def test_a_sandboxed_vmx_runs_its_guest_with_disk_console_snapshot_and_control(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    process, sock = echo_vm(tmp_path, "--disk", str(disk), "--rng", "--vconsole", f"file:{tmp_path / 'vc.txt'}",
                            "--stats-json", str(tmp_path / "stats.json"), "--stats")
    assert process.stdin is not None
    status = describe_process(process.pid)
    assert (status["Seccomp"], status["NoNewPrivs"], int(status["CapEff"], 16)) == ("2", "1", 0), status
    assert int(status["CapBnd"], 16) == 0
    assert process.stdout is not None and "type a line" in process.stdout.readline()  # the vCPU runs
    filters = thread_filters(process.pid)
    assert min(filters) == 1 and max(filters) == 2, filters  # main and command threads; vCPU, workers, I/O
    assert '"paused"' in ctl(sock, "pause")
    snapshot = tmp_path / "snap"
    assert str(snapshot) in ctl(sock, "snapshot", f"path={snapshot}")
    assert '"running"' in ctl(sock, "resume")
    assert "exits" in ctl(sock, "stats")
    out, err = process.communicate("sandboxed\nquit\n", timeout=120)
    assert process.returncode == 0, err
    assert "SANDBOXED" in out
    assert "sandbox: seccomp allow-list" in err and "no capabilities; no_new_privs" in err  # --stats says it
    assert "sandbox: seccomp" in (tmp_path / "stats.json").read_text()

    restored = subprocess.Popen([*COMMAND, "restore", str(snapshot), "--control", str(tmp_path / "r.sock"),
                                 "--timeout", "300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    wait_for_socket(restored, tmp_path / "r.sock")
    assert describe_process(restored.pid)["Seccomp"] == "2"
    out, err = restored.communicate("again\nquit\n", timeout=120)
    assert restored.returncode == 0, err
    assert "AGAIN" in out


def test_a_sandboxed_vmx_does_disk_io(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * (4 << 20 >> 8))
    done = subprocess.run([*COMMAND, "run", "--guest", "vblk", "--args", "test", "--disk", str(disk), "--timeout", "300"],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "sandbox: seccomp" in done.stderr


def test_no_sandbox_leaves_the_vmx_as_it_started(tmp_path: Path) -> None:
    process, sock = echo_vm(tmp_path, "--no-sandbox", "--stats")
    status = describe_process(process.pid)
    assert (status["Seccomp"], status["NoNewPrivs"]) == ("0", "0"), status
    out, err = process.communicate("quit\n", timeout=120)
    assert process.returncode == 0, err
    assert "sandbox: none (--no-sandbox)" in err


# A VMX whose code does what it must not: the script patches one of its functions, then runs the
# worldswitch command in the same process, as `python -m worldswitch` would.
DRIVER = """
import os, socket, sys
what = sys.argv[1]
def forbidden(*args, **keywords):
    if what == "exec":
        os.execv("/bin/echo", ["echo", "EXEC-OBEYED"])
    if what == "socket":
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        print("SOCKET-OBEYED", file=sys.stderr, flush=True)
    if what == "open":
        open(sys.argv[2], "w").close()
        print("OPEN-OBEYED", file=sys.stderr, flush=True)
    return original(*args, **keywords)
if what == "open":  # on a vCPU thread, as it handles the guest's first serial write
    from worldswitch.devices.serial import Serial as patched
    original, name = patched.write, "write"
else:  # on a control-command thread, as it answers `status`
    from worldswitch.vmx.control import ControlServer as patched
    original, name = patched._do_status, "_do_status"
setattr(patched, name, forbidden)
from worldswitch.vmx.launch import main
sys.argv = ["worldswitch", *sys.argv[3:]]
sys.exit(main())
"""


@pytest.mark.parametrize("what", ["exec", "socket", "open"])
def test_a_vmx_thread_that_tries_a_forbidden_call_is_stopped(tmp_path: Path, what: str) -> None:
    sock = tmp_path / "ctl.sock"
    victim = tmp_path / "new-file"
    process = subprocess.Popen([sys.executable, "-c", DRIVER, what, str(victim), "run", "--guest", "echo",
                                "--control", str(sock), "--timeout", "120"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if what != "open":
        wait_for_socket(process, sock)
        subprocess.run([*COMMAND, "ctl", str(sock), "status"], capture_output=True, timeout=60)
    out, err = process.communicate("quit\n", timeout=120)
    assert process.returncode == -signal.SIGSYS, (process.returncode, err)
    assert "OBEYED" not in out + err
    assert not victim.exists()


def test_with_debug_the_stopped_call_is_named(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    process = subprocess.Popen([sys.executable, "-c", DRIVER, "exec", "-", "run", "--guest", "echo",
                                "--control", str(sock), "--timeout", "120"], env={**os.environ, "WORLDSWITCH_DEBUG": "1"},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_socket(process, sock)
    subprocess.run([*COMMAND, "ctl", str(sock), "status"], capture_output=True, timeout=60)
    out, err = process.communicate("quit\n", timeout=120)
    assert process.returncode == SIGSYS_STATUS, err
    assert "the sandbox stopped a forbidden system call: execve (59) in thread control-command" in err
    assert "in forbidden" in err  # the Python stack that made it
    assert "EXEC-OBEYED" not in out


@pytest.mark.skipif(os.geteuid() != 0, reason="a jail needs root")
def test_a_jailed_vmx_runs_as_its_user_inside_its_directory(tmp_path: Path) -> None:
    jail = tmp_path / "jail"
    jail.mkdir()
    os.chown(jail, NOBODY, NOBODY)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    tmp_path.chmod(0o755)
    process, sock = echo_vm(tmp_path, "--jail", str(jail), "--uid", str(NOBODY), "--gid", str(NOBODY),
                            "--disk", str(disk), "--stats-json", "stats.json")
    status = describe_process(process.pid)
    assert status["Uid"] == str(NOBODY) and status["Seccomp"] == "2", status
    assert os.readlink(f"/proc/{process.pid}/root") == str(jail)
    ctl(sock, "pause")
    assert "/snap" in ctl(sock, "snapshot", "path=/snap")  # a path inside the jail
    ctl(sock, "resume")
    out, err = process.communicate("jailed\nquit\n", timeout=120)
    assert process.returncode == 0, err
    assert "JAILED" in out
    assert (jail / "snap" / "manifest.json").stat().st_uid == NOBODY
    assert f"jail {jail} as {NOBODY}:{NOBODY}" in (jail / "stats.json").read_text()  # written inside the jail


@pytest.mark.parametrize("options, message", [
    (["--uid", "1"], "--uid and --gid go with --jail DIR"),
    (["--jail", "/nonexistent-jail", "--uid", "1", "--gid", "1"], "not a directory"),
    (["--jail", "/", "--uid", "1"], "--jail needs --uid and --gid"),
    (["--jail", "/", "--uid", "0", "--gid", "0"], "must not be root's"),
    (["--jail", "/", "--uid", "1", "--gid", "1", "--no-sandbox"], "cannot go with --no-sandbox"),
    (["--reboot", "--jail", "/", "--uid", "1", "--gid", "1"], "--reboot cannot go with --jail"),
    (["--reboot", "--net", "tap=wsx0"], "--reboot with --net needs --no-sandbox"),
])
def test_a_sandbox_that_cannot_be_is_refused_in_one_line(options: list[str], message: str) -> None:
    if os.geteuid() != 0 and "--jail" in options and "--no-sandbox" not in options:
        message = "needs worldswitch started as root"
    done = subprocess.run([*COMMAND, "run", *options], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
