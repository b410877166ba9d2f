"""virtio-rng (virtio 1.2, section 5.4): the guest posts writable buffers, the device fills them
from the host's getrandom()."""

from __future__ import annotations

import os

from ...memory.guest import GuestMemory
from . import ENTROPY
from .device import VirtioDevice, VirtioLink

MAX_PER_REQUEST = 64 * 1024  # a hostile driver may offer gigabytes; it gets this much per buffer chain


class VirtioRng(VirtioDevice):
    device_type = ENTROPY
    name = "virtio-rng"
    queue_sizes = (64,)

    def __init__(self, link: VirtioLink, memory: GuestMemory) -> None:
        super().__init__(link, memory)
        self.bytes_given = 0

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "bytes": self.bytes_given}

    def process(self, index: int) -> None:
        queue = self.queues[index]
        assert queue is not None
        while True:
            while (chain := queue.pop()) is not None:
                budget = min(chain.writable_length, MAX_PER_REQUEST)
                written = 0
                for buffer in chain.writable:
                    if written == budget:
                        break
                    view = self.memory.view(buffer.gpa, min(buffer.length, budget - written))
                    view[:] = os.getrandom(len(view))
                    written += len(view)
                self.bytes_given += written
                self.complete(queue, index, chain.head, written)
            if not self.finish_batch(queue, index):
                return
