"""virtio devices driven as a guest driver drives them (tests/virtio_driver.py), without KVM: the
transport, negotiation, queues, interrupts, each device, and what hostile drivers do."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from worldswitch.devices import virtio
from worldswitch.devices.virtio import blk as vb
from worldswitch.devices.virtio import pci as vp
from worldswitch.devices.virtio.blk import VirtioBlock
from worldswitch.devices.virtio.console import ConsoleBackend, VirtioConsole
from worldswitch.devices.virtio.queue import DESCRIPTOR, SplitQueue, VirtqueueError
from worldswitch.devices.virtio.rng import VirtioRng
from worldswitch.memory.guest import GuestMemory

from .virtio_driver import UNPLUGGED, VERSION_1, Driver, wiring

MIB = 1 << 20
INDIRECT = 1 << virtio.VIRTIO_RING_F_INDIRECT_DESC
EVENT_IDX = 1 << virtio.VIRTIO_RING_F_EVENT_IDX


def plug(make_device, memory, region=(MIB, 16 * MIB)):
    delivered: list[int] = []
    function = vp.VirtioPciFunction(make_device, wiring(delivered))
    function.start()
    return function, Driver(function, memory, region), delivered


def blk_request(driver: Driver, kind: int, sector: int, data: bytes | int = 0, *, indirect: bool = False):
    header = driver.buffer(struct.pack("<IIQ", kind, 0, sector))
    status = driver.buffer(1)
    buffers = [(*header, False)]
    if isinstance(data, bytes) and data:
        buffers.append((*driver.buffer(data), False))
    elif isinstance(data, int) and data:
        payload = driver.buffer(data)
        buffers.append((*payload, True))
    buffers.append((*status, True))
    table = driver.allocate(16 * len(buffers), 16) if indirect else None
    head = driver.queues[0].add(buffers, indirect_table=table)
    driver.kick(0)
    (used_head, written), = driver.wait_used(0)
    assert used_head == head
    result = driver.memory.read(buffers[-2][0], buffers[-2][1]) if isinstance(data, int) and data else b""
    return driver.memory.read(status[0], 1)[0], written, result


# --- the transport -----------------------------------------------------------------------------


def test_version_1_is_required(memory, image) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        assert driver.device_features() & VERSION_1
        assert not driver.negotiate(0)  # a legacy driver is refused: FEATURES_OK does not stick
        assert not driver.negotiate(VERSION_1 | (1 << 60))  # nor a feature the device never offered
        assert driver.negotiate(VERSION_1)
    finally:
        function.close()


def test_capabilities_describe_the_bar_layout(memory, image) -> None:
    function, _, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        found = {}
        offset = function.config_read(0x34, 1)
        while offset:
            cap_id, following = function.config_read(offset, 1), function.config_read(offset + 1, 1)
            if cap_id == 0x09:
                cfg_type, bar = function.config_read(offset + 3, 1), function.config_read(offset + 4, 1)
                found[cfg_type] = (bar, function.config_read(offset + 8, 4), function.config_read(offset + 12, 4))
            offset = following
        assert found[vp.CFG_COMMON] == (0, 0x0000, 0x38)
        assert found[vp.CFG_ISR][:2] == (0, 0x1000)
        assert found[vp.CFG_DEVICE][:2] == (0, 0x2000)
        assert found[vp.CFG_NOTIFY][:2] == (0, 0x3000)
        assert vp.CFG_PCI in found
        assert function.config_read(0, 2) == 0x1AF4 and function.config_read(2, 2) == 0x1042
    finally:
        function.close()


def test_pci_cfg_capability_reaches_the_bar(memory, image) -> None:
    function, _, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        cap = function.pci_cfg
        function.config_write(cap + 4, 1, 0)  # BAR 0
        function.config_write(cap + 8, 4, vp.NUM_QUEUES)  # offset
        function.config_write(cap + 12, 4, 2)  # length
        assert function.config_read(cap + 16, 2) == 1  # num_queues, read through configuration space
    finally:
        function.close()


# --- virtio-blk ---------------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_blk_read_write_flush_and_get_id(memory, image, indirect: bool) -> None:
    function, driver, delivered = plug(lambda link: VirtioBlock(link, memory, str(image), serial="disk-serial-1"), memory)
    device = function.device
    try:
        driver.start(VERSION_1 | INDIRECT)
        assert struct.unpack_from("<Q", bytes(device.config()))[0] == 4 * MIB // 512
        status, written, data = blk_request(driver, vb.T_IN, 2, 1024, indirect=indirect)
        assert status == vb.S_OK and written == 1025 and data == (bytes(range(256)) * 4)
        status, _, _ = blk_request(driver, vb.T_OUT, 5, b"\xab" * 512, indirect=indirect)
        assert status == vb.S_OK
        assert blk_request(driver, vb.T_FLUSH, 0)[0] == vb.S_OK
        status, _, serial = blk_request(driver, vb.T_GET_ID, 0, 20, indirect=indirect)
        assert serial.rstrip(b"\0") == b"disk-serial-1"
    finally:
        function.close()
    assert image.read_bytes()[5 * 512 : 6 * 512] == b"\xab" * 512  # on disk after close
    assert delivered == []  # no MSI-X vector was assigned: interrupts went the INTx way


def test_blk_discard_write_zeroes_and_range_checks(memory, image) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        driver.start()
        segment = struct.pack("<QII", 8, 2, 0)
        assert blk_request(driver, vb.T_WRITE_ZEROES, 0, segment)[0] == vb.S_OK
        assert blk_request(driver, vb.T_DISCARD, 0, struct.pack("<QII", 16, 1, 0))[0] == vb.S_OK
        capacity = 4 * MIB // 512
        assert blk_request(driver, vb.T_IN, capacity, 512)[0] == vb.S_IOERR  # past the end
        assert blk_request(driver, vb.T_IN, capacity - 1, 1024)[0] == vb.S_IOERR  # straddles it
        assert blk_request(driver, vb.T_IN, 2**63, 512)[0] == vb.S_IOERR  # sector * 512 overflows
        assert blk_request(driver, vb.T_OUT, 0, b"x" * 100)[0] == vb.S_IOERR  # not whole sectors
        assert blk_request(driver, 99, 0)[0] == vb.S_UNSUPP
        assert blk_request(driver, vb.T_DISCARD, 0, struct.pack("<QII", 0, 1, 1))[0] == vb.S_UNSUPP  # bad flags
    finally:
        function.close()
    data = image.read_bytes()
    assert data[8 * 512 : 10 * 512] == bytes(1024) and data[16 * 512 : 17 * 512] == bytes(512)
    assert data[10 * 512 : 10 * 512 + 4] == bytes([0, 1, 2, 3])  # untouched neighbours


def test_read_only_disk_refuses_writes(memory, image) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image), read_only=True), memory)
    try:
        assert driver.device_features() & (1 << vb.VIRTIO_BLK_F_RO)
        driver.start()
        assert blk_request(driver, vb.T_OUT, 0, b"\xff" * 512)[0] == vb.S_IOERR
        assert blk_request(driver, vb.T_IN, 0, 512)[0] == vb.S_OK
    finally:
        function.close()
    assert image.read_bytes()[:2] == b"\x00\x01"


def test_msix_interrupts_and_event_index(memory, image) -> None:
    function, driver, delivered = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        assert driver.negotiate(VERSION_1 | EVENT_IDX)
        driver.setup_queue(0, msix_vector=1)
        driver.write(vp.DEVICE_STATUS, 1, 0x0F)
        driver.enable_msix()
        queue = driver.queues[0]
        memory.write_int(queue.avail + 4 + 2 * queue.size, 2, 0)  # used_event: interrupt after the first
        assert blk_request(driver, vb.T_IN, 0, 512)[0] == vb.S_OK
        assert delivered == [1]
        memory.write_int(queue.avail + 4 + 2 * queue.size, 2, 100)  # used_event far ahead: no interrupts
        assert blk_request(driver, vb.T_IN, 0, 512)[0] == vb.S_OK
        assert delivered == [1]
        assert memory.read_int(queue.used + 4 + 8 * queue.size, 2) == 2  # avail_event: kick me at 2
    finally:
        function.close()


def test_intx_when_msix_is_off_and_isr_read_acknowledges(memory, image) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        driver.start()
        blk_request(driver, vb.T_IN, 0, 512)
        assert function.intx.level  # type: ignore[union-attr]
        assert driver.read(vp.ISR_OFFSET, 1) == vp.ISR_QUEUE
        assert not function.intx.level  # type: ignore[union-attr]
        assert driver.read(vp.ISR_OFFSET, 1) == 0
    finally:
        function.close()


# --- hostile drivers ------------------------------------------------------------------------------


def broken(driver: Driver, function: vp.VirtioPciFunction, descriptors: list[tuple[int, int, int, int]]) -> str:
    """Write raw descriptors, make descriptor 0 available, kick, and report why the device broke."""
    queue = driver.queues[0]
    for i, descriptor in enumerate(descriptors):
        driver.memory.write(queue.desc + 16 * i, DESCRIPTOR.pack(*descriptor))
    queue.publish(0)
    driver.kick(0)
    return driver.wait_needs_reset()


@pytest.mark.parametrize(
    "descriptors,reason",
    [
        ([(0x7FFF0000, 16, 0, 0)], "outside guest RAM"),  # beyond RAM
        ([(2**64 - 8, 16, 0, 0)], "outside guest RAM"),  # wraps around
        ([(0x100000, 16, 1, 1), (0x100000, 16, 1, 0)], "loops"),  # 0 -> 1 -> 0 ...
        ([(0x100000, 16, 1, 9999)], "beyond its table"),
        ([(0x100000, 16, 4, 0)], "INDIRECT_DESC was not negotiated"),
        ([(0x100000, 16, 3, 1), (0x100000, 16, 0, 0)], "readable buffer after a writable"),
    ],
)
def test_malformed_chains_put_the_device_in_needs_reset(memory, image, descriptors, reason) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        driver.start()
        assert reason in broken(driver, function, descriptors)
        # Nothing more is served until the driver resets; then the device works again.
        driver.start()
        assert blk_request(driver, vb.T_IN, 0, 512)[0] == vb.S_OK
    finally:
        function.close()


def test_avail_index_beyond_the_queue_size_breaks_the_queue(memory, image) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        driver.start()
        queue = driver.queues[0]
        memory.write_int(queue.avail + 2, 2, queue.size + 5)
        driver.kick(0)
        assert "claims" in driver.wait_needs_reset()
    finally:
        function.close()


def test_queue_addresses_outside_ram_are_refused_at_enable(memory, image) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        assert driver.negotiate(VERSION_1)
        driver.write(vp.QUEUE_SELECT, 2, 0)
        driver.write(vp.QUEUE_DESC + 4, 4, 0x10)  # 64 GiB up
        driver.write(vp.QUEUE_ENABLE, 2, 1)
        assert driver.status & virtio.DEVICE_NEEDS_RESET and "outside guest RAM" in (function.broken or "")
    finally:
        function.close()


def test_reset_mid_request_forgets_the_queue(memory, image) -> None:
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        driver.start()
        # DRIVER_OK kicks every queue; once that kick is served the worker is done with the queue, so a
        # buffer made available from here on cannot be taken before the reset (the spec would allow that).
        assert function.worker.wait_kicks(1, timeout=5)
        header = driver.buffer(struct.pack("<IIQ", vb.T_IN, 0, 0))
        driver.queues[0].add([(*header, False), (*driver.buffer(512), True), (*driver.buffer(1), True)])
        driver.write(vp.DEVICE_STATUS, 1, 0)  # reset before the kick
        driver.kick(0)
        assert function.worker.wait_kicks(2, timeout=5)  # the kick after the reset has been looked at
        assert driver.queues[0].used_count() == 0  # nothing served after the reset
        assert driver.status == 0 and function.device.queues == [None]
        driver.start()
        assert blk_request(driver, vb.T_IN, 0, 512)[0] == vb.S_OK
    finally:
        function.close()


def test_a_buffer_made_available_while_the_device_arms_its_queue_is_served_without_a_kick(memory, image) -> None:
    """The lost-kick race of event suppression (virtio 1.2, 2.7.10): the driver adds a buffer after the
    device found the ring empty but before the device wrote avail_event, reads the old avail_event and
    does not kick. The device must look again after arming, or that buffer waits forever."""
    function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image)), memory)
    try:
        driver.start(VERSION_1 | EVENT_IDX)
        assert function.worker.wait_kicks(1, timeout=5)
        queue = function.device.queues[0]
        device_pop = queue.pop
        raced: list[int] = []

        def pop_then_race():  # type: ignore[no-untyped-def]
            chain = device_pop()
            if chain is None and not raced:  # the ring looked empty: now the driver adds one, unkicked
                header = driver.buffer(struct.pack("<IIQ", vb.T_IN, 0, 1))
                raced.append(driver.queues[0].add([(*header, False), (*driver.buffer(512), True),
                                                   (*driver.buffer(1), True)]))
            return chain

        queue.pop = pop_then_race
        header = driver.buffer(struct.pack("<IIQ", vb.T_IN, 0, 0))
        first = driver.queues[0].add([(*header, False), (*driver.buffer(512), True), (*driver.buffer(1), True)])
        driver.kick(0)
        used = driver.wait_used(0, count=2, timeout=5)
        assert sorted(head for head, _ in used) == sorted([first, *raced])
    finally:
        function.close()


# --- entropy and console ----------------------------------------------------------------------------


def test_rng_fills_buffers_and_bounds_huge_ones(memory) -> None:
    function, driver, _ = plug(lambda link: VirtioRng(link, memory), memory)
    try:
        driver.start()
        small = driver.buffer(64)
        huge = driver.buffer(512 * 1024)
        driver.queues[0].add([(*small, True)])
        driver.queues[0].add([(*huge, True)])
        driver.kick(0)
        used = dict(driver.wait_used(0, 2))
        assert sorted(used.values()) == [64, 64 * 1024]
        assert memory.read(*small) != bytes(64)
    finally:
        function.close()


class Collector(ConsoleBackend):
    def __init__(self) -> None:
        self.out = bytearray()
        self.read_fd, self.write_fd = os.pipe()
        self.fd = self.read_fd

    def read(self) -> bytes:
        return os.read(self.read_fd, 4096)

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def test_console_transmits_and_receives(memory) -> None:
    backend = Collector()
    function, driver, _ = plug(lambda link: VirtioConsole(link, memory, backend), memory)
    try:
        driver.start(queues=(0, 1))
        driver.queues[1].add([(*driver.buffer(b"hello "), False), (*driver.buffer(b"host"), False)])
        driver.kick(1)
        driver.wait_used(1)
        assert bytes(backend.out) == b"hello host"
        rx = driver.buffer(32)
        driver.queues[0].add([(*rx, True)])
        driver.kick(0)
        os.write(backend.write_fd, b"from the host")
        (_, written), = driver.wait_used(0)
        assert memory.read(rx[0], written) == b"from the host"
    finally:
        function.close()


class FullDisk(ConsoleBackend):
    """A console file on a file system that fills up after the first write."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.full = False

    def write(self, data: bytes) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.out += data
        self.full = True


