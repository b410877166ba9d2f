"""virtio-net (virtio 1.2, section 5.1) on a Linux tap device.

Queue 0 receives, queue 1 transmits; no control queue. The 12-byte virtio-1 header (struct
virtio_net_hdr_v1) passes between the guest and the tap unchanged (the tap is opened with
IFF_VNET_HDR and a header size of 12), and it is the same header the tap's kernel side reads and
writes: so the checksum and segmentation offloads (5.1.6.2) are the kernel's, not ours. The device
offers them all for TCP (CSUM, HOST_TSO4/6 and ECN: the guest may send 64 KiB segments with partial
checksums, which the tap takes as they are; GUEST_CSUM, GUEST_TSO4/6 and ECN: the tap may hand the
guest such segments, once TUNSETOFFLOAD says the driver took them). A packet is then up to 64 KiB
where it was 1,514 bytes, and the per-packet cost of this Python device is paid about 40 times less
often. A header the kernel refuses (a hostile guest's) drops that packet (tx_dropped). Transmit
chains may span many descriptors. With
VIRTIO_NET_F_MRG_RXBUF a received packet may span several receive chains, and the header's
num_buffers says how many. A packet is read from the tap straight into the next receive chain
(readv over its buffers, then a spill buffer): the kernel's copy is the only one; one that needs more
than a chain is taken from there and spread over as many as it needs. A packet that arrives while
the guest has posted no buffers waits (the tap is not read meanwhile); a packet larger than every
buffer the guest offers is dropped and counted, as a NIC drops it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import struct
from typing import Callable, TypeVar

from ...errors import ConfigError
from ...memory.guest import GuestMemory
from ...record import record
from . import NET
from .device import VirtioDevice, VirtioLink, Virtqueue
from .queue import DescriptorChain

RECEIVE, TRANSMIT = 0, 1
VIRTIO_NET_F_CSUM = 0  # the device takes packets whose checksum the driver left partial
VIRTIO_NET_F_GUEST_CSUM = 1  # the driver takes them
VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN = 7, 8, 9  # the driver takes TCP segments
VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN = 11, 12, 13  # the device takes them
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
OFFLOADS = sum(1 << bit for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                                    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO4,
                                    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN))
HEADER_SIZE = 12
NUM_BUFFERS_AT = 10  # the header's num_buffers (struct virtio_net_hdr_v1)
T = TypeVar("T")
# The largest frame a tap hands over: an Ethernet header and VLAN tag, then IP's largest datagram
# (IPv6's: a 40-byte header and 65,535 bytes of payload), whether one frame of that MTU or a TCP
# segment under the tap's GSO limit (64 KiB unless an administrator raises it)
MAX_PACKET = HEADER_SIZE + 14 + 4 + 40 + 65535

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08  # include/uapi/linux/if_tun.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(part, 16) for part in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or mac[0] & 1:
        raise ConfigError(f"{text!r} is not a unicast MAC address like 52:54:00:12:34:56")
    return mac


def random_mac() -> bytes:
    return bytes([0x52, 0x54, 0x00] + [random.randrange(256) for _ in range(3)])


class TapBackend:
    """A tap interface, created if it does not exist (needs CAP_NET_ADMIN), brought up."""

    def __init__(self, name: str) -> None:
        if len(name.encode()) >= 16:
            raise ConfigError(f"tap interface name {name!r} is longer than 15 bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ConfigError(f"cannot open /dev/net/tun: {error.strerror}") from None
        try:
            request = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            answer = fcntl.ioctl(self.fd, TUNSETIFF, request)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", HEADER_SIZE))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
        except OSError as error:
            os.close(self.fd)
            raise ConfigError(f"cannot create or attach tap {name}: {error.strerror} (needs CAP_NET_ADMIN)") from None
        self.name = answer[:16].split(b"\0", 1)[0].decode()
        self._bring_up()

    def _bring_up(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
            request = struct.pack("16sH", self.name.encode(), 0)
            flags = struct.unpack_from("16sH", fcntl.ioctl(control, SIOCGIFFLAGS, request))[1]
            try:
                fcntl.ioctl(control, SIOCSIFFLAGS, struct.pack("16sH", self.name.encode(), flags | IFF_UP))
            except OSError:
                pass  # an existing interface we may not configure: the user brings it up

    def read(self) -> bytes | None:
        """One packet, or None if there is none."""
        return _unless_empty(lambda: os.read(self.fd, MAX_PACKET))

    def read_into(self, views: list[memoryview]) -> int | None:
        """One packet, scattered over `views` (the kernel truncates what they cannot hold): its length,
        or None if there is none."""
        return _unless_empty(lambda: os.readv(self.fd, views))

    def write(self, views: list[memoryview]) -> bool:
        """One packet, its header first: False if the tap dropped it (a header the kernel refuses,
        the interface down, its queue full)."""
        try:
            os.writev(self.fd, views)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL):  # EIO: the interface is down
                raise
            return False
        return True

    def set_offloads(self, flags: int) -> None:
        """What the reader takes (TUN_F_*): the tap then hands it packets with partial checksums and
        TCP segments of up to 64 KiB. A kernel that refuses leaves the tap at none, which every driver
        takes: the offloads are then the guest's own, not lost."""
        if self.fd < 0:
            return  # closed: the machine is ending
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _unless_empty(read: Callable[[], T]) -> T | None:
    """A read of the non-blocking tap: its result, or None where it had nothing (EAGAIN)."""
    try:
        return read()
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        raise


