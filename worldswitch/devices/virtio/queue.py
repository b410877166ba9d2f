"""Split virtqueues (virtio 1.2, section 2.7), from the device side, and what both layouts share
(packed queues are in packed.py; devices use either through the same methods).

The driver (the guest) owns the descriptor table and the available ring, the device owns the used
ring; all three live in guest memory, and every number in them is the guest's word. So nothing is
taken on trust: each descriptor index is checked against the queue size, each buffer against guest
RAM (through the bounds-checked accessor, with 64-bit overflow ruled out), chains are bounded by the
queue size (a loop cannot hang the device), indirect tables are followed only when negotiated and
never nested, and a readable descriptor after a writable one is refused. Any violation raises
VirtqueueError, which the transport turns into the virtio "needs reset" state.
"""

from __future__ import annotations

import struct
import threading
from itertools import repeat
from typing import NamedTuple, Sequence

from ...errors import WorldswitchError
from ...memory.guest import GuestMemory
from ...record import field, record

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEMENT = struct.Struct("<II")  # id, len
U16 = struct.Struct("<H")
MAX_QUEUE_SIZE = 32768  # 2^15, for split and packed rings alike
U64_LIMIT = 1 << 64


class VirtqueueError(WorldswitchError):
    """The driver broke the virtqueue rules; the device must stop using the queue."""


class Buffer(NamedTuple):  # a NamedTuple: one is made per descriptor, and a record costs 3x to make
    gpa: int
    length: int


@record
class DescriptorChain:
    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    def __init__(self, head: int, readable: list[Buffer] | None = None, writable: list[Buffer] | None = None) -> None:
        # Written out, not the records' shared __init__: one chain is made per request (0.13 us, not 0.6).
        self.head = head
        self.readable = [] if readable is None else readable
        self.writable = [] if writable is None else writable

    def add(self, address: int, length: int, write: bool) -> None:
        """One more element: every device-readable one comes before the device-writable ones."""
        if write:
            self.writable.append(Buffer(address, length))
        elif self.writable:
            raise VirtqueueError(f"descriptor chain from {self.head} has a readable buffer after a writable one")
        else:
            self.readable.append(Buffer(address, length))

    @property
    def readable_length(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(b.length for b in self.writable)


_FENCE = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier between this thread's stores to guest memory and its next loads.
    x86 may let a load overtake an earlier store (the store waits in the store buffer); virtio's event
    suppression needs that order (virtio 1.2, 2.7.10 and 2.7.13), as QEMU's smp_mb() gives it. Python
    has no fence; taking and releasing a lock is one (a locked instruction, a full fence on x86)."""
    with _FENCE:
        pass


def need_event(event: int, new: int, old: int, modulo: int = 0x10000) -> bool:
    """vring_need_event (virtio 1.2, 2.7.10): did the used index move from `old` to `new` past the
    driver's `event`? Split rings count modulo 2^16; packed rings by position and wrap counter."""
    return (new - event - 1) % modulo < (new - old) % modulo


def check_buffer(memory: GuestMemory, address: int, length: int, head: int) -> None:
    if address + length > U64_LIMIT or not memory.contains(address, length):
        raise VirtqueueError(f"descriptor chain from {head} points at {address:#x}+{length:#x}, outside guest RAM")


def check_indirect_table(memory: GuestMemory, address: int, length: int, head: int) -> int:
    """An indirect table's descriptor count, once its length and place are known to be sound."""
    if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
        raise VirtqueueError(f"indirect table of {length} bytes is not 1 to {MAX_QUEUE_SIZE} descriptors")
    check_buffer(memory, address, length, head)
    return length // 16


# Tables this long or longer are read in bulk first: reading one costs about 5.5 us whatever its
# length, the walk about 2 us and 0.65 us a descriptor (measured on an EPYC, Python 3.11).
BULK_TABLE = 8
# Each flag byte reduced to one bit, by bytes.translate: a whole table's flags are judged at once.
_WRITE_ONLY = bytes(flag & VIRTQ_DESC_F_WRITE for flag in range(256))
_CHAINING_ONLY = bytes(flag & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT) for flag in range(256))


