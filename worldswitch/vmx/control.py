"""The control API: a running VM listens on a UNIX socket (mode 0600) and answers JSON requests, one
per line, with one JSON response per line. docs/control-api.md is the reference.

    request   {"id": 7, "command": "pause"}           (id is optional and echoed back)
    response  {"id": 7, "ok": true, "result": {...}}
              {"id": 7, "ok": false, "error": {"code": "unknown-command", "message": "..."}}
    events    after {"command": "events"}, the connection also carries {"event": "...", ...} lines

No client can hold up the VMX: one thread does all socket I/O, never blocking (a selector over the
listener and every connection); each connection's output waits in a bounded buffer, and a subscriber
that stops reading is told and dropped once its buffer is full. Commands run on a small pool, one at
a time per connection (answers stay in order); a bad request gets an error object and the connection
stays; a client that disconnects costs nothing but its connection.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import socket
import stat
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ..errors import WorldswitchError
from ..sandbox import confine_thread
from ..vmm.result import StopReason

MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 256  # connections served at once; more are told so and closed
OUTPUT_LIMIT = 1 << 20  # bytes waiting for one client: beyond it an events subscriber is dropped
DROP_GRACE_S = 30.0  # how long a dropped subscriber has to read its last line (all it still holds is that line)
BACKLOG = 128
LOOP_TICK_S = 1.0  # the I/O thread looks at dropped subscribers at least this often
COMMAND_THREADS = 4
COMMANDS = ("status", "pause", "resume", "stop", "stats", "registers", "snapshot", "events", "help")


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def default_socket_path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "worldswitch" if runtime else Path(f"/tmp/worldswitch-{os.getuid()}")
    return base / f"{os.getpid()}.sock"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, allow_nan=False) + "\n").encode()


class Client:
    """One connection: what it sent that is not a line yet, what waits to be sent to it, and its queue
    of requests (one runs at a time, so that answers come in order). Guarded by the server's lock."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.received = bytearray()
        self.discarding = False  # the rest of an over-long line is skipped up to its newline
        self.output = bytearray()
        self.requests: deque[bytes] = deque()
        self.busy = False  # a request of this client is running
        self.subscribed = False
        self.dropped_at: float | None = None  # fell behind: closed once its last line is out, or soon after
        self.mid_line = False  # the socket has part of a line: the rest must follow before anything else
        self.closed = False


