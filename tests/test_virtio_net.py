"""virtio-net on a real tap interface: frames the guest transmits appear on the host side of the
tap, frames the host sends arrive in the guest's receive buffers (with mergeable buffers)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from worldswitch.devices.virtio.net import (HEADER_SIZE, OFFLOADS, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN,
                                            VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
                                            VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
                                            VIRTIO_NET_F_MRG_RXBUF, NetState, TapBackend, VirtioNet)
from worldswitch.devices.virtio.pci import VirtioPciFunction
from worldswitch.memory.guest import GuestMemory

from .virtio_driver import VERSION_1, Driver, wiring

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"),
                                reason="tap devices need root, /dev/net/tun and iproute2")
MAC = bytes.fromhex("525400123456")
ETHERTYPE = 0x88B5  # "local experimental": no host protocol stack answers it


def quiet_tap(name: str) -> None:
    """Create the tap with the host's IPv6 off, before it comes up: otherwise the host's router
    solicitations and MLD reports arrive in the guest's buffers among the test's own frames."""
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")


@pytest.fixture(params=["split", "packed"])
def net(request):
    packed = request.param == "packed"
    memory = GuestMemory([(0, 16 << 20)])
    name = "wst" + uuid.uuid4().hex[:8]
    quiet_tap(name)
    function = VirtioPciFunction(lambda link: VirtioNet(link, memory, TapBackend(name), MAC), wiring([]), packed=packed)
    device = function.device
    function.start()
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    host.bind((name, 0))
    host.settimeout(5)
    yield device, function, Driver(function, memory, (1 << 20, 16 << 20), packed=packed), host, memory
    host.close()
    function.close()
    memory.close()
    subprocess.run(["ip", "link", "delete", name], check=False)


def frame(payload: bytes, source: bytes = bytes.fromhex("020000000001")) -> bytes:
    return MAC + source + struct.pack("!H", ETHERTYPE) + payload


def test_config_space_carries_the_mac_and_link_up(net) -> None:
    device, _, driver, _, _ = net
    assert driver.read(0x2000, 4) | driver.read(0x2004, 2) << 32 == int.from_bytes(MAC, "little")
    assert driver.read(0x2006, 2) == 1  # VIRTIO_NET_S_LINK_UP


def test_guest_transmits_a_frame_in_several_descriptors(net) -> None:
    _, _, driver, host, _ = net
    driver.start(queues=(0, 1))
    payload = b"hello from the guest" * 3
    data = frame(payload, source=MAC)
    chain = [(*driver.buffer(bytes(HEADER_SIZE)), False), (*driver.buffer(data[:20]), False), (*driver.buffer(data[20:]), False)]
    driver.queues[1].add(chain)
    driver.kick(1)
    driver.wait_used(1)
    received = host.recv(2048)
    assert received[:len(data)] == data


def test_host_frames_arrive_across_mergeable_buffers(net) -> None:
    device, _, driver, host, memory = net
    driver.start(VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF), queues=(0, 1))
    buffers = [driver.buffer(64) for _ in range(4)]
    for buffer in buffers:
        driver.queues[0].add([(*buffer, True)])
    driver.kick(0)
    payload = bytes(range(100))
    sent = frame(payload)
    host.send(sent)
    used = driver.wait_used(0, 2)  # 12 + 114 bytes need two 64-byte buffers
    data = b"".join(memory.read(buffers[head][0], written) for head, written in used)
    assert struct.unpack_from("<H", data, 10)[0] == 2  # num_buffers
    assert data[HEADER_SIZE:HEADER_SIZE + len(sent)] == sent
    assert device.rx_packets == 1


def test_a_frame_before_the_driver_leaves_the_device_idle_until_its_queue_is_set_up(net) -> None:
    """Before the driver sets up the receive queue, a readable tap must not keep the I/O thread busy:
    it spun on it at 100% of a CPU through a whole Linux boot (the host's IPv6 packets on a new tap)."""
    device, function, driver, host, memory = net
    host.send(frame(b"before the driver"))
    time.sleep(0.2)  # the I/O thread has seen the tap readable
    clock = time.pthread_getcpuclockid(function.worker._thread.ident)
    busy = time.clock_gettime(clock)
    time.sleep(0.5)
    assert time.clock_gettime(clock) - busy < 0.05, "the I/O thread spins on the tap"
    driver.start(queues=(0, 1))
    buffer = driver.buffer(2048)
    driver.queues[0].add([(*buffer, True)])
    driver.kick(0)
    (_, written), = driver.wait_used(0)  # the frame that waited in the tap, once there is somewhere to put it
    assert memory.read(buffer[0] + HEADER_SIZE, written - HEADER_SIZE).startswith(frame(b"before the driver"))
    assert device.rx_packets == 1


def test_frames_wait_until_the_guest_posts_buffers(net) -> None:
    device, _, driver, host, memory = net
    driver.start(queues=(0, 1))
    host.send(frame(b"early"))
    time.sleep(0.1)
    assert device.waiting is not None  # read from the tap, held for the guest
    buffer = driver.buffer(2048)
    driver.queues[0].add([(*buffer, True)])
    driver.kick(0)
    (_, written), = driver.wait_used(0)
    assert memory.read(buffer[0] + HEADER_SIZE, written - HEADER_SIZE).startswith(frame(b"early"))


def test_a_frame_waits_for_enough_mergeable_buffers(net) -> None:
    """One 64-byte buffer cannot hold the frame: the device gives it back untouched and waits; a
    second buffer completes the pair (the device's rewind of the ring, in either layout)."""
    device, _, driver, host, memory = net
    driver.start(VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF), queues=(0, 1))
    first, second = driver.buffer(64), driver.buffer(64)
    driver.queues[0].add([(*first, True)])
    driver.kick(0)
    sent = frame(bytes(range(100)))
    host.send(sent)
    time.sleep(0.1)
    assert device.waiting is not None and driver.queues[0].used_count() == 0
    driver.queues[0].add([(*second, True)])
    driver.kick(0)
    used = driver.wait_used(0, 2)
    data = b"".join(memory.read((first, second)[head][0], written) for head, written in used)
    assert struct.unpack_from("<H", data, 10)[0] == 2
    assert data[HEADER_SIZE:HEADER_SIZE + len(sent)] == sent