def test_a_back_end_failure_needs_a_reset_and_the_io_thread_lives_on(memory) -> None:
    backend = FullDisk()
    function, driver, _ = plug(lambda link: VirtioConsole(link, memory, backend), memory)
    try:
        driver.start(queues=(0, 1))
        for text in (b"fits", b"does not"):
            driver.queues[1].add([(*driver.buffer(text), False)])
            driver.kick(1)
        assert "its back end failed: No space left on device" in driver.wait_needs_reset(timeout=5)
        assert bytes(backend.out) == b"fits"
        assert function.worker.error is None  # the thread is alive: after a reset the device works again
        backend.full = False
        driver.start(queues=(0, 1))
        driver.queues[1].add([(*driver.buffer(b"again"), False)])
        driver.kick(1)
        driver.wait_used(1)
        assert bytes(backend.out) == b"fitsagain"
    finally:
        function.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a small tmpfs, mounted as root")
def test_a_full_disk_answers_ioerr_with_one_warning(memory, tmp_path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        image = mount / "sparse.img"
        with open(image, "wb") as file:
            file.truncate(1 << 20)  # 1 MiB of holes on 64 KiB of space
        warnings: list[str] = []
        function, driver, _ = plug(lambda link: VirtioBlock(link, memory, str(image), warn=warnings.append), memory)
        try:
            driver.start()
            statuses = [blk_request(driver, vb.T_OUT, sector, b"\xab" * 4096)[0] for sector in range(0, 256, 8)]
            assert statuses[0] == vb.S_OK and statuses[-1] == vb.S_IOERR  # the first fit, the last did not
            assert len(warnings) == 1 and "No space left on device" in warnings[0]
            assert blk_request(driver, vb.T_IN, 0, 512)[0] == vb.S_OK  # the device goes on serving
        finally:
            function.close()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --- the virtqueue parser under fuzzing ---------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descriptors=st.lists(
        st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, 0x20000), st.integers(0, 2**32 - 1) | st.integers(0, 64),
                  st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]), st.integers(0, 0xFFFF) | st.integers(0, 8)),
        min_size=8, max_size=8,
    ),
    heads=st.lists(st.integers(0, 0xFFFF) | st.integers(0, 8), min_size=1, max_size=4),
    avail_idx=st.integers(0, 0xFFFF),
    indirect=st.booleans(),
)
def test_fuzzed_rings_give_valid_chains_or_virtqueue_errors(memory, descriptors, heads, avail_idx, indirect) -> None:
    """Whatever a driver writes, the parser returns chains inside guest RAM or raises VirtqueueError:
    no other exception, no access outside RAM, no endless walk."""
    desc, avail, used = 0x10000, 0x11000, 0x12000
    for i, descriptor in enumerate(descriptors):
        memory.write(desc + 16 * i, DESCRIPTOR.pack(*descriptor))
    for i, head in enumerate(heads):
        memory.write_int(avail + 4 + 2 * i, 2, head)
    memory.write_int(avail + 2, 2, avail_idx)
    queue = SplitQueue(memory, 8, desc, avail, used, indirect=indirect)
    for _ in range(10):
        try:
            chain = queue.pop()
        except VirtqueueError:
            break
        if chain is None:
            break
        for buffer in chain.readable + chain.writable:
            assert memory.contains(buffer.gpa, buffer.length)
        assert len(chain.readable) + len(chain.writable) <= 8 * 8


