"""Packed virtqueues (virtio 1.2, section 2.8), from the device side; offered as VIRTIO_F_RING_PACKED.

One ring of 16-byte descriptors carries both directions: the driver marks a descriptor available
by setting its AVAIL flag to the driver's wrap counter and USED to the opposite; the device marks
the first slot of a finished buffer used by setting both to its own wrap counter. A buffer spans
one ring slot per chained descriptor (or one for an indirect table), its ID is in its last
descriptor, and the device skips as many slots as the buffer took when it writes the used
descriptor. Two 4-byte event suppression structures replace the split ring's flags and event
indices: the driver's (read here) says when it wants interrupts, the device's (written here) when
it wants notifications.

As with split queues every number is the guest's: positions stay within the ring, chains within the
queue size, buffers within guest RAM, an ID cannot be in flight twice, and each descriptor of a
chain must itself be marked available. A violation raises VirtqueueError.
"""

from __future__ import annotations

import struct
from typing import Sequence

from ...memory.guest import GuestMemory
from ...record import record
from .queue import (BULK_TABLE, MAX_QUEUE_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                    DescriptorChain, VirtqueueError, check_areas, check_buffer, check_indirect_table, full_barrier,
                    need_event, table_buffers)

VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2
PACKED_DESCRIPTOR = struct.Struct("<QIHH")  # struct pvirtq_desc: addr, len, id, flags
EVENT_SUPPRESS = struct.Struct("<HH")  # struct pvirtq_event_suppress: desc (offset | wrap << 15), flags
WRAP_BIT = 1 << 15


def _is_available(flags: int, wrap: bool) -> bool:
    return bool(flags & VIRTQ_DESC_F_AVAIL) == wrap and bool(flags & VIRTQ_DESC_F_USED) != wrap


@record(frozen=True)
class PackedQueueState:
    """Where the device is in a packed ring, and the buffers it holds (ID -> slots they took)."""

    next_avail: int
    avail_wrap: bool
    next_used: int
    used_wrap: bool
    signalled: int
    in_flight: list[tuple[int, int]]


@record(frozen=True)
class PackedMark:
    next_avail: int
    avail_wrap: bool
    in_flight: dict[int, int]