class ControlServer:
    """Serves one machine. `vm` is a worldswitch.vmx.api.VirtualMachine (or anything with its methods)."""

    def __init__(self, vm: Any, path: str | Path | None = None) -> None:
        self.vm = vm
        self.explicit = path is not None
        self.path = Path(path) if path else default_socket_path()
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the socket we made
        self._selector = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._clients: dict[int, Client] = {}
        self._lock = threading.Lock()  # guards the clients' buffers and queues; no socket I/O under it
        # Commands run on threads made here, before any sandbox: a thread inherits its maker's seccomp
        # filters, and the I/O thread's forbid the paths a snapshot writes.
        self._commands: queue.SimpleQueue[tuple[Client, bytes] | None] = queue.SimpleQueue()
        self._command_threads = [threading.Thread(target=self._serve_commands, name=f"control-command{index}", daemon=True)
                                 for index in range(COMMAND_THREADS)]
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dropped = 0  # subscribers dropped for falling behind

    @property
    def connections(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    @property
    def subscribers(self) -> int:
        """Clients receiving events now (and not yet dropped)."""
        with self._lock:
            return sum(1 for client in self._clients.values() if client.subscribed and client.dropped_at is None)

    # --- the socket file ----------------------------------------------------------------------

    def start(self) -> None:
        self._prepare_directory()
        self._clear_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: only this user may drive the VM
        try:
            listener.bind(str(self.path))
        except OSError as error:
            listener.close()
            reason = "the path is too long for a UNIX socket" if "too long" in str(error) else error.strerror
            raise WorldswitchError(f"cannot create the control socket {self.path}: {reason}") from None
        finally:
            os.umask(old_umask)
        made = os.lstat(self.path)
        self._identity = (made.st_dev, made.st_ino)
        listener.listen(BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        for thread in self._command_threads:
            thread.start()
        self._thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self._thread.start()

    def _prepare_directory(self) -> None:
        folder = self.path.parent
        if self.explicit:
            if not folder.is_dir():  # the user's path: a typo must not create directories
                raise WorldswitchError(f"cannot create the control socket {self.path}: {folder} is not a directory")
            return
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            # in /tmp, someone else could have made it first to catch our socket
            raise WorldswitchError(f"{folder} is not a private directory of this user; remove it or use --control PATH")

    def _clear_stale_socket(self) -> None:
        """Remove what a killed VMX left at the path, and only that: a socket nobody listens on."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise WorldswitchError(f"{self.path} exists and is not a socket; not replacing it (choose another --control path)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            os.unlink(self.path)  # nothing listens: left behind by a VMX that did not end cleanly
            return
        except OSError as error:
            raise WorldswitchError(f"cannot tell whether {self.path} is in use: {error.strerror}") from None
        finally:
            probe.close()
        raise WorldswitchError(f"another VMX is listening on {self.path}")

    def close(self) -> None:
        self._stopping = True
        self._wake_loop()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for _ in self._command_threads:
            self._commands.put(None)
        for thread in self._command_threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(5)  # a command under way ends first (its answer goes nowhere)
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fileobj)
        self._selector.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for client in list(self._clients.values()):
            self._close_client(client)
        os.close(self._wake)
        try:  # only the socket this server made: never whatever replaced it
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # --- events ---------------------------------------------------------------------------------

    def publish(self, event: str, **details: Any) -> None:
        """Queue an event line for every subscriber, from any thread; never waits for a client."""
        line = encode({"event": event, "time": time.time(), **details})
        with self._lock:
            for client in self._clients.values():
                if not client.subscribed or client.dropped_at is not None:
                    continue
                if len(client.output) + len(line) > OUTPUT_LIMIT:
                    # Told at once: the events it has not taken are discarded (it would never read
                    # them all), so the notice waits only for the line the socket holds part of.
                    behind = len(client.output)
                    keep = client.output.find(b"\n") + 1 if client.mid_line else 0
                    del client.output[keep:]
                    client.dropped_at = time.monotonic()
                    client.output += encode({"event": "dropped", "time": time.time(), "reason": (
                        f"this client fell {behind} bytes behind the events; the VMX stops sending them")})
                    self.dropped += 1
                else:
                    client.output += line
        self._wake_loop()

    # --- the I/O thread ------------------------------------------------------------------------

    def _wake_loop(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # closed: the server is gone

    def _loop(self) -> None:
        while not self._stopping:
            ready = self._selector.select(timeout=LOOP_TICK_S)
            confine_thread()  # clients' bytes are handled here: no path calls once sandboxed
            for key, events in ready:
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                else:
                    client = self._clients.get(key.fd)
                    if client is None:
                        continue
                    if events & selectors.EVENT_READ:
                        self._read(client)
                    if events & selectors.EVENT_WRITE and not client.closed:
                        self._write(client)
            self._update_interest()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                connection, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of descriptors, for one: the client sees its connection closed
            connection.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                try:
                    connection.send(encode({"ok": False, "error": {"code": "busy", "message": (
                        f"the VMX serves at most {MAX_CLIENTS} connections at once")}}))
                except OSError:
                    pass
                connection.close()
                continue
            client = Client(connection)
            self._clients[connection.fileno()] = client
            self._selector.register(connection, selectors.EVENT_READ)

    def _read(self, client: Client) -> None:
        try:
            data = client.connection.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_client(client)  # gone, perhaps mid-request: a request it sent still completes
            return
        if client.discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data, client.discarding = data[newline + 1 :], False
        client.received += data
        lines = []
        while (newline := client.received.find(b"\n")) >= 0:
            lines.append(bytes(client.received[:newline]))
            del client.received[: newline + 1]
        if len(client.received) > MAX_REQUEST:
            client.received.clear()
            client.discarding = True
            with self._lock:
                client.output += encode({"ok": False, "error": {
                    "code": "too-long", "message": f"a request is at most {MAX_REQUEST} bytes"}})
        with self._lock:
            client.requests.extend(lines)
            self._next_request(client)

    def _write(self, client: Client) -> None:
        with self._lock:
            pending = bytes(client.output[:65536])
        try:
            sent = client.connection.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_client(client)
            return
        with self._lock:
            del client.output[:sent]
            if sent:
                client.mid_line = pending[sent - 1] != ord("\n")

    def _update_interest(self) -> None:
        """Watch for writability where output waits; stop reading from a client whose answers pile up
        (it keeps sending requests but does not read); close dropped subscribers once done or late."""
        now = time.monotonic()
        for client in list(self._clients.values()):
            with self._lock:
                waiting = len(client.output)
            if client.dropped_at is not None and (not waiting or now - client.dropped_at > DROP_GRACE_S):
                self._close_client(client)
                continue
            wanted = (selectors.EVENT_READ if waiting <= OUTPUT_LIMIT else 0) | (selectors.EVENT_WRITE if waiting else 0)
            if self._selector.get_key(client.connection).events != wanted:
                self._selector.modify(client.connection, wanted)

    def _close_client(self, client: Client) -> None:
        with self._lock:
            if client.closed:
                return
            client.closed = True
        self._clients.pop(client.connection.fileno(), None)
        try:
            self._selector.unregister(client.connection)
        except (KeyError, ValueError, OSError):
            pass
        client.connection.close()

    # --- requests ------------------------------------------------------------------------------

    def _next_request(self, client: Client) -> None:
        """Start the client's next request if none of its requests runs (called with the lock held)."""
        if client.busy or not client.requests or self._stopping:
            return
        client.busy = True
        line = client.requests.popleft()
        if self._stopping:
            client.busy = False
            return
        self._commands.put((client, line))

    def _serve_commands(self) -> None:
        while (work := self._commands.get()) is not None and not self._stopping:
            self._run_request(*work)

    def _run_request(self, client: Client, line: bytes) -> None:
        answer = self._answer(client, line)
        with self._lock:
            if not client.closed:
                client.output += answer
            client.busy = False
            self._next_request(client)
        self._wake_loop()

    def _answer(self, client: Client, line: bytes) -> bytes:
        request_id = None
        try:
            if not line.strip():
                raise RequestError("bad-request", "an empty line is not a request")
            try:
                request = json.loads(line, parse_constant=_reject_constant)
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
                    client.subscribed = True
                result: Any = {"subscribed": True}
            else:
                result = getattr(self, f"_do_{command}")(request)
            response = {"ok": True, "result": result}
        except RequestError as error:
            response = {"ok": False, "error": {"code": error.code, "message": str(error)}}
        except (WorldswitchError, OSError) as error:  # the host refused (a full disk, ...): not a bug
            message = str(error) if isinstance(error, WorldswitchError) else f"{error.strerror or error}"
            response = {"ok": False, "error": {"code": "failed", "message": message}}
        except Exception as error:  # noqa: BLE001 - a bug answers with an error object, never a dead VMX
            response = {"ok": False, "error": {"code": "internal", "message": f"{type(error).__name__}: {error}"}}
        if request_id is not None:
            response = {"id": request_id, **response}
        try:
            return encode(response)
        except ValueError:  # only a result could hold what JSON cannot say
            return encode({"id": request_id, "ok": False, "error": {"code": "internal", "message": "unencodable answer"}})

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


def stream_events(path: str | Path, on_event: Callable[[dict[str, Any]], None],
                  on_subscribed: Callable[[], None] = lambda: None) -> None:
    """Subscribe and hand every event to on_event until the VMX ends the stream; on_subscribed is
    called once the VMX has taken the subscription (from then on no event is missed)."""
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
            elif message.get("result") == {"subscribed": True}:
                on_subscribed()