def table_buffers(memory: GuestMemory, table: memoryview, write_flags: bytes) -> tuple[list[Buffer], list[Buffer]] | None:
    """A whole indirect table's buffers, read in bulk: (readable, writable), or None where the table
    is not of the usual shape (its readable buffers first, all of them in one region of guest RAM).

    Linux puts a 1 MiB block request in one table of 258 descriptors, and the walk, which makes
    each Buffer in Python, costs about 0.65 us a descriptor (160 us for that table). Here every field is read once, by C
    code (memoryview casts and slices), and then judged whole: what the result holds is what was
    checked, whatever the driver writes meanwhile. `write_flags` holds each descriptor's flag byte
    with the WRITE bit where the layout keeps it (split and packed tables differ). A caller given
    None walks the table one descriptor at a time, which raises for what is wrong with it."""
    count = len(write_flags)
    write_flags = write_flags.translate(_WRITE_ONLY)
    readable_count = write_flags.find(VIRTQ_DESC_F_WRITE)
    if readable_count < 0:
        readable_count = count
    elif write_flags.count(VIRTQ_DESC_F_WRITE) != count - readable_count:
        return None  # a readable buffer after a writable one
    addresses = table.cast("Q")[0::2].tolist()
    lengths = table.cast("I")[2::4].tolist()
    low = min(addresses)
    high = max(addresses) + max(lengths)  # at least every buffer's end: too high only refuses the bulk read
    if not memory.contains(low, high - low):
        return None  # beyond RAM, or across a hole: one by one, to say which
    # tuple.__new__ makes a Buffer in half the time its generated __new__ takes, and map keeps it in C
    buffers = list(map(tuple.__new__, repeat(Buffer, count), zip(addresses, lengths)))
    return buffers[:readable_count], buffers[readable_count:]


def check_areas(memory: GuestMemory, areas: tuple[tuple[str, int, int, int], ...]) -> None:
    """The queue's parts, as (name, address, alignment, length): aligned and inside guest RAM."""
    for name, address, alignment, length in areas:
        if address % alignment:
            raise VirtqueueError(f"{name} at {address:#x} is not {alignment}-byte aligned")
        if not memory.contains(address, length):
            raise VirtqueueError(f"{name} at {address:#x}+{length:#x} is outside guest RAM")


@record(frozen=True)
class SplitQueueState:
    """Where the device is in a split ring (the ring itself is in guest memory)."""

    last_avail: int
    used_idx: int
    signalled_used: int


