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

from worldswitch.devices.virtio.net import HEADER_SIZE, VIRTIO_NET_F_MRG_RXBUF, TapBackend, VirtioNet
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