@record(frozen=True)
class NetState:
    waiting: bytes | None  # a packet from the tap that no receive buffer has taken yet


class VirtioNet(VirtioDevice):
    device_type = NET
    name = "virtio-net"
    queue_sizes = (256, 256)

    def __init__(self, link: VirtioLink, memory: GuestMemory, tap: TapBackend, mac: bytes | None = None, *,
                 offloads: bool = True) -> None:
        """`offloads`: offer the checksum and TCP segmentation offloads (without them every packet is
        one frame, as a NIC without them sends; a user may want that where a tap's peer mishandles them)."""
        super().__init__(link, memory)
        self.tap = tap
        self.mac = mac or random_mac()
        self.device_features |= (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MRG_RXBUF)
        self.device_features |= OFFLOADS if offloads else 0
        self.waiting: bytes | None = None  # a received packet with no buffer to go to yet
        self._spill = memoryview(bytearray(MAX_PACKET))  # what a receive chain could not hold of a packet
        self.rx_packets = self.tx_packets = self.rx_dropped = self.tx_dropped = 0

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "rx_packets": self.rx_packets, "tx_packets": self.tx_packets,
                "rx_dropped": self.rx_dropped, "tx_dropped": self.tx_dropped}

    def receive_offloads(self) -> int:
        """The TUN_F_* flags for what the driver took. The tap takes TSO only with checksums (the
        spec's rule for a driver too, 5.1.3.1), and ECN only with TSO."""
        if not self.has(VIRTIO_NET_F_GUEST_CSUM):
            return 0
        flags = TUN_F_CSUM
        flags |= TUN_F_TSO4 if self.has(VIRTIO_NET_F_GUEST_TSO4) else 0
        flags |= TUN_F_TSO6 if self.has(VIRTIO_NET_F_GUEST_TSO6) else 0
        if flags & (TUN_F_TSO4 | TUN_F_TSO6) and self.has(VIRTIO_NET_F_GUEST_ECN):
            flags |= TUN_F_TSO_ECN
        return flags

    def activate(self) -> None:
        self.tap.set_offloads(self.receive_offloads())

    def config(self) -> bytes:
        return struct.pack("<6sHH", self.mac, VIRTIO_NET_S_LINK_UP, 1)  # mac, status, max_virtqueue_pairs

    def extra_fds(self):  # type: ignore[no-untyped-def]
        return [(self.tap.fd, self.receive)]

    # --- transmit ----------------------------------------------------------------------------

    def process(self, index: int) -> None:
        queue = self.queues[index]
        assert queue is not None
        if index == TRANSMIT:
            while True:
                while (chain := queue.pop()) is not None:
                    views = [self.memory.view(b.gpa, b.length) for b in chain.readable]
                    if sum(len(v) for v in views) > HEADER_SIZE:
                        if self.tap.write(views):
                            self.tx_packets += 1
                        else:
                            self.tx_dropped += 1
                    self.complete(queue, index, chain.head, 0)
                if not self.finish_batch(queue, index):
                    return
        else:
            self.receive()  # buffers arrived: take what waits, and read the tap again

    # --- receive -----------------------------------------------------------------------------

    def receive(self) -> None:
        queue = self.queues[RECEIVE]
        if queue is None:
            # a driver that did not set the receive queue up: stop watching the tap rather than spin on it
            self.link.pause_input(self.tap.fd, True)
            return
        while True:
            if self.waiting is None and queue.has_available():
                read = self._read_into_chain(queue)
                if read is None:
                    break  # the tap is empty
                if read:
                    continue  # delivered straight into the guest's buffers
            packet = self.waiting if self.waiting is not None else self.tap.read()
            if packet is None:
                break
            self.waiting = packet
            if not self._place(packet):
                if self.finish_batch(queue, RECEIVE):
                    continue  # buffers came after we looked, and their kick may never come
                break  # none: keep the packet, stop reading the tap until the guest posts more
            self.waiting = None
        self.finish_batch(queue, RECEIVE)
        self.link.pause_input(self.tap.fd, self.waiting is not None)

    def _read_into_chain(self, queue: Virtqueue) -> bool | None:
        """Read one packet from the tap straight into the next receive chain (one copy, the kernel's),
        and with mergeable buffers what did not fit into the chains after it: True if it was placed;
        False if it was not (it waits in self.waiting, for _place to spread over more chains once the
        guest posts them, or drop); None if the tap had none (the chain stays available)."""
        mark = queue.mark()
        chain = queue.pop()
        assert chain is not None
        buffers = chain.writable
        if not buffers or buffers[0].length < HEADER_SIZE:  # num_buffers must be written in one piece
            queue.rewind(mark)
            self.waiting = self.tap.read()  # for _place, which writes the header piece by piece
            return None if self.waiting is None else False
        views = [self.memory.view(b.gpa, b.length) for b in buffers]
        room = sum(map(len, views))
        length = self.tap.read_into([*views, self._spill])
        if length is None:
            queue.rewind(mark)
            return None
        used = [(chain.head, min(length, room))]
        if length > room:  # a TCP segment of the offloads, more than a chain: the rest into the next ones
            more = self._take(queue, length - room) if self.has(VIRTIO_NET_F_MRG_RXBUF) else None
            if more is None:
                queue.rewind(mark)
                self.waiting = b"".join(views) + self._spill[: length - room]
                return False
            used += self._copy_into(more, self._spill[: length - room])
        struct.pack_into("<H", views[0], NUM_BUFFERS_AT, len(used))  # the tap leaves num_buffers alone
        self.complete_all(queue, RECEIVE, used)
        self.rx_packets += 1
        return True

    def _take(self, queue: Virtqueue, size: int) -> list[DescriptorChain] | None:
        """The next receive chains, as many as hold `size` bytes; None (and none taken) if the guest
        has not posted that many."""
        mark = queue.mark()
        chains: list[DescriptorChain] = []
        room = 0
        while room < size:
            chain = queue.pop()
            if chain is None:
                queue.rewind(mark)
                return None
            chains.append(chain)
            room += chain.writable_length
        return chains

    def _copy_into(self, chains: list[DescriptorChain], source: memoryview) -> list[tuple[int, int]]:
        """`source` copied in order over the chains' writable buffers: each chain's head and the bytes
        it got, to complete them together."""
        used, offset = [], 0
        for chain in chains:
            written = 0
            for buffer in chain.writable:
                if offset == len(source):
                    break  # the rest of the last chain's buffers stay as they were
                piece = source[offset : offset + buffer.length]
                self.memory.view(buffer.gpa, len(piece))[:] = piece
                offset += len(piece)
                written += len(piece)
            used.append((chain.head, written))
        return used

    def _place(self, packet: bytes) -> bool:
        """Copy one packet into as many receive chains as it needs; False if there are too few."""
        queue = self.queues[RECEIVE]
        assert queue is not None
        mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF)
        if not queue.has_available():
            return False
        if mergeable:  # wait for more buffers rather than splitting the packet unfinished
            chains = self._take(queue, len(packet))
            if chains is None:
                return False
        else:
            first = queue.pop()
            assert first is not None
            chains = [first]
        if sum(chain.writable_length for chain in chains) < len(packet):  # more than its buffers can hold: dropped
            self.complete_all(queue, RECEIVE, [(chain.head, 0) for chain in chains])
            self.rx_dropped += 1
            return True
        data = bytearray(packet)
        struct.pack_into("<H", data, NUM_BUFFERS_AT, len(chains))  # num_buffers
        self.complete_all(queue, RECEIVE, self._copy_into(chains, memoryview(data)))
        self.rx_packets += 1
        return True

    state_type = NetState

    def state(self) -> NetState:
        return NetState(self.waiting)

    def restore(self, state: object) -> None:
        assert isinstance(state, NetState)
        self.waiting = state.waiting
        self.tap.set_offloads(self.receive_offloads())  # the transport restored what the driver took

    def reset(self) -> None:
        self.waiting = None  # the transport watches the tap again at the next DRIVER_OK
        self.tap.set_offloads(0)  # the next driver may take none

    def close(self) -> None:
        self.tap.close()
