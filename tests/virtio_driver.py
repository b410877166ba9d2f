"""A virtio driver written in Python for the tests: it does what a guest's driver does, through the
transport's registers and in guest memory, so devices are tested as a guest uses them."""

from __future__ import annotations

import struct
import time

from worldswitch.devices import virtio
from worldswitch.devices.virtio import pci as vp
from worldswitch.devices.virtio.packed import PACKED_DESCRIPTOR, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
from worldswitch.devices.virtio.queue import DESCRIPTOR, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from worldswitch.memory.guest import GuestMemory

from .helpers import RecordingLine

VERSION_1 = 1 << virtio.VIRTIO_F_VERSION_1
RING_PACKED = 1 << virtio.VIRTIO_F_RING_PACKED


class RecordingVectors:
    """MSI-X vectors that remember which fired (the MsiSink a function is given)."""

    def __init__(self, delivered: list[int]) -> None:
        self.delivered = delivered

    def program(self, vector: int, address: int, data: int) -> None:
        pass

    def deliver(self, vector: int, address: int, data: int) -> None:
        self.delivered.append(vector)


class Unplugged:
    """The link of a device used on its own, with no transport (image-lock tests)."""

    def interrupt(self, queue: int) -> None:
        raise AssertionError("an unplugged device raised an interrupt")

    def pause_input(self, fd: int, paused: bool) -> None:
        pass


UNPLUGGED = Unplugged()


def wiring(delivered: list[int]) -> vp.PciWiring:
    """A function wired to a recording INTx line and recording MSI-X vectors (a device bug stays in
    function.worker.error, where the tests look)."""
    return vp.PciWiring(intx=RecordingLine(), msi=lambda count: RecordingVectors(delivered),
                        on_bar_change=lambda *change: None, on_needs_reset=lambda message: None,
                        on_bug=lambda message: None)


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


class PackedDriverQueue:
    """The driver's side of a packed ring (virtio 1.2, 2.8.21-2.8.22): the same methods as DriverQueue."""

    def __init__(self, memory: GuestMemory, size: int, allocate: Allocator) -> None:
        self.memory = memory
        self.size = size
        self.desc = allocate(16 * size, 16)
        self.avail = allocate(4, 4)  # the driver event suppression structure (the "driver area")
        self.used = allocate(4, 4)  # the device's (the "device area")
        memory.fill(self.desc, 16 * size)
        memory.fill(self.avail, 4)
        memory.fill(self.used, 4)
        self.next_avail, self.avail_wrap = 0, True
        self.next_used, self.used_wrap = 0, True
        self.free_ids = list(range(size))
        self.slots: dict[int, int] = {}  # buffer ID -> ring slots it took
        self.free_slots = size

    def _flags(self, writable: bool, wrap: bool) -> int:
        return (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED)

    def add(self, buffers: list[tuple[int, int, bool]], indirect_table: int | None = None) -> int:
        """Put a buffer of (gpa, length, writable) elements in the ring; returns its buffer ID."""
        buffer_id = self.free_ids.pop(0)
        if indirect_table is not None:
            for i, (address, length, writable) in enumerate(buffers):
                self.memory.write(indirect_table + 16 * i, PACKED_DESCRIPTOR.pack(
                    address, length, 0, VIRTQ_DESC_F_WRITE if writable else 0))
            elements = [(indirect_table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)]
        else:
            elements = [(address, length, (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0))
                        for i, (address, length, writable) in enumerate(buffers)]
        assert len(elements) <= self.free_slots, "the test driver's ring is full"
        first, first_flags = self.next_avail, 0
        for i, (address, length, flags) in enumerate(elements):
            flags |= VIRTQ_DESC_F_AVAIL if self.avail_wrap else VIRTQ_DESC_F_USED
            last = i + 1 == len(elements)
            at = self.desc + 16 * self.next_avail
            self.memory.write(at, PACKED_DESCRIPTOR.pack(address, length, buffer_id if last else 0, 0))
            if i == 0:
                first_flags = flags  # the head's flags last: the device never sees half a chain
            else:
                self.memory.write_int(at + 14, 2, flags)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail, self.avail_wrap = 0, not self.avail_wrap
        self.memory.write_int(self.desc + 16 * first + 14, 2, first_flags)
        self.slots[buffer_id] = len(elements)
        self.free_slots -= len(elements)
        return buffer_id

    def _used_here(self) -> bool:
        flags = self.memory.read_int(self.desc + 16 * self.next_used + 14, 2)
        return bool(flags & VIRTQ_DESC_F_USED) == self.used_wrap and bool(flags & VIRTQ_DESC_F_AVAIL) == self.used_wrap

    def used_count(self) -> int:
        """Used buffers waiting, found by walking the ring as far as the device has written."""
        count, position, wrap = 0, self.next_used, self.used_wrap
        while True:
            flags = self.memory.read_int(self.desc + 16 * position + 14, 2)
            if bool(flags & VIRTQ_DESC_F_USED) != wrap or bool(flags & VIRTQ_DESC_F_AVAIL) != wrap:
                return count
            buffer_id = self.memory.read_int(self.desc + 16 * position + 12, 2)
            count += 1
            position += self.slots.get(buffer_id, 1)
            if position >= self.size:
                position, wrap = position - self.size, not wrap
            if count >= self.size:
                return count

    def take_used(self) -> tuple[int, int]:
        assert self._used_here()
        at = self.desc + 16 * self.next_used
        written, buffer_id = struct.unpack("<IH", self.memory.read(at + 8, 6))
        slots = self.slots.pop(buffer_id)
        self.free_slots += slots
        self.free_ids.append(buffer_id)
        self.next_used += slots
        if self.next_used >= self.size:
            self.next_used, self.used_wrap = self.next_used - self.size, not self.used_wrap
        return buffer_id, written


