"""The serial console's back end: where the guest's UART output goes and where its input comes from.

    stdio          the user's terminal in raw mode (Ctrl-A x quits, Ctrl-A a sends Ctrl-A), or, when
                   stdin is not a terminal, stdin and stdout as plain streams (pipes, files)
    file:PATH      output appended to PATH, no input
    none           output discarded

A terminal is put back the way it was on every exit path: normal return, exception, SIGTERM and
SIGHUP (which the session turns into a stop, see signals.py), and interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import select
import sys
import termios
import threading
import tty
from typing import Callable

from ..errors import ConfigError
from ..sandbox import confine_thread

CTRL_A = 0x01
ESCAPE_HELP = "\r\n[worldswitch] Ctrl-A x: quit   Ctrl-A a: send Ctrl-A   Ctrl-A h: this help\r\n"


class Console:
    """A serial back end. Subclasses decide where bytes go; input (if any) is delivered to the
    `receive` callable given to attach()."""

    interactive = False
    on_terminal = False  # the guest's output goes to the terminal stderr also writes to
    raw_active = False

    def __init__(self) -> None:
        self.last_byte = b"\n"
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self._write(data)
        self.bytes_written += len(data)
        self.last_byte = data[-1:]

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def attach(self, receive: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        """Start delivering input; on_quit is called when the user asks to quit."""

    def detach(self) -> None:
        """Stop input and restore whatever attach() changed. Safe to call more than once; attach()
        may follow again (a guest that reboots)."""

    def close(self) -> None:
        """Release the back end for good (after the last detach)."""
        self.detach()

    def ends_line(self) -> bool:
        return self.last_byte in (b"\n", b"")


class NullConsole(Console):
    def _write(self, data: bytes) -> None:
        pass


class FileConsole(Console):
    """Output appended to a file. If the host stops taking it (a full disk), the user hears it once
    and the guest runs on; its output from then on is lost, never the VM."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.failed: str | None = None
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise ConfigError(f"cannot open serial output file {path}: {error.strerror}") from None

    def _write(self, data: bytes) -> None:
        if self.failed is not None:
            return
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as error:
            self.failed = error.strerror or str(error)
            stderr_line(f"warning: the serial output file {self.path} failed ({self.failed}); "
                        "the guest's output from here on is lost", self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StreamConsole(Console):
    """stdin/stdout as byte streams: input is read until EOF and fed to the guest."""

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        super().__init__()
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.on_terminal = os.isatty(stdout_fd) and os.isatty(2)
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False

    def _write(self, data: bytes) -> None:
        while data:
            try:
                written = os.write(self.stdout_fd, data)
            except BlockingIOError:
                select.select([], [self.stdout_fd], [])
                continue
            except BrokenPipeError:
                return  # nobody reads the console any more: the guest may still run
            data = data[written:]

    def attach(self, receive: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, args=(receive, on_quit), name="console-input", daemon=True)
        self._thread.start()

    def _pump(self, receive: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        while not self._stopping:
            try:
                ready, _, _ = select.select([self.stdin_fd, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                return
            confine_thread()
            try:
                data = os.read(self.stdin_fd, 4096)
            except OSError:
                return
            if not data:
                return  # EOF: the guest keeps running, it just gets no more input
            self._deliver(data, receive, on_quit)

    def _deliver(self, data: bytes, receive: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        receive(data)

    def detach(self) -> None:
        self._stopping = True
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


class TerminalConsole(StreamConsole):
    """The user's terminal in raw mode, so that every key reaches the guest (Ctrl-C included)."""

    interactive = True

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        super().__init__(stdin_fd, stdout_fd)
        self._saved: list | None = None  # type: ignore[type-arg]
        self._escape = False

    def attach(self, receive: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        self._saved = termios.tcgetattr(self.stdin_fd)
        atexit.register(self._restore)
        tty.setraw(self.stdin_fd, termios.TCSANOW)
        super().attach(receive, on_quit)

    def _deliver(self, data: bytes, receive: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte in (ord("x"), ord("X"), 0x18):
                    if out:
                        receive(bytes(out))
                    on_quit()
                    return
                if byte in (ord("h"), ord("H"), ord("?")):
                    self._write(ESCAPE_HELP.encode())
                    continue
                if byte in (ord("a"), CTRL_A):
                    out.append(CTRL_A)
                    continue
                out.append(byte)  # not an escape after all: pass it on
            elif byte == CTRL_A:
                self._escape = True
            else:
                out.append(byte)
        if out:
            receive(bytes(out))

    @property
    def raw_active(self) -> bool:  # type: ignore[override]
        return self._saved is not None

    def _restore(self) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass
            self._saved = None

    def detach(self) -> None:
        super().detach()
        self._restore()


def open_console(spec: str) -> Console:
    """A console for a --serial value."""
    if spec == "stdio":
        if os.isatty(0) and os.isatty(1):
            return TerminalConsole()
        return StreamConsole()
    if spec == "none":
        return NullConsole()
    if spec.startswith("file:") and len(spec) > 5:
        return FileConsole(spec[5:])
    raise ConfigError(f"unknown serial back end {spec!r}: use stdio, file:PATH or none")


def stderr_line(message: str, console: Console | None = None) -> None:
    """Print a VMX message on stderr, on a line of its own even if the guest left one open on the
    same terminal, with the line ending raw mode needs."""
    raw = console is not None and console.raw_active
    newline = "\r\n" if raw else "\n"
    prefix = newline if console is not None and console.on_terminal and not console.ends_line() else ""
    sys.stderr.write(f"{prefix}worldswitch: {message}{newline}")
    sys.stderr.flush()
    if console is not None and prefix:
        console.last_byte = b"\n"
