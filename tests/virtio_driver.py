"""A virtio driver written in Python for the tests: it does what a guest's driver does, through the
transport's registers and in guest memory, so devices are tested as a guest uses them."""

from __future__ import annotations

import struct
import time

from worldswitch.devices import virtio
from worldswitch.devices.virtio import pci as vp
from worldswitch.devices.virtio.queue import DESCRIPTOR, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from worldswitch.vmm.memory import GuestMemory

VERSION_1 = 1 << virtio.VIRTIO_F_VERSION_1


class Allocator:
    def __init__(self, start: int, end: int) -> None:
        self.next, self.end = start, end

    def __call__(self, size: int, align: int = 16) -> int:
        address = -(-self.next // align) * align
        if address + size > self.end:
            raise MemoryError("the test driver ran out of guest memory")
        self.next = address + size
        return address


class DriverQueue:
    def __init__(self, memory: GuestMemory, size: int, allocate: Allocator) -> None:
        self.memory = memory
        self.size = size
        self.desc = allocate(16 * size, 16)
        self.avail = allocate(6 + 2 * size, 2)
        self.used = allocate(6 + 8 * size, 4)
        for address, length in ((self.desc, 16 * size), (self.avail, 6 + 2 * size), (self.used, 6 + 8 * size)):
            memory.fill(address, length)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0

    def add(self, buffers: list[tuple[int, int, bool]], indirect_table: int | None = None) -> int:
        """Put a chain of (gpa, length, writable) buffers on the available ring; returns its head."""
        if indirect_table is not None:
            for i, (address, length, writable) in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.memory.write(indirect_table + 16 * i, DESCRIPTOR.pack(address, length, flags, i + 1))
            head = self.free.pop(0)
            self.memory.write(self.desc + 16 * head, DESCRIPTOR.pack(indirect_table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT, 0))
        else:
            indices = [self.free.pop(0) for _ in buffers]
            for i, (address, length, writable) in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                following = indices[i + 1] if i + 1 < len(buffers) else 0
                self.memory.write(self.desc + 16 * indices[i], DESCRIPTOR.pack(address, length, flags, following))
            head = indices[0]
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.memory.write_int(self.avail + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(self.avail + 2, 2, self.avail_idx)

    def used_count(self) -> int:
        return (self.memory.read_int(self.used + 2, 2) - self.last_used) & 0xFFFF

    def take_used(self) -> tuple[int, int]:
        slot = self.last_used % self.size
        head, written = struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8))
        self.last_used = (self.last_used + 1) & 0xFFFF
        return head, written


class Driver:
    def __init__(self, function: vp.VirtioPciFunction, memory: GuestMemory, region: tuple[int, int]) -> None:
        self.function = function
        self.memory = memory
        self.allocate = Allocator(*region)
        self.queues: dict[int, DriverQueue] = {}

    def write(self, offset: int, size: int, value: int) -> None:
        self.function.bar0_write(offset, size, value)

    def read(self, offset: int, size: int) -> int:
        return self.function.bar0_read(offset, size)

    @property
    def status(self) -> int:
        return self.read(vp.DEVICE_STATUS, 1)

    def device_features(self) -> int:
        features = 0
        for select in (0, 1):
            self.write(vp.DEVICE_FEATURE_SELECT, 4, select)
            features |= self.read(vp.DEVICE_FEATURE, 4) << (32 * select)
        return features

    def negotiate(self, features: int) -> bool:
        self.write(vp.DEVICE_STATUS, 1, 0)
        self.write(vp.DEVICE_STATUS, 1, virtio.ACKNOWLEDGE)
        self.write(vp.DEVICE_STATUS, 1, virtio.ACKNOWLEDGE | virtio.DRIVER)
        for select in (0, 1):
            self.write(vp.DRIVER_FEATURE_SELECT, 4, select)
            self.write(vp.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFFFFFF)
        self.write(vp.DEVICE_STATUS, 1, virtio.ACKNOWLEDGE | virtio.DRIVER | virtio.FEATURES_OK)
        return bool(self.status & virtio.FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None, msix_vector: int = 0xFFFF) -> DriverQueue:
        self.write(vp.QUEUE_SELECT, 2, index)
        size = size or self.read(vp.QUEUE_SIZE, 2)
        self.write(vp.QUEUE_SIZE, 2, size)
        queue = DriverQueue(self.memory, size, self.allocate)
        for register, address in ((vp.QUEUE_DESC, queue.desc), (vp.QUEUE_DRIVER, queue.avail), (vp.QUEUE_DEVICE, queue.used)):
            self.write(register, 4, address & 0xFFFFFFFF)
            self.write(register + 4, 4, address >> 32)
        self.write(vp.QUEUE_MSIX_VECTOR, 2, msix_vector)
        self.write(vp.QUEUE_ENABLE, 2, 1)
        self.queues[index] = queue
        return queue

    def start(self, features: int = VERSION_1, queues: tuple[int, ...] = (0,)) -> None:
        assert self.negotiate(features)
        for index in queues:
            self.setup_queue(index)
        self.write(vp.DEVICE_STATUS, 1, virtio.ACKNOWLEDGE | virtio.DRIVER | virtio.FEATURES_OK | virtio.DRIVER_OK)

    def kick(self, queue: int) -> None:
        self.write(vp.NOTIFY_OFFSET + vp.NOTIFY_MULTIPLIER * queue, 2, queue)

    def wait_used(self, queue: int, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        q = self.queues[queue]
        while q.used_count() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue}: {q.used_count()} of {count} buffers used after {timeout} s")
            time.sleep(0.001)
        return [q.take_used() for _ in range(count)]

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        """Guest memory holding `data` (or that many zero bytes): (gpa, length)."""
        length = data if isinstance(data, int) else len(data)
        address = self.allocate(max(length, 1), 16)
        self.memory.write(address, data if isinstance(data, bytes) else bytes(length))
        return address, length
