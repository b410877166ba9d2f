"""The control API: a running VM listens on a UNIX socket (mode 0600) and answers JSON requests, one
per line, with one JSON response per line. docs/control-api.md is the reference.

    request   {"id": 7, "command": "pause"}           (id is optional and echoed back)
    response  {"id": 7, "ok": true, "result": {...}}
              {"id": 7, "ok": false, "error": {"code": "unknown-command", "message": "..."}}
    events    after {"command": "events"}, the connection also carries {"event": "...", ...} lines

A bad request gets an error object and the connection stays open; a client that disconnects in
the middle of anything costs the VMX nothing but that connection. Each client has its own thread.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import WorldswitchError
from ..vmm.result import StopReason

MAX_REQUEST = 64 * 1024
COMMANDS = ("status", "pause", "resume", "stop", "stats", "registers", "snapshot", "events", "help")


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def default_socket_path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "worldswitch" if runtime else Path(f"/tmp/worldswitch-{os.getuid()}")
    return base / f"{os.getpid()}.sock"


class ControlServer:
    """Serves one machine. `vm` is a worldswitch.vmx.api.VirtualMachine (or anything with its methods)."""

    def __init__(self, vm: Any, path: str | Path | None = None) -> None:
        self.vm = vm
        self.path = Path(path) if path else default_socket_path()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._subscribers: list[tuple[socket.socket, threading.Lock]] = []
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.parent == default_socket_path().parent:
            folder = os.lstat(self.path.parent)
            if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.getuid() or folder.st_mode & 0o077:
                # in /tmp, someone else could have made it first to catch our socket
                raise WorldswitchError(f"{self.path.parent} is not a private directory of this user; "
                                       "remove it or use --control PATH")
        if self.path.exists() or self.path.is_symlink():
            if self._answers(self.path):
                raise WorldswitchError(f"another VMX is listening on {self.path}")
            self.path.unlink()  # left behind by a VMX that did not end cleanly
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: only this user may drive the VM
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(8)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    @staticmethod
    def _answers(path: Path) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def close(self) -> None:
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        with self._lock:
            for connection, _ in self._subscribers:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._subscribers.clear()

    # --- events -----------------------------------------------------------------------------

    def publish(self, event: str, **details: Any) -> None:
        """Send an event line to every subscribed client; dead ones are dropped."""
        line = (json.dumps({"event": event, "time": time.time(), **details}) + "\n").encode()
        with self._lock:
            alive = []
            for connection, lock in self._subscribers:
                try:
                    with lock:
                        connection.sendall(line)
                    alive.append((connection, lock))
                except OSError:
                    pass
            self._subscribers = alive

    # --- serving ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping and self._listener is not None:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), name="control-client", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        send_lock = threading.Lock()
        buffer = b""
        discarding = False  # the rest of an over-long line is skipped up to its newline
        try:
            while True:
                try:
                    data = connection.recv(65536)
                except OSError:
                    return
                if not data:
                    return  # the client went away, perhaps mid-request: nothing to clean up but this
                if discarding:
                    newline = data.find(b"\n")
                    if newline < 0:
                        continue
                    data, discarding = data[newline + 1 :], False
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._answer(connection, send_lock, line)
                if len(buffer) > MAX_REQUEST:
                    self._send(connection, send_lock, {"ok": False, "error": {
                        "code": "too-long", "message": f"a request is at most {MAX_REQUEST} bytes"}})
                    buffer, discarding = b"", True
        finally:
            with self._lock:
                self._subscribers = [(c, l) for c, l in self._subscribers if c is not connection]
            connection.close()

    def _send(self, connection: socket.socket, lock: threading.Lock, message: dict[str, Any]) -> None:
        try:
            with lock:
                connection.sendall((json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the client left; its thread ends at the next recv

    def _answer(self, connection: socket.socket, lock: threading.Lock, line: bytes) -> None:
        request_id = None
        try:
            try:
                request = json.loads(line)
            except ValueError as error:
                raise RequestError("bad-json", f"the request is not JSON: {error}") from None
            if not isinstance(request, dict):
                raise RequestError("bad-request", "a request is a JSON object")
            request_id = request.get("id")
            command = request.get("command")
            if command not in COMMANDS:
                raise RequestError("unknown-command", f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
            if command == "events":
                with self._lock:
                    self._subscribers.append((connection, lock))
                result: Any = {"subscribed": True}
            else:
                result = getattr(self, f"_do_{command}")(request)
            response = {"ok": True, "result": result}
        except RequestError as error:
            response = {"ok": False, "error": {"code": error.code, "message": str(error)}}
        except WorldswitchError as error:
            response = {"ok": False, "error": {"code": "failed", "message": str(error)}}
        except Exception as error:  # noqa: BLE001 - a bug answers with an error object, never a dead VMX
            response = {"ok": False, "error": {"code": "internal", "message": f"{type(error).__name__}: {error}"}}
        if request_id is not None:
            response = {"id": request_id, **response}
        self._send(connection, lock, response)

    # --- commands -----------------------------------------------------------------------------

    def _do_help(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"commands": list(COMMANDS)}

    def _do_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.vm.status()

    def _do_pause(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_running()
        started = time.perf_counter()
        self.vm.pause()
        return {"state": "paused", "seconds": time.perf_counter() - started}

    def _do_resume(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_running()
        self.vm.resume()
        return {"state": "running"}

    def _do_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_running()
        self.vm.request_stop(StopReason.STOPPED, "stopped through the control socket")
        return {"state": "stopping"}

    def _do_stats(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.vm.stats()

    def _do_registers(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_running()
        return {"vcpus": [{name: f"{value:#x}" if name not in ("cpl",) else value for name, value in vcpu.items()}
                          for vcpu in self.vm.registers()]}

    def _do_snapshot(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_running()
        path = request.get("path")
        if not isinstance(path, str) or not path:
            raise RequestError("bad-request", "snapshot needs a 'path': the directory to create")
        info = self.vm.snapshot(path)
        return {"path": info.path, "memory_bytes": info.memory_bytes, "stored_bytes": info.stored_bytes,
                "seconds": info.seconds}

    def _require_running(self) -> None:
        if not self.vm.alive:
            raise RequestError("not-running", "the machine has ended")


def request(socket_path: str | Path, command: str, timeout: float = 60.0,
            arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request, one response: the client side of `worldswitch ctl`."""
    path = socket_path
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    try:
        connection.connect(str(path))
    except OSError as error:
        raise WorldswitchError(f"cannot reach the VMX at {path}: {error.strerror}") from None
    try:
        connection.sendall((json.dumps({"id": 1, **(arguments or {}), "command": command}) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = connection.recv(65536)
            if not chunk:
                raise WorldswitchError("the VMX closed the connection without answering")
            data += chunk
        return json.loads(data)
    finally:
        connection.close()


def stream_events(path: str | Path, on_event: Callable[[dict[str, Any]], None]) -> None:
    """Subscribe and hand every event to on_event until the VMX ends the stream."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError as error:
        raise WorldswitchError(f"cannot reach the VMX at {path}: {error.strerror}") from None
    with connection, connection.makefile("rb") as lines:
        connection.sendall(b'{"command": "events"}\n')
        for line in lines:
            message = json.loads(line)
            if "event" in message:
                on_event(message)
