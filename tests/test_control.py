"""The control API: a running VM's UNIX socket, its JSON requests and answers, and events, on real
KVM; and `worldswitch ctl`, the client."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from worldswitch.vmx.api import Machine

pytestmark = pytest.mark.kvm


class Client:
    """One connection, line by line."""

    def __init__(self, path: Path) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(30)
        self.socket.connect(str(path))
        self.lines = self.socket.makefile("rb")

    def send_raw(self, data: bytes) -> None:
        self.socket.sendall(data)

    def receive(self) -> dict[str, Any]:
        line = self.lines.readline()
        assert line, "the VMX closed the connection"
        return json.loads(line)

    def ask(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.send_raw((json.dumps({"command": command, **arguments}) + "\n").encode())
        while True:
            message = self.receive()
            if "event" not in message:
                return message

    def close(self) -> None:
        self.lines.close()
        self.socket.close()


@pytest.fixture
def spinning(tmp_path: Path) -> Iterator[tuple[Machine, Path]]:
    path = tmp_path / "vm.sock"
    with Machine(guest="fault", args="spin", control=str(path)) as vm:
        vm.start()
        vm.console.expect("spinning in ring 3", timeout=30)  # past the runtime's ring-0 set-up
        yield vm, path
    assert not path.exists()  # the socket goes with the VM


def test_the_socket_is_private_and_every_command_answers(spinning: tuple[Machine, Path], tmp_path: Path) -> None:
    vm, path = spinning
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    client = Client(path)
    assert client.ask("help")["result"]["commands"] == ["status", "pause", "resume", "stop", "stats", "registers", "snapshot", "events", "help"]
    status = client.ask("status")["result"]
    assert status["state"] == "running" and status["vcpus"] == 1 and status["control_socket"] == str(path)
    answer = client.ask("pause")
    assert answer["ok"] and answer["result"]["state"] == "paused"
    assert client.ask("status")["result"]["state"] == "paused"
    assert client.ask("resume")["result"] == {"state": "running"}
    vcpus = client.ask("registers")["result"]["vcpus"]
    assert len(vcpus) == 1 and vcpus[0]["cpl"] == 3  # the spin loop runs in ring 3
    assert int(vcpus[0]["rip"], 16) > 0x100000 and int(vcpus[0]["cr3"], 16) > 0
    assert client.ask("status")["result"]["state"] == "running"  # looked at without stopping it
    stats = client.ask("stats")["result"]
    assert stats["exits"]["intr"] >= 1  # the pause brought the vCPU back through the interrupt path
    answer = client.ask("snapshot", path=str(tmp_path / "snap"), id=42)
    assert answer["id"] == 42 and answer["ok"], answer
    assert (tmp_path / "snap" / "manifest.json").exists()
    assert client.ask("status")["result"]["state"] == "running"  # a snapshot of a running VM goes on running
    assert client.ask("stop")["result"] == {"state": "stopping"}
    assert vm.wait(10) is not None
    answer = client.ask("pause")
    assert answer["error"]["code"] == "not-running"
    assert client.ask("status")["result"]["state"] == "ended"
    client.close()


@pytest.mark.parametrize("line, code", [
    (b"this is not json", "bad-json"),
    (b"[1, 2]", "bad-request"),
    (b'{"command": "reboot-the-host"}', "unknown-command"),
    (b'{"no": "command"}', "unknown-command"),
    (b'{"command": "snapshot"}', "bad-request"),
    (b'{"command": "snapshot", "path": 7}', "bad-request"),
    (b'{"command": "snapshot", "path": "/proc/no-such-dir/snap"}', "failed"),
    (b"\xff\xfe\n", "bad-json"),
])
def test_bad_requests_get_an_error_object_and_the_connection_stays(spinning: tuple[Machine, Path], line: bytes, code: str) -> None:
    vm, path = spinning
    client = Client(path)
    client.send_raw(line.rstrip(b"\n") + b"\n")
    answer = client.receive()
    assert answer["ok"] is False and answer["error"]["code"] == code, answer
    assert answer["error"]["message"]
    assert client.ask("status")["result"]["state"] == "running"
    client.close()


def test_an_over_long_request_is_refused(spinning: tuple[Machine, Path]) -> None:
    vm, path = spinning
    client = Client(path)
    client.send_raw(b"x" * (200 * 1024))
    assert client.receive()["error"]["code"] == "too-long"
    client.send_raw(b"\n")
    assert client.ask("status")["ok"]
    client.close()


def test_a_snapshot_never_overwrites(spinning: tuple[Machine, Path], tmp_path: Path) -> None:
    vm, path = spinning
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("mine")
    answer = Client(path).ask("snapshot", path=str(tmp_path / "taken"))
    assert answer["error"]["code"] == "failed" and "already exists" in answer["error"]["message"]
    assert (tmp_path / "taken" / "precious.txt").read_text() == "mine"


def test_two_clients_at_once_and_an_event_stream(spinning: tuple[Machine, Path]) -> None:
    vm, path = spinning
    watcher = Client(path)
    assert watcher.ask("events")["result"] == {"subscribed": True}
    answers: list[dict[str, Any]] = []

    def hammer() -> None:
        client = Client(path)
        for _ in range(20):
            answers.append(client.ask("status"))
        client.close()

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    other = Client(path)
    other.ask("pause")
    other.ask("resume")
    for thread in threads:
        thread.join(30)
    assert len(answers) == 40 and all(answer["ok"] for answer in answers)
    other.ask("stop")
    events = [watcher.receive()["event"] for _ in range(3)]
    assert events == ["paused", "resumed", "shutdown"]


def test_a_client_that_disconnects_mid_request_costs_nothing(spinning: tuple[Machine, Path], tmp_path: Path) -> None:
    vm, path = spinning
    half = Client(path)
    half.send_raw(b'{"command": "sta')  # and never finishes the line
    half.close()
    impatient = Client(path)
    impatient.send_raw(json.dumps({"command": "snapshot", "path": str(tmp_path / "s")}).encode() + b"\n")
    impatient.close()  # gone before the answer
    subscriber = Client(path)
    subscriber.ask("events")
    subscriber.close()  # a dead subscriber is dropped at the next event
    client = Client(path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "s" / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "s" / "manifest.json").exists()  # the request was served all the same
    assert client.ask("pause")["ok"] and client.ask("resume")["ok"]
    assert client.ask("status")["result"]["state"] == "running"
    client.close()


def test_a_second_vmx_cannot_take_a_live_socket(spinning: tuple[Machine, Path]) -> None:
    vm, path = spinning
    from worldswitch.errors import WorldswitchError

    other = Machine(guest="hello", control=str(path))
    with pytest.raises(WorldswitchError, match="another VMX is listening"):
        other.start()
    other.close()
    assert Client(path).ask("status")["ok"]


# --- worldswitch ctl, against worldswitch run --------------------------------------------------------

COMMAND = [sys.executable, "-m", "worldswitch"]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, "ctl", *args], capture_output=True, text=True, timeout=60)


def test_worldswitch_ctl_drives_worldswitch_run(tmp_path: Path) -> None:
    path = tmp_path / "run.sock"
    run = subprocess.Popen([*COMMAND, "run", "--guest", "fault", "--args", "spin", "--control", str(path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        events = subprocess.Popen([*COMMAND, "ctl", str(path), "events"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert events.stderr is not None  # the subscription is taken before anything happens that it must see
        assert events.stderr.readline().strip() == f"worldswitch: subscribed to {path}"
        assert json.loads(ctl(str(path), "status").stdout)["state"] == "running"
        assert json.loads(ctl(str(path), "pause").stdout)["state"] == "paused"
        # a relative path is the client's, not the VMX's working directory
        cwd_result = subprocess.run([*COMMAND, "ctl", str(path), "snapshot", "path=snap"], capture_output=True,
                                    text=True, timeout=60, cwd=tmp_path)
        assert cwd_result.returncode == 0, cwd_result.stderr
        assert (tmp_path / "snap" / "manifest.json").exists()
        bad = ctl(str(path), "frobnicate")
        assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
            "worldswitch: error: unknown-command: unknown command 'frobnicate'; known: status, pause, resume, stop, "
            "stats, registers, snapshot, events, help"]
        assert ctl(str(path), "stop").returncode == 0
        out, err = run.communicate(timeout=30)
        assert run.returncode == 0, err
        assert f"control socket {path}" in err and "stopped through the control socket" in err
        names = [json.loads(line)["event"] for line in events.communicate(timeout=30)[0].splitlines()]
        assert names[-1] == "shutdown" and "snapshot" in names
    finally:
        run.kill()


def test_ctl_to_nothing_is_one_line() -> None:
    result = ctl("/nonexistent/vm.sock", "status")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["worldswitch: error: cannot reach the VMX at /nonexistent/vm.sock: No such file or directory"]
    result = ctl("/nonexistent/vm.sock", "snapshot", "no-equals-sign")
    assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr


def test_pause_resume_and_snapshot_from_two_clients_do_not_interleave(spinning: tuple[Machine, Path], tmp_path: Path) -> None:
    vm, path = spinning
    answers: list[dict[str, Any]] = []

    def toggle() -> None:
        client = Client(path)
        for _ in range(10):
            answers.append(client.ask("pause"))
            answers.append(client.ask("resume"))
        client.close()

    toggler = threading.Thread(target=toggle)
    toggler.start()
    snapshot = Client(path).ask("snapshot", path=str(tmp_path / "snap"))
    toggler.join(60)
    assert snapshot["ok"], snapshot
    assert len(answers) == 20 and all(answer["ok"] for answer in answers)
    assert Client(path).ask("status")["result"]["state"] == "running"  # the last word was a resume
    from worldswitch.vmm.snapshot import open_snapshot

    assert open_snapshot(tmp_path / "snap").manifest["vcpus"] == 1


# --- hostile users and clients (issue 11) ------------------------------------------------------------


@pytest.mark.parametrize("what", ["file", "symlink", "directory"])
def test_control_never_removes_what_is_not_a_stale_socket(tmp_path: Path, what: str) -> None:
    """`--control vm.toml` (a typo) must not delete the machine file, nor anything else at the path."""
    from worldswitch.errors import WorldswitchError

    target = tmp_path / "vm.toml"
    if what == "file":
        target.write_text("memory = '1G'\n")
    elif what == "symlink":
        (tmp_path / "elsewhere").write_text("keep me\n")
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.mkdir()
    machine = Machine(guest="hello", control=str(target))
    with pytest.raises(WorldswitchError, match="exists and is not a socket"):
        machine.start()
    machine.close()
    if what == "file":
        assert target.read_text() == "memory = '1G'\n"
    elif what == "symlink":
        assert target.is_symlink() and (tmp_path / "elsewhere").read_text() == "keep me\n"
    else:
        assert target.is_dir()


def test_a_stale_socket_is_replaced_and_only_our_own_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a killed VMX leaves
    stale.close()
    with Machine(guest="fault", args="spin", control=str(path)) as vm:
        vm.start()
        assert Client(path).ask("status")["ok"]
        os.unlink(path)
        path.write_text("someone else's file\n")  # replaced while the VM ran
    assert path.read_text() == "someone else's file\n"


def test_control_paths_that_cannot_be_sockets_are_one_line_errors(tmp_path: Path) -> None:
    for path, message in ((tmp_path / "missing" / "vm.sock", "is not a directory"),
                          (tmp_path / ("x" * 120) / "vm.sock", "too long")):
        if "x" * 120 in str(path):
            path.parent.mkdir()
        result = subprocess.run([*COMMAND, "run", "--guest", "hello", "--control", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "missing").exists()  # no directories made for a typo


def test_a_subscriber_that_never_reads_cannot_hold_up_the_vmx(spinning: tuple[Machine, Path]) -> None:
    vm, path = spinning
    sleeper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.connect(str(path))
    sleeper.sendall(b'{"command": "events"}\n')  # and then never reads
    assert vm.control is not None
    deadline = time.monotonic() + 30
    while vm.control.subscribers < 1:
        assert time.monotonic() < deadline, "the events request was never served"
        time.sleep(0.01)
    # About 4 MiB of events, far more than sockets and the queue hold. The first 2,000 fit in the
    # client's buffer; they time what a publish costs on this host (QEMU's TCG is 10x slower). A
    # publish that waited for the client would never end; one that does not stays near that pace.
    started = time.monotonic()
    for number in range(2000):
        vm.control.publish("test-event", number=number, padding="x" * 160)
    pace = time.monotonic() - started
    for number in range(2000, 20000):
        vm.control.publish("test-event", number=number, padding="x" * 160)
    assert time.monotonic() - started - pace < 9 * pace * 3 + 5  # publishing never waited for the client
    client = Client(path)
    for _ in range(5):  # the VMX still answers, pauses and resumes
        assert client.ask("pause")["ok"] and client.ask("resume")["ok"]
    deadline = time.monotonic() + 10
    while vm.control.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vm.control.dropped == 1
    # told, then cut off: what it reads ends with the "dropped" event, then the end of the stream
    sleeper.settimeout(10)
    data = b""
    while chunk := sleeper.recv(1 << 20):
        data += chunk
    assert b'"event": "dropped"' in data.splitlines()[-1]
    sleeper.close()
    client.close()


def test_many_idle_clients_cost_no_threads_and_a_burst_is_served(spinning: tuple[Machine, Path]) -> None:
    from worldswitch.vmx.control import MAX_CLIENTS

    vm, path = spinning
    threads_before = threading.active_count()
    idle = []
    for _ in range(MAX_CLIENTS):
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(path))
        idle.append(connection)
    assert threading.active_count() <= threads_before + 4  # the command pool, not one thread per client
    assert vm.control is not None
    deadline = time.monotonic() + 30
    while vm.control.connections < MAX_CLIENTS:  # a connect returns once queued, before the VMX accepts it
        assert time.monotonic() < deadline, vm.control.connections
        time.sleep(0.01)
    extra = Client(path)  # a backlog still full of the idle ones would refuse it (EAGAIN), not the VMX
    assert extra.receive()["error"]["code"] == "busy"  # one more than the VMX serves is told so
    extra.close()
    for connection in idle:
        connection.close()
    assert vm.control is not None
    deadline = time.monotonic() + 10
    while vm.control.connections and time.monotonic() < deadline:  # the VMX has seen them go
        time.sleep(0.01)
    answers: list[dict[str, Any]] = []
    burst = [Client(path) for _ in range(100)]  # connected before any is served: the listen backlog holds them
    for client in burst:
        client.send_raw(b'{"command": "status"}\n')
    for client in burst:
        answers.append(client.receive())
        client.close()
    assert len(answers) == 100 and all(answer["ok"] for answer in answers)


def test_blank_lines_and_non_json_numbers_get_an_error(spinning: tuple[Machine, Path]) -> None:
    vm, path = spinning
    client = Client(path)
    client.send_raw(b"\n")
    assert client.receive()["error"]["code"] == "bad-request"
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        client.send_raw(b'{"id": ' + constant + b', "command": "status"}\n')
        answer = json.loads(client.lines.readline(), parse_constant=lambda name: pytest.fail(f"{name} echoed back"))
        assert answer["error"]["code"] == "bad-json" and "id" not in answer
    client.close()


def test_ctl_into_a_closed_pipe_ends_quietly(spinning: tuple[Machine, Path]) -> None:
    """`worldswitch ctl SOCKET events | head -1`: once head has gone, the next event ends ctl quietly."""
    vm, path = spinning
    events = subprocess.Popen([*COMMAND, "ctl", str(path), "events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert events.stdout is not None and events.stderr is not None
    assert events.stderr.readline().strip() == f"worldswitch: subscribed to {path}".encode()  # no event is missed now
    vm.pause()
    assert json.loads(events.stdout.readline())["event"] == "paused"
    events.stdout.close()  # head -1 has what it wanted
    vm.resume()
    vm.pause()
    vm.resume()
    assert events.wait(30) == 141
    assert events.stderr.read() == b""  # quietly: nothing after the subscription