def test_a_frame_read_straight_into_one_buffer_says_it_took_one(net) -> None:
    """The tap reads into the guest's buffer itself and leaves the header's num_buffers alone: the
    device writes 1 there over whatever the buffer held."""
    device, _, driver, host, memory = net
    driver.start(VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF), queues=(0, 1))
    buffer = driver.buffer(b"\xff" * 2048)
    driver.queues[0].add([(*buffer, True)])
    driver.kick(0)
    sent = frame(bytes(range(200)))
    host.send(sent)
    (_, written), = driver.wait_used(0)
    data = memory.read(buffer[0], written)
    assert written == HEADER_SIZE + len(sent) and data[HEADER_SIZE:] == sent
    assert data[:HEADER_SIZE] == bytes(10) + struct.pack("<H", 1)  # no offloads; num_buffers 1
    assert device.rx_packets == 1


def test_a_chain_whose_first_buffer_cannot_hold_the_header_still_takes_a_frame(net) -> None:
    """An 8-byte first buffer: the header spans two buffers, which the device writes piece by piece."""
    device, _, driver, host, memory = net
    driver.start(VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF), queues=(0, 1))
    small, large = driver.buffer(8), driver.buffer(2048)
    driver.queues[0].add([(*small, True), (*large, True)])
    driver.kick(0)
    sent = frame(b"split header")
    host.send(sent)
    (_, written), = driver.wait_used(0)
    data = memory.read(small[0], 8) + memory.read(large[0], written - 8)
    assert struct.unpack_from("<H", data, 10)[0] == 1 and data[HEADER_SIZE:] == sent


# Offloads: a TCP segment larger than a frame, made the way a stack with checksum offload hands it to
# a device (its TCP checksum field holding the pseudo-header's sum, for the device to finish).
SOL_PACKET, PACKET_VNET_HDR = 263, 15  # linux/if_packet.h: a packet socket's frames carry a virtio_net_hdr
ETH_P_IP = 0x0800
NEEDS_CSUM, GSO_TCPV4 = 1, 1  # virtio_net_hdr's flags and gso_type
MSS = 1448
PAYLOAD = bytes(range(251)) * 24  # 6,024 bytes: five frames at that MSS
ETH_IP_TCP = 14 + 20 + 20


def _ones_complement_sum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data[: len(data) & ~1])) + (data[-1] << 8 if len(data) & 1 else 0)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_segment(payload: bytes, source_mac: bytes = bytes.fromhex("020000000001")) -> bytes:
    source, target = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 7, 0x4000, 64, 6, 0, source, target))
    ip[10:12] = struct.pack("!H", ~_ones_complement_sum(bytes(ip)) & 0xFFFF)
    pseudo = _ones_complement_sum(source + target + struct.pack("!BBH", 0, 6, 20 + len(payload)))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    return MAC + source_mac + struct.pack("!H", ETH_P_IP) + bytes(ip) + tcp + payload


def gso_header(gso_type: int = GSO_TCPV4) -> bytes:
    # flags, gso_type, hdr_len, gso_size, csum_start (the TCP header), csum_offset (its checksum field)
    return struct.pack("<BBHHHH", NEEDS_CSUM, gso_type, ETH_IP_TCP, MSS, 14 + 20, 16)


def tcp_checksum_holds(frame: bytes) -> bool:
    ip = frame[14:34]
    segment = frame[34 : 14 + struct.unpack_from("!H", ip, 2)[0]]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(segment))
    return _ones_complement_sum(pseudo + segment) == 0xFFFF


def _send_as_the_host(tap: str, packet: bytes) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)) as sender:
        sender.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sender.bind((tap, 0))
        sender.send(gso_header() + packet)