def walk_by_the_spec(memory: GuestMemory, entries: list[tuple[int, int, int, int]]) -> list[tuple[int, int, bool]] | None:
    """An indirect table's chain as virtio 1.2 (2.7.5.3) has a device walk it, one descriptor at a
    time from the first: its buffers (address, length, written by the device), or None where the
    driver broke a rule (a loop, a nested table, a next beyond the table, a readable buffer after
    a writable one, a buffer outside RAM)."""
    buffers: list[tuple[int, int, bool]] = []
    index = 0
    for _ in entries:
        address, length, flags, next_index = entries[index]
        if flags & 4 or address + length > 1 << 64 or not memory.contains(address, length):
            return None
        if not flags & 2 and any(write for *_, write in buffers):
            return None
        buffers.append((address, length, bool(flags & 2)))
        if not flags & 1:
            return buffers
        if next_index >= len(entries):
            return None
        index = next_index
    return None  # more descriptors than the table has: a loop


def linux_table(count: int, changes: dict[int, tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """A header, then writable pages, in Linux's layout, with some entries replaced."""
    return [changes.get(i, (0x300000 + 0x2000 * i, 16, (1 if i + 1 < count else 0) | (2 if i else 0), i + 1))
            for i in range(count)]


@st.composite
def indirect_tables(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    """Tables in Linux's layout (readable buffers, then writable ones, each next the one after it),
    most with a few fields changed to anything a driver could write."""
    count = draw(st.integers(1, 40))
    readable = draw(st.integers(0, count))
    entries = [(0x300000 + 0x2000 * i + draw(st.integers(0, 64)), draw(st.sampled_from([1, 16, 512, 4096])),
                (1 if i + 1 < count else 0) | (2 if i >= readable else 0), i + 1) for i in range(count)]
    for _ in range(draw(st.integers(0, 3))):
        at, field = draw(st.integers(0, count - 1)), draw(st.integers(0, 4))
        entry = list(entries[at])
        if field == 4:  # one flag bit flipped: WRITE, NEXT or INDIRECT
            entry[2] ^= draw(st.sampled_from([1, 2, 4]))
        else:
            entry[field] = draw([st.integers(0, 2**64 - 1) | st.integers(0xFFF000, 0x1000FFF),  # anywhere, or at RAM's end
                                 st.integers(0, 2**32 - 1) | st.integers(0, 0x2000),
                                 st.integers(0, 0xFFFF) | st.integers(0, 7),
                                 st.integers(0, 0xFFFF) | st.integers(0, count + 1)][field])
        entries[at] = (entry[0], entry[1], entry[2], entry[3])
    return entries


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=indirect_tables(), holed=st.booleans())
@example(entries=linux_table(12, changes={5: (0x30A000, 16, 1, 6)}), holed=False)  # readable after writable
@example(entries=linux_table(12, changes={3: (0x306000, 16, 0x103, 4)}), holed=False)  # a flag a split ring lacks
@example(entries=linux_table(12, changes={3: (0x306000, 16, 3, 5), 4: (0x308000, 16, 3, 4)}), holed=False)  # a loop
@example(entries=linux_table(12, changes={3: (0x306000, 16, 3, 5)}), holed=False)  # one skipped
@example(entries=linux_table(12, changes={11: (0xFFFF00, 0x200, 2, 0)}), holed=False)  # across RAM's end
def test_indirect_tables_give_the_chain_the_spec_walks(entries, holed) -> None:
    """Linux puts a large request in one indirect table, which the queue reads whole where it can: what
    it returns is what a walk one descriptor at a time gives, and what that walk refuses it refuses.
    With `holed`, guest RAM has a hole (8 to 9 MiB) that the odd buffers lie beyond."""
    memory = GuestMemory([(0, 8 * MIB), (9 * MIB, 7 * MIB)] if holed else [(0, 16 * MIB)])
    try:
        if holed:
            entries = [((address + 6 * MIB * (i % 2)) % (1 << 64), *rest) for i, (address, *rest) in enumerate(entries)]
        desc, table = 0x10000, 0x200000
        for i, entry in enumerate(entries):
            memory.write(table + 16 * i, DESCRIPTOR.pack(*entry))
        memory.write(desc, DESCRIPTOR.pack(table, 16 * len(entries), 4, 0))  # the head: the table
        queue = SplitQueue(memory, 8, desc, 0x11000, 0x12000, indirect=True)
        expected = walk_by_the_spec(memory, entries)
        try:
            chain = queue.chain(0)
        except VirtqueueError:
            assert expected is None
        else:
            got = [(b.gpa, b.length, False) for b in chain.readable] + [(b.gpa, b.length, True) for b in chain.writable]
            assert got == expected
    finally:
        memory.close()


def test_a_large_request_in_one_indirect_table_is_read_whole(memory) -> None:
    """A 1 MiB read in Linux's layout (a header, 256 pages, a status byte) is read in bulk, not
    handed back to the walk one descriptor at a time."""
    from worldswitch.devices.virtio.queue import table_buffers

    table, pages = 0x200000, 0x400000
    entries = [(0x300000, 16, 1, 1)] + [(pages + 0x2000 * i, 4096, 3, i + 2) for i in range(256)] + [(0x300010, 1, 2, 0)]
    for i, entry in enumerate(entries):
        memory.write(table + 16 * i, DESCRIPTOR.pack(*entry))
    view = memory.view(table, 16 * len(entries))
    bulk = table_buffers(memory, view, bytes(view[12::16]))
    assert bulk is not None
    readable, writable = bulk
    assert [tuple(b) for b in readable] == [(0x300000, 16)]
    assert [tuple(b) for b in writable] == [(address, length) for address, length, *_ in entries[1:]]


# --- image locks, as QEMU takes them ------------------------------------------------------------------


def test_an_image_has_one_writer_or_many_readers(memory, image) -> None:
    from worldswitch.errors import ConfigError

    writer = VirtioBlock(UNPLUGGED, memory, str(image))
    try:
        with pytest.raises(ConfigError, match="is in use"):
            VirtioBlock(UNPLUGGED, memory, str(image))  # a second writer, even in the same process
        with pytest.raises(ConfigError, match=r"is in use: another process may write it \(to read it anyway"):
            VirtioBlock(UNPLUGGED, memory, str(image), read_only=True)
        VirtioBlock(UNPLUGGED, memory, str(image), read_only=True, shared=True).close()  # the user's explicit choice
    finally:
        writer.close()
    readers = [VirtioBlock(UNPLUGGED, memory, str(image), read_only=True) for _ in range(2)]
    try:
        with pytest.raises(ConfigError, match="does not let others write it"):
            VirtioBlock(UNPLUGGED, memory, str(image))
    finally:
        for reader in readers:
            reader.close()
    VirtioBlock(UNPLUGGED, memory, str(image)).close()  # the locks went with the descriptors


@pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                    reason="qemu-utils is not installed (.ci/run installs it)")
def test_qemu_and_worldswitch_respect_each_others_locks(memory, image) -> None:
    import time

    from worldswitch.errors import ConfigError

    writer = VirtioBlock(UNPLUGGED, memory, str(image))
    try:
        qemu_io = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", str(image)], capture_output=True,
                                 text=True, timeout=60)
        assert qemu_io.returncode != 0 and 'Failed to get "write" lock' in qemu_io.stderr
    finally:
        writer.close()
    qemu = subprocess.Popen(["qemu-io", "-f", "raw", str(image)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # opens the image read-write and waits for commands
    try:
        # Wait until QEMU holds its locks, watching /proc/locks rather than trying to open the image:
        # a try of ours holds locks too, and one at QEMU's open made QEMU give up (a nested-host failure).
        inode = f":{image.stat().st_ino} "
        deadline = time.monotonic() + 120
        while not any("OFDLCK" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()):
            assert qemu.poll() is None, "qemu-io could not open the image"
            assert time.monotonic() < deadline, "qemu-io did not lock the image within 120 s"
            time.sleep(0.05)
        with pytest.raises(ConfigError, match="is in use"):
            VirtioBlock(UNPLUGGED, memory, str(image)).close()
    finally:
        qemu.kill()
        qemu.wait()
