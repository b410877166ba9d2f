"""The I/O thread of a virtio device: it waits on one eventfd per queue (kicked by the guest
through ioeventfd without leaving the kernel, or by the transport's MMIO handler) and on the
device's own host descriptors, and serves requests off the vCPU threads."""

from __future__ import annotations

import os
import select
import threading
from typing import Callable

from ...sandbox import confine_thread


class VirtioWorker:
    def __init__(self, name: str, queue_count: int, on_kick: Callable[[int], None],
                 on_error: Callable[[BaseException], None]) -> None:
        """`on_error` hears of an exception that ended the thread: a bug in the device, which must end
        the VM (back-end failures are the transport's to answer, and never get here)."""
        self.name = name
        self.on_kick = on_kick
        self.on_error = on_error
        self.kick_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(queue_count)]
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._extra: dict[int, Callable[[], None]] = {}
        self._poller = select.poll()
        self._thread: threading.Thread | None = None
        self.kicks = 0  # kicks served: counted once on_kick has returned
        self._served = threading.Condition()
        self.error: BaseException | None = None

    def kick(self, queue: int) -> None:
        """What a notify-region write does when no ioeventfd took it in the kernel."""
        os.eventfd_write(self.kick_fds[queue], 1)

    def wait_kicks(self, count: int, timeout: float) -> bool:
        """Wait until `count` kicks have been served in all; False if `timeout` passed first.
        A served kick has finished with the queue, so whatever a driver does next cannot race it."""
        with self._served:
            return self._served.wait_for(lambda: self.kicks >= count, timeout)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._extra[fd] = callback

    def interest(self, fd: int, wanted: bool) -> None:
        """Stop or resume watching a host descriptor: a device with nowhere to put input (no
        receive buffers, or no driver yet) pauses its back end instead of spinning on a readable
        descriptor. Called from the I/O thread (device callbacks run there), or by the transport before
        it kicks a queue, whose kick makes the thread's next wait see the change."""
        self._poller.modify(fd, select.POLLIN if wanted else 0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"io-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = self._poller
        queue_of = {fd: index for index, fd in enumerate(self.kick_fds)}
        for fd in [*self.kick_fds, self._stop_fd, *self._extra]:
            poller.register(fd, select.POLLIN)
        try:
            while True:
                ready = poller.poll()
                confine_thread()  # the guest's buffers are handled here: no path calls once sandboxed
                for fd, _events in ready:
                    if fd == self._stop_fd:
                        return
                    if fd in queue_of:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            continue
                        self.on_kick(queue_of[fd])
                        with self._served:
                            self.kicks += 1
                            self._served.notify_all()
                    else:
                        self._extra[fd]()
        except BaseException as error:  # noqa: BLE001 - a device bug must surface, not vanish
            self.error = error
            self.on_error(error)

    def stop(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        for fd in [*self.kick_fds, self._stop_fd]:
            os.close(fd)
        self.kick_fds = []