def _received(driver: Driver, memory: GuestMemory, buffers: list[tuple[int, int]], count: int) -> list[bytes]:
    """`count` packets from the receive queue, each its buffers' bytes joined (header first)."""
    packets: list[bytes] = []
    while len(packets) < count:
        (head, written), = driver.wait_used(0)
        data = memory.read(buffers[head][0], written)
        for _ in range(struct.unpack_from("<H", data, 10)[0] - 1):  # num_buffers
            (head, written), = driver.wait_used(0)
            data += memory.read(buffers[head][0], written)
        packets.append(data)
    return packets


def _post(driver: Driver, count: int, size: int) -> list[tuple[int, int]]:
    buffers = [driver.buffer(size) for _ in range(count)]
    for buffer in buffers:
        driver.queues[0].add([(*buffer, True)])
    driver.kick(0)
    return buffers


def test_a_driver_that_takes_tso_receives_a_tcp_segment_whole(net) -> None:
    """GUEST_CSUM and GUEST_TSO4 taken: the tap is told (TUNSETOFFLOAD), and a 6 KB segment the host
    sends reaches the guest as one packet with its GSO header, across mergeable buffers."""
    device, _, driver, _, memory = net
    driver.start(VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4),
                 queues=(0, 1))
    buffers = _post(driver, 8, 4096)
    segment = tcp_segment(PAYLOAD)
    _send_as_the_host(device.tap.name, segment)
    packet, = _received(driver, memory, buffers, 1)
    flags, gso_type, _, gso_size, csum_start, csum_offset, num_buffers = struct.unpack_from("<BBHHHHH", packet)
    assert (flags & NEEDS_CSUM, gso_type, gso_size, csum_start, csum_offset) == (NEEDS_CSUM, GSO_TCPV4, MSS, 34, 16)
    assert num_buffers == 2 and packet[HEADER_SIZE:] == segment
    assert device.rx_packets == 1 and device.rx_dropped == 0


def test_a_driver_without_offloads_receives_the_segment_as_frames_with_their_checksums(net) -> None:
    device, _, driver, _, memory = net
    driver.start(VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF), queues=(0, 1))
    buffers = _post(driver, 8, 2048)
    _send_as_the_host(device.tap.name, tcp_segment(PAYLOAD))
    packets = _received(driver, memory, buffers, 5)
    assert all(packet[1] == 0 for packet in packets)  # gso_type NONE: the host's stack cut the segment
    frames = [packet[HEADER_SIZE:] for packet in packets]
    assert all(len(frame) <= 1514 and tcp_checksum_holds(frame) for frame in frames)  # and finished each checksum
    assert b"".join(frame[ETH_IP_TCP:] for frame in frames) == PAYLOAD


def test_a_tcp_segment_the_driver_sends_leaves_the_tap_whole_and_a_refused_header_is_dropped(net) -> None:
    device, _, driver, _, _ = net
    driver.start(VERSION_1 | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4), queues=(0, 1))
    segment = tcp_segment(PAYLOAD, source_mac=MAC)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)) as capture:
        capture.bind((device.tap.name, 0))
        capture.settimeout(5)
        for gso_type in (GSO_TCPV4, 7):  # 7: no GSO type the kernel knows
            chain = [(*driver.buffer(gso_header(gso_type) + bytes(2)), False), (*driver.buffer(segment), False)]
            driver.queues[1].add(chain)
            driver.kick(1)
            driver.wait_used(1)
        assert capture.recv(1 << 16) == segment  # one packet, as the guest made it: the host's stack segments it
    assert (device.tx_packets, device.tx_dropped) == (1, 1)


def test_offloads_follow_the_driver_through_reset() -> None:
    """What the tap is told for each set of features the driver may take, and none after a reset."""
    told: list[int] = []

    class Tap:
        fd, name = -1, "tap"

        def set_offloads(self, flags: int) -> None:
            told.append(flags)

    memory = GuestMemory([(0, 1 << 20)])
    device = VirtioNet(None, memory, Tap(), MAC)  # type: ignore[arg-type]
    assert device.device_features & OFFLOADS == OFFLOADS
    for taken, flags in (((), 0), ((VIRTIO_NET_F_GUEST_TSO4,), 0),  # TSO without checksums: a driver's error
                         ((VIRTIO_NET_F_GUEST_CSUM,), TUN_F_CSUM),
                         ((VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
                         ((VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN), TUN_F_CSUM),  # ECN only with TSO
                         ((VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_ECN), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN)):
        device.driver_features = sum(1 << bit for bit in taken)
        device.activate()
        assert told[-1] == flags, taken
        device.reset()
        assert told[-1] == 0
        device.driver_features = sum(1 << bit for bit in taken)  # a snapshot's, restored by the transport
        device.restore(NetState(None))
        assert told[-1] == flags, taken
    assert not VirtioNet(None, memory, Tap(), MAC, offloads=False).device_features & OFFLOADS  # type: ignore[arg-type]
    memory.close()
