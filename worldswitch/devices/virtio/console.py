"""virtio-console (virtio 1.2, section 5.3), one port, no multiport: a second console next to the
UART. Queue 0 receives (host to guest), queue 1 transmits. The back end is a pseudo-terminal the
user can attach to (`screen /dev/pts/N`), a file that collects output, or nothing.

Input waits in a bounded buffer until the guest posts receive buffers; while that buffer is full
the back end is not read (the I/O thread stops watching it), so nothing is dropped and nothing spins.
"""

from __future__ import annotations

import os
import tty

from ...errors import ConfigError
from ...memory.guest import GuestMemory
from ...record import record
from . import CONSOLE
from .device import VirtioDevice, VirtioLink

RECEIVE, TRANSMIT = 0, 1
PENDING_LIMIT = 64 * 1024


class ConsoleBackend:
    name = "none"
    fd: int | None = None  # readable for input, or None

    def read(self) -> bytes:
        return b""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class PtyBackend(ConsoleBackend):
    def __init__(self) -> None:
        self._master, self._slave = os.openpty()
        self.fd = self._master
        tty.setraw(self._slave)  # bytes pass unchanged, as on a serial line
        os.set_blocking(self._master, False)
        self.name = os.ttyname(self._slave)

    def read(self) -> bytes:
        try:
            return os.read(self._master, 4096)
        except (BlockingIOError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        try:
            os.write(self._master, data)
        except OSError:
            pass  # nobody attached and the pty buffer is full: console output is not worth a stall

    def close(self) -> None:
        for fd in (self._master, self._slave):
            os.close(fd)


class FileBackend(ConsoleBackend):
    def __init__(self, path: str) -> None:
        try:
            self._out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise ConfigError(f"cannot open virtio console file {path}: {error.strerror}") from None
        self.name = path

    def write(self, data: bytes) -> None:
        os.write(self._out, data)

    def close(self) -> None:
        os.close(self._out)


def open_backend(spec: str) -> ConsoleBackend:
    if spec == "pty":
        return PtyBackend()
    if spec == "none":
        return ConsoleBackend()
    if spec.startswith("file:") and len(spec) > 5:
        return FileBackend(spec[5:])
    raise ConfigError(f"unknown virtio console back end {spec!r}: use pty, file:PATH or none")


@record(frozen=True)
class ConsoleState:
    pending: bytes  # received from the back end, not yet given to the guest


class VirtioConsole(VirtioDevice):
    device_type = CONSOLE
    name = "virtio-console"
    queue_sizes = (64, 64)

    def __init__(self, link: VirtioLink, memory: GuestMemory, backend: ConsoleBackend) -> None:
        super().__init__(link, memory)
        self.backend = backend
        self.pending = bytearray()
        self.bytes_in = self.bytes_out = 0

    def _pause_input(self, paused: bool) -> None:
        if self.backend.fd is not None:
            self.link.pause_input(self.backend.fd, paused)

    def config(self) -> bytes:
        return bytes(12)  # cols, rows, max_nr_ports, emerg_wr: none of their features is offered

    def extra_fds(self):  # type: ignore[no-untyped-def]
        return [(self.backend.fd, self.input_ready)] if self.backend.fd is not None else []

    def input_ready(self) -> None:
        data = self.backend.read()
        self.pending += data
        self.bytes_in += len(data)
        self._deliver()

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}

    def process(self, index: int) -> None:
        queue = self.queues[index]
        assert queue is not None
        if index == TRANSMIT:
            while True:
                while (chain := queue.pop()) is not None:
                    data = b"".join(bytes(self.memory.view(b.gpa, b.length)) for b in chain.readable)
                    self.backend.write(data)
                    self.bytes_out += len(data)
                    self.complete(queue, index, chain.head, 0)
                if not self.finish_batch(queue, index):
                    return
        else:
            self._deliver()  # new receive buffers: hand over what is waiting

    def _deliver(self) -> None:
        queue = self.queues[RECEIVE]
        if queue is not None:
            while True:
                while self.pending and (chain := queue.pop()) is not None:
                    written = 0
                    for buffer in chain.writable:
                        chunk = self.pending[written : written + buffer.length]
                        self.memory.write(buffer.gpa, bytes(chunk))
                        written += len(chunk)
                        if written == len(self.pending):
                            break
                    del self.pending[:written]
                    self.complete(queue, RECEIVE, chain.head, written)
                if not (self.finish_batch(queue, RECEIVE) and self.pending):
                    break  # delivered all, or no buffers and none came after we looked
        self._pause_input(len(self.pending) >= PENDING_LIMIT)

    state_type = ConsoleState

    def state(self) -> ConsoleState:
        return ConsoleState(bytes(self.pending))

    def restore(self, state: object) -> None:
        assert isinstance(state, ConsoleState)
        self.pending = bytearray(state.pending)

    def reset(self) -> None:
        self.pending.clear()  # the transport watches the pty again at the next DRIVER_OK

    def close(self) -> None:
        self.backend.close()