class Driver:
    def __init__(self, function: vp.VirtioPciFunction, memory: GuestMemory, region: tuple[int, int],
                 packed: bool = False) -> None:
        self.packed = packed  # accept VIRTIO_F_RING_PACKED in every negotiation
        self.function = function
        self.memory = memory
        self.allocate = Allocator(*region)
        self.queues: dict[int, DriverQueue | PackedDriverQueue] = {}
        self.features = 0

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
        if self.packed:
            features |= RING_PACKED
        self.write(vp.DEVICE_STATUS, 1, 0)
        self.write(vp.DEVICE_STATUS, 1, virtio.ACKNOWLEDGE)
        self.write(vp.DEVICE_STATUS, 1, virtio.ACKNOWLEDGE | virtio.DRIVER)
        for select in (0, 1):
            self.write(vp.DRIVER_FEATURE_SELECT, 4, select)
            self.write(vp.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFFFFFF)
        self.write(vp.DEVICE_STATUS, 1, virtio.ACKNOWLEDGE | virtio.DRIVER | virtio.FEATURES_OK)
        self.features = features
        return bool(self.status & virtio.FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None,
                    msix_vector: int = 0xFFFF) -> DriverQueue | PackedDriverQueue:
        self.write(vp.QUEUE_SELECT, 2, index)
        size = size or self.read(vp.QUEUE_SIZE, 2)
        self.write(vp.QUEUE_SIZE, 2, size)
        layout = PackedDriverQueue if self.features & RING_PACKED else DriverQueue
        queue = layout(self.memory, size, self.allocate)
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

    def wait_needs_reset(self, timeout: float = 1.0) -> str:
        """Wait until the device gives up on the driver (DEVICE_NEEDS_RESET); returns its reason."""
        deadline = time.monotonic() + timeout
        while not self.status & virtio.DEVICE_NEEDS_RESET:
            if time.monotonic() > deadline:
                raise AssertionError("the device did not give up")
            time.sleep(0.002)
        return self.function.broken or ""

    def enable_msix(self) -> None:
        """Program and unmask every MSI-X table entry (vector N -> APIC vector 0x40 + N), then enable MSI-X."""
        for vector in range(self.function.msix.vectors):
            self.function.bar1_write(16 * vector, 4, 0xFEE00000)
            self.function.bar1_write(16 * vector + 8, 4, 0x40 + vector)
            self.function.bar1_write(16 * vector + 12, 4, 0)
        self.function.config_write(self.function.msix_at + 2, 2, 0x8000)

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
