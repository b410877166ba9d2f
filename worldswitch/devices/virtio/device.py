"""The device half of a virtio device: features, configuration space, queues and requests. The
transport (pci.py) handles status, negotiation and queue set-up, and calls in here."""

from __future__ import annotations

from typing import Callable, Protocol

from ...memory.guest import GuestMemory
from ...record import record
from . import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from .packed import PackedQueue
from .queue import SplitQueue

Virtqueue = SplitQueue | PackedQueue  # the two layouts answer the same methods

COMMON_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


@record(frozen=True)
class NoDeviceState:
    """The state of a device that keeps none beyond its queues."""


class VirtioLink(Protocol):
    """What a device is given by its transport (pci.py), at construction."""

    def interrupt(self, queue: int) -> None:
        """Tell the driver that `queue` has used buffers (its MSI-X vector, or INTx and the ISR)."""

    def pause_input(self, fd: int, paused: bool) -> None:
        """Stop (or restart) reading the back end `fd` while the guest has no room for what it brings."""


class VirtioDevice:
    device_type: int = 0
    name: str = "virtio"
    queue_sizes: tuple[int, ...] = (256,)

    def __init__(self, link: VirtioLink, memory: GuestMemory) -> None:
        self.link = link
        self.memory = memory
        self.device_features = COMMON_FEATURES
        self.driver_features = 0
        self.queues: list[Virtqueue | None] = [None] * len(self.queue_sizes)
        self.requests = 0
        self.errors = 0

    def has(self, feature_bit: int) -> bool:
        return bool(self.driver_features >> feature_bit & 1)

    # --- what subclasses provide --------------------------------------------------------------

    def config(self) -> bytes:
        """The device-specific configuration space, as the driver reads it."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """Writes to the configuration space; read-only unless a device says otherwise."""

    def process(self, index: int) -> None:
        """Serve the buffers available on queue `index`. Raise VirtqueueError for a broken queue."""
        raise NotImplementedError

    def activate(self) -> None:
        """The driver is ready (DRIVER_OK): queues are set up."""

    def reset(self) -> None:
        """The driver reset the device: forget every request in flight."""

    def close(self) -> None:
        """The machine is ending: release back ends, making completed writes durable."""

    state_type: type = NoDeviceState  # what state() gives and restore() takes

    def state(self) -> object:
        """Device-specific state beyond the transport's (a record of type `state_type`)."""
        return NoDeviceState()

    def restore(self, state: object) -> None:
        pass

    def counters(self) -> dict[str, int]:
        """What the device has done, for --stats and the control API's `stats`."""
        return {"requests": self.requests}

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        """Host file descriptors the I/O thread should watch for the device (a tap, a pty)."""
        return []

    # --- helpers ------------------------------------------------------------------------------

    def complete(self, queue: Virtqueue, index: int, head: int, written: int) -> None:
        queue.push(head, written)
        self.requests += 1

    def complete_all(self, queue: Virtqueue, index: int, used: list[tuple[int, int]]) -> None:
        """Buffers used together (head, bytes written), which the driver sees at once: one packet's
        chains, of which it must never find only the first."""
        queue.push_all(used)
        self.requests += len(used)

    def finish_batch(self, queue: Virtqueue, index: int) -> bool:
        """After taking buffers (or finding none): ask for the next kick, interrupt the driver if it
        wants to hear of what was used; True if buffers arrived meanwhile, which no kick announces."""
        more = queue.arm()
        if queue.needs_interrupt():
            self.link.interrupt(index)
        return more