class PackedQueue:
    def __init__(self, memory: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = False) -> None:
        # Unlike split rings, any size up to 2^15 is valid (2.8).
        if not 0 < size <= MAX_QUEUE_SIZE:
            raise VirtqueueError(f"packed queue size {size} is not between 1 and {MAX_QUEUE_SIZE}")
        check_areas(memory, (
            ("descriptor ring", desc, 16, 16 * size),
            ("driver event suppression", driver, 4, 4),
            ("device event suppression", device, 4, 4),
        ))
        self.memory = memory
        self.size = size
        self.desc = desc
        self.driver = driver
        self.device = device
        self.event_idx = event_idx
        self.indirect = indirect
        # Both wrap counters start at 1 (2.8.1).
        self.next_avail, self.avail_wrap = 0, True
        self.next_used, self.used_wrap = 0, True
        self.signalled = self._position(0, True)  # where the used position was at the last interrupt
        self.in_flight: dict[int, int] = {}  # buffer ID -> ring slots its buffer took
        self.memory.write(device, EVENT_SUPPRESS.pack(0, RING_EVENT_FLAGS_ENABLE))

    def _position(self, index: int, wrap: bool) -> int:
        """A ring position and its wrap counter as one number modulo 2 * size, for event arithmetic."""
        return index if wrap else index + self.size

    # --- available descriptors ------------------------------------------------------------------

    def has_available(self) -> bool:
        flags = self.memory.read_int(self.desc + 16 * self.next_avail + 14, 2)
        return _is_available(flags, self.avail_wrap)

    def pop(self) -> DescriptorChain | None:
        index, wrap = self.next_avail, self.avail_wrap
        chain = DescriptorChain(self.next_avail)  # named by its first slot until its ID is read
        slots = 0
        while True:
            # The flags first, then the rest: a driver writes a descriptor's flags last, so one load of
            # all 16 bytes (address first) could pair its new flags with the address and length the
            # slot held before, which the driver was still writing (x86 keeps loads in order)
            at = self.desc + 16 * index
            flags = self.memory.read_int(at + 14, 2)
            if not _is_available(flags, wrap):
                if not slots:
                    return None  # nothing new from the driver
                raise VirtqueueError(f"descriptor {index} of a chain from {self.next_avail} is not marked available")
            address, length, buffer_id, _ = self.memory.unpack(PACKED_DESCRIPTOR, at)
            slots += 1
            if slots > self.size:  # only a driver rewriting the ring under the device gets here
                raise VirtqueueError(f"descriptor chain from {self.next_avail} is longer than the queue ({self.size})")
            index += 1
            if index == self.size:
                index, wrap = 0, not wrap
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")
                if slots > 1 or flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("an indirect descriptor chained with others")
                self._indirect_table(address, length, chain)
                break
            check_buffer(self.memory, address, length, self.next_avail)
            chain.add(address, length, bool(flags & VIRTQ_DESC_F_WRITE))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
        if buffer_id in self.in_flight:
            raise VirtqueueError(f"buffer ID {buffer_id} is made available while still in flight")
        if len(self.in_flight) >= self.size:
            raise VirtqueueError(f"more buffers in flight than the queue holds ({self.size})")
        self.in_flight[buffer_id] = slots
        self.next_avail, self.avail_wrap = index, wrap
        chain.head = buffer_id
        return chain

    def _indirect_table(self, table: int, length: int, chain: DescriptorChain) -> None:
        """Only WRITE means anything inside the table (2.8.10); NEXT, INDIRECT and the ID are ignored."""
        count = check_indirect_table(self.memory, table, length, self.next_avail)
        if count >= BULK_TABLE:
            view = self.memory.view(table, length)
            if (bulk := table_buffers(self.memory, view, bytes(view[14::16]))) is not None:
                chain.readable, chain.writable = bulk
                return
        for entry in range(count):
            address, size, _id, flags = self.memory.unpack(PACKED_DESCRIPTOR, table + 16 * entry)
            check_buffer(self.memory, address, size, self.next_avail)
            chain.add(address, size, bool(flags & VIRTQ_DESC_F_WRITE))

    def mark(self) -> object:
        """Where the device is in the ring, to give back buffers it took but cannot use yet
        (opaque: only this queue's rewind() takes it)."""
        return PackedMark(self.next_avail, self.avail_wrap, dict(self.in_flight))

    def rewind(self, mark: object) -> None:
        assert isinstance(mark, PackedMark), "a mark of another queue"
        self.next_avail, self.avail_wrap, self.in_flight = mark.next_avail, mark.avail_wrap, dict(mark.in_flight)

    # --- used descriptors -------------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Mark buffer `head` (its ID) used, `written` bytes into its writable part."""
        self.push_all(((head, written),))

    def push_all(self, used: Sequence[tuple[int, int]]) -> None:
        """Buffers used together (ID, bytes written), handed back at once: each one's ID and length,
        then the flags of all but the first, then the first's: a driver reads the ring in order, so
        it sees all of them or none (the packed ring's batching, virtio 1.2 section 2.8, as a
        driver makes several buffers available)."""
        handed: list[tuple[int, int]] = []  # where each one's flags go, and what they are
        for head, written in used:
            slots = self.in_flight.pop(head, None)
            if slots is None:
                raise VirtqueueError(f"buffer ID {head} completed but was never taken")
            at = self.desc + 16 * self.next_used
            flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if self.used_wrap else 0
            if written:
                flags |= VIRTQ_DESC_F_WRITE
            # ID and length first, then the flags that hand the slot back (x86 keeps stores in order).
            struct.pack_into("<IH", self.memory.view(at + 8, 6), 0, written, head)
            handed.append((at + 14, flags))
            self.next_used += slots
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap = not self.used_wrap
        for at, flags in [*handed[1:], *handed[:1]]:
            self.memory.write_int(at, 2, flags)

    def needs_interrupt(self) -> bool:
        """Whether the driver's event suppression structure asks to hear about what was just used."""
        old, new = self.signalled, self._position(self.next_used, self.used_wrap)
        self.signalled = new
        if old == new:
            return False
        off_wrap, flags = self.memory.unpack(EVENT_SUPPRESS, self.driver)
        flags &= 0x3
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            offset = off_wrap & ~WRAP_BIT
            if offset >= self.size:
                return True  # nonsense from the driver: an interrupt too many is harmless
            event = self._position(offset, bool(off_wrap & WRAP_BIT))
            return need_event(event, new, old, modulo=2 * self.size)
        return bool(flags != RING_EVENT_FLAGS_DISABLE)

    def arm(self) -> bool:
        """The device event suppression structure stays at ENABLE: every buffer the driver makes
        available is kicked, so nothing can arrive unannounced. The barrier orders the used
        descriptors written before it ahead of needs_interrupt's read of the driver's structure."""
        full_barrier()
        return False

    # --- snapshots ---------------------------------------------------------------------------------

    def state(self) -> PackedQueueState:
        return PackedQueueState(self.next_avail, self.avail_wrap, self.next_used, self.used_wrap, self.signalled,
                                sorted(self.in_flight.items()))

    def restore(self, state: PackedQueueState) -> None:
        if not isinstance(state, PackedQueueState):
            raise ValueError("a split queue's state cannot be loaded into a packed queue")
        self.next_avail, self.avail_wrap = state.next_avail % self.size, state.avail_wrap
        self.next_used, self.used_wrap = state.next_used % self.size, state.used_wrap
        self.signalled = state.signalled % (2 * self.size)
        self.in_flight = dict(state.in_flight)