class SplitQueue:
    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect: bool = False) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        check_areas(memory, (
            ("descriptor table", desc, 16, 16 * size),
            ("available ring", avail, 2, 6 + 2 * size),
            ("used ring", used, 4, 6 + 8 * size),
        ))
        self.memory = memory
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0  # the next available-ring slot the device will take
        self.used_idx = 0  # the next used-ring slot the device will fill
        self.signalled_used = 0
        # The three areas, checked above, as views: each access below is then one struct call, not a
        # look-up of guest RAM's regions (several per buffer, on every device's hot path).
        self._desc_view = memory.view(desc, 16 * size)
        self._avail_view = memory.view(avail, 6 + 2 * size)
        self._used_view = memory.view(used, 6 + 8 * size)
        # The driver's available index as last read: it only moves forward, so the ring is read again
        # only when the device has taken everything it showed (as vhost keeps avail_idx).
        self._avail_idx = 0

    # --- the available ring -----------------------------------------------------------------

    def available(self) -> int:
        """How many buffers the driver has made available and the device has not taken (at least: what
        the driver added since the last look shows at the next look that finds none)."""
        pending = (self._avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            self._avail_idx = U16.unpack_from(self._avail_view, 2)[0]
            pending = (self._avail_idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(f"the driver claims {pending} new buffers in a queue of {self.size}")
        return pending

    def has_available(self) -> bool:
        return self.available() > 0

    def mark(self) -> object:
        """Where the device is in the available ring, to give back buffers it cannot use yet
        (opaque: only this queue's rewind() takes it)."""
        return self.last_avail

    def rewind(self, mark: object) -> None:
        assert isinstance(mark, int), "a mark of another queue"
        self.last_avail = mark

    def pop(self) -> DescriptorChain | None:
        if not self.available():
            return None
        slot = self.last_avail % self.size
        head = U16.unpack_from(self._avail_view, 4 + 2 * slot)[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self.chain(head)

    def chain(self, head: int) -> DescriptorChain:
        """Walk and validate the descriptor chain that starts at `head`."""
        if head >= self.size:
            raise VirtqueueError(f"descriptor index {head} is beyond the queue size {self.size}")
        chain = DescriptorChain(head)
        readable, writable = chain.readable, chain.writable
        memory = self.memory
        contains, unpack, make = memory.contains, DESCRIPTOR.unpack_from, tuple.__new__  # locals: once per descriptor
        table, table_size, index = self._desc_view, self.size, head
        budget, walked, indirect = self.size, 0, False
        while True:
            address, length, flags, next_index = unpack(table, 16 * index)
            walked += 1
            if walked > budget:
                raise VirtqueueError(f"descriptor chain from {head} loops or is longer than its table ({budget})")
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")
                if indirect:
                    raise VirtqueueError("an indirect table inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("a descriptor with both INDIRECT and NEXT")
                table_size = check_indirect_table(memory, address, length, head)
                table, index = memory.view(address, length), 0
                if walked == 1 and table_size >= BULK_TABLE and (bulk := self._whole_table(table, table_size)) is not None:
                    chain.readable, chain.writable = bulk
                    return chain
                budget, walked, indirect = table_size, 0, True
                continue
            if address + length > U64_LIMIT or not contains(address, length):
                check_buffer(memory, address, length, head)  # raises, with the reason
            # DescriptorChain.add, inline where it appends (this loop runs once per descriptor: 256 a large
            # request); tuple.__new__ makes a Buffer in half the time its generated __new__ takes
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(make(Buffer, (address, length)))
            elif writable:
                chain.add(address, length, False)  # a readable one after a writable one: raises
            else:
                readable.append(make(Buffer, (address, length)))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if next_index >= table_size:
                raise VirtqueueError(f"next descriptor {next_index} is beyond its table ({table_size})")
            index = next_index

    def _whole_table(self, table: memoryview, count: int) -> tuple[list[Buffer], list[Buffer]] | None:
        """A chain that is the whole table, in order (each descriptor's next the one after it, the
        last without NEXT, none INDIRECT): the layout Linux writes. Flags beyond the first three mean
        nothing in a split ring (the walk ignores them too), so only the low byte is read."""
        flags = bytes(table[12::16])
        if flags.translate(_CHAINING_ONLY) != b"\x01" * (count - 1) + b"\x00":
            return None
        if table.cast("H")[7::8].tolist()[:-1] != list(range(1, count)):
            return None
        return table_buffers(self.memory, table, flags)

    # --- the used ring ----------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        self.push_all(((head, written),))

    def push_all(self, used: Sequence[tuple[int, int]]) -> None:
        """Buffers used together (head, bytes written), published at once: a driver reading a packet
        that spans several (virtio-net's num_buffers) never finds only its first ones used."""
        for head, written in used:
            USED_ELEMENT.pack_into(self._used_view, 4 + 8 * (self.used_idx % self.size), head, written)
            self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The elements first, then the index that publishes them (x86 keeps stores in order).
        U16.pack_into(self._used_view, 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants to hear about the buffers used since the last interrupt."""
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            used_event = U16.unpack_from(self._avail_view, 4 + 2 * self.size)[0]
            return need_event(used_event, new, old)
        return not U16.unpack_from(self._avail_view, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def arm(self) -> bool:
        """Ask the driver to kick for the next buffer (avail_event, with EVENT_IDX) and look again:
        True if buffers became available meanwhile. A driver that added one just before seeing the
        new avail_event did not kick, and no kick will come for it: the device must take it now.
        The barrier also orders the used index written before it ahead of needs_interrupt's read."""
        if self.event_idx:
            U16.pack_into(self._used_view, 4 + 8 * self.size, self.last_avail)
        full_barrier()
        self._avail_idx = self.last_avail  # a fresh look: what the driver added before the barrier
        return self.available() > 0

    # --- snapshots ---------------------------------------------------------------------------------

    def state(self) -> SplitQueueState:
        return SplitQueueState(self.last_avail, self.used_idx, self.signalled_used)

    def restore(self, state: SplitQueueState) -> None:
        if not isinstance(state, SplitQueueState):
            raise ValueError("a packed queue's state cannot be loaded into a split queue")
        self.last_avail = state.last_avail & 0xFFFF
        self.used_idx = state.used_idx & 0xFFFF
        self.signalled_used = state.signalled_used & 0xFFFF
        self._avail_idx = self.last_avail  # read the ring again
