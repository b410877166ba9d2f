"""The virtio PCI transport, modern interface only (virtio 1.2, section 4.1).

BAR0 (16 KiB, 32-bit memory) holds the four structures the virtio capabilities point at:
    0x0000 common configuration   0x1000 ISR status   0x2000 device configuration
    0x3000 queue notifications (4 bytes per queue: notify_off_multiplier = 4)
BAR1 (4 KiB) holds the MSI-X table (0x000) and pending-bit array (0x800).

Status, feature negotiation (VERSION_1 is required: a driver that does not accept it gets
FEATURES_OK refused) and queue set-up happen here, in the split layout or, when the transport
offers VIRTIO_F_RING_PACKED and the driver accepts it, the packed one; requests are the
device's. A broken queue puts the device into DEVICE_NEEDS_RESET with a configuration-change interrupt, and nothing more is
served until the driver resets it. The transport lock keeps a reset from racing a request.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable

from ...record import record
from ...state import decode
from ..base import InterruptLine, MsiSink
from ..msix import NO_VECTOR, MsixCapability
from ..pci import CAP_MSIX, COMMAND_INTX_DISABLE, STATUS, STATUS_INTERRUPT, Bar, BarChange, PciFunction
from . import (ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, PCI_DEVICE_ID_BASE,
               PCI_VENDOR_ID, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
               VIRTIO_RING_F_INDIRECT_DESC)
from .device import VirtioDevice, VirtioLink, Virtqueue
from .packed import PackedQueue, PackedQueueState
from .queue import SplitQueue, SplitQueueState, VirtqueueError
from .worker import VirtioWorker

BAR0_SIZE = 0x4000
COMMON_OFFSET, COMMON_LENGTH = 0x0000, 0x38
ISR_OFFSET = 0x1000
DEVICE_OFFSET, DEVICE_LENGTH = 0x2000, 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
BAR1_SIZE = 0x1000
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x000, 0x800

CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5
ISR_QUEUE, ISR_CONFIG = 1, 2

# Common configuration offsets (4.1.4.3)
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x00, 0x04, 0x08, 0x0C
CONFIG_MSIX_VECTOR, NUM_QUEUES, DEVICE_STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30

PCI_CLASS = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00}  # net, storage, comms, unclassified


def _cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after its vendor ID and next pointer (4.1.4)."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


@record(frozen=True)
class QueueSetupState:
    """What the driver wrote to configure one queue (virtio 1.2, 4.1.4.3)."""

    size: int
    msix_vector: int
    enabled: bool
    desc: int
    driver: int
    device: int


@record
class VirtioPciState:
    """Everything the guest can observe of the transport, for snapshots."""

    config: bytes
    bars: list[int]
    msix_table: bytes
    msix_pending: list[bool]
    msix_control: int
    status: int
    isr: int
    generation: int
    device_feature_select: int
    driver_feature_select: int
    driver_features: int
    queue_select: int
    config_vector: int
    broken: str | None
    setups: list[QueueSetupState]
    queues: list[SplitQueueState | PackedQueueState | None]
    device: object  # the device's own state_type, decoded by the device's transport




class QueueSetup:
    """What the driver has written for one queue, before and after it enables it."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0


@record(frozen=True)
class PciWiring:
    """What the platform gives a virtio PCI function when it is made."""

    intx: InterruptLine | None  # the line its interrupt pin is routed to (None: no INTx)
    msi: Callable[[int], MsiSink]  # the MSI-X vectors, for how many the function has
    on_bar_change: BarChange  # map (or unmap) a BAR where the guest decodes it
    on_needs_reset: Callable[[str], None]  # the device stopped until its driver resets it: why
    on_bug: Callable[[str], None]  # the device's I/O thread died of an exception: end the machine


class VirtioPciFunction(PciFunction):
    def __init__(self, make_device: Callable[[VirtioLink], VirtioDevice], wiring: PciWiring,
                 packed: bool = False) -> None:
        """`make_device(link)` builds the device this function transports, given the function itself
        as the device's link (interrupts, pausing input). `wiring.on_bug(message)`: the device's I/O
        thread died of an exception, a bug in worldswitch; the machine must end (the VMM ends it
        with status 70, as for a vCPU thread's)."""
        device = make_device(self)
        super().__init__(
            vendor=PCI_VENDOR_ID, device=PCI_DEVICE_ID_BASE + device.device_type, revision=1,
            class_code=PCI_CLASS.get(device.device_type, 0x00FF00), subsystem_vendor=PCI_VENDOR_ID,
            subsystem=0x40, interrupt_pin=1, on_bar_change=wiring.on_bar_change,
        )
        self.device = device
        if packed:  # offered; the driver chooses (QEMU's packed=on)
            device.device_features |= 1 << VIRTIO_F_RING_PACKED
        self.lock = threading.RLock()
        queues = len(device.queue_sizes)
        self.setups = [QueueSetup(size) for size in device.queue_sizes]
        vectors = queues + 1
        self.msix = MsixCapability(vectors, 1, MSIX_TABLE_OFFSET, 1, MSIX_PBA_OFFSET, wiring.msi(vectors))
        self.intx = wiring.intx
        on_bug = wiring.on_bug
        self.worker = VirtioWorker(device.name, queues, self._kicked, on_error=lambda error: on_bug(
            f"{device.name}'s I/O thread: {type(error).__name__}: {error}"))
        self.on_needs_reset = wiring.on_needs_reset
        self.status = 0
        self.isr = 0
        self.generation = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.broken: str | None = None  # why the device needs a reset

        self.add_bar(0, Bar(BAR0_SIZE, read=self.bar0_read, write=self.bar0_write))
        self.add_bar(1, Bar(BAR1_SIZE, read=self.bar1_read, write=self.bar1_write))
        self.add_capability(0x09, _cap(CFG_COMMON, 0, COMMON_OFFSET, COMMON_LENGTH))
        self.add_capability(0x09, _cap(CFG_NOTIFY, 0, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * queues,
                                       struct.pack("<I", NOTIFY_MULTIPLIER)))
        self.add_capability(0x09, _cap(CFG_ISR, 0, ISR_OFFSET, 1))
        self.add_capability(0x09, _cap(CFG_DEVICE, 0, DEVICE_OFFSET, max(len(device.config()), 1)))
        self.pci_cfg = self.add_capability(0x09, _cap(CFG_PCI, 0, 0, 0, bytes(4)),
                                           writable=bytes(2) + b"\xff" + bytes(3) + b"\xff" * 12)  # bar, offset, length, data
        self.msix_at = self.add_capability(CAP_MSIX, self.msix.capability_body(), self.msix.capability_writable())

    # --- the device's link -------------------------------------------------------------------

    def pause_input(self, fd: int, paused: bool) -> None:
        self.worker.interest(fd, not paused)

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for fd, callback in self.device.extra_fds():
            self.worker.watch(fd, self._guarded(fd, callback))
        self.worker.start()

    def close(self) -> None:
        self.worker.close()
        with self.lock:
            self.device.close()

    def _guarded(self, fd: int, callback: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self.lock:
                if self.status & DRIVER_OK and not self.broken:
                    try:
                        callback()
                    except VirtqueueError as error:
                        self._needs_reset(str(error))
                    except OSError as error:
                        self._back_end_failed(error)
                else:
                    # Input with no driver to take it waits in the back end until DRIVER_OK; the I/O
                    # thread stops watching it meanwhile instead of spinning on a readable descriptor
                    # (a tap during a whole Linux boot, with the host's first IPv6 packets).
                    self.pause_input(fd, True)
        return run

    def _back_end_failed(self, error: OSError) -> None:
        """The host refused the device's back end (a full disk under a console file, a tap that went
        away): the device stops and tells the driver, which may reset it (virtio 1.2, 2.1.2)."""
        self._needs_reset(f"its back end failed: {error.strerror or error}")

    # --- snapshots -------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return self.device.counters()

    def state(self) -> VirtioPciState:
        """Called with the machine paused and this transport's lock held by the snapshotter."""
        queues = [None if queue is None else queue.state() for queue in self.device.queues]
        return VirtioPciState(
            config=bytes(self.config), bars=[-1 if bar is None else bar.address for bar in self.bars],
            msix_table=bytes(self.msix.table), msix_pending=list(self.msix.pending), msix_control=self.msix.control,
            status=self.status, isr=self.isr, generation=self.generation,
            device_feature_select=self.device_feature_select, driver_feature_select=self.driver_feature_select,
            driver_features=self.driver_features, queue_select=self.queue_select, config_vector=self.config_vector,
            broken=self.broken,
            setups=[QueueSetupState(s.size, s.msix_vector, s.enabled, s.desc, s.driver, s.device) for s in self.setups],
            queues=queues, device=self.device.state(),
        )

    def restore(self, state: VirtioPciState) -> None:
        """Into a freshly built transport of the same device, before the machine starts."""
        if len(state.config) != len(self.config) or len(state.setups) != len(self.setups):
            raise ValueError(f"the saved {self.device.name} does not match this machine's")
        with self.lock:
            self.config[:] = state.config
            self.msix.table[:] = state.msix_table
            self.msix.pending = list(state.msix_pending)
            self.msix.control = state.msix_control
            self.status, self.isr, self.generation = state.status, state.isr, state.generation
            self.device_feature_select, self.driver_feature_select = state.device_feature_select, state.driver_feature_select
            self.driver_features = self.device.driver_features = state.driver_features
            self.queue_select, self.config_vector, self.broken = state.queue_select, state.config_vector, state.broken
            for setup, saved in zip(self.setups, state.setups):
                setup.size, setup.msix_vector, setup.enabled = saved.size, saved.msix_vector, saved.enabled
                setup.desc, setup.driver, setup.device = saved.desc, saved.driver, saved.device
            for index, (setup, queue_state) in enumerate(zip(self.setups, state.queues)):
                if setup.enabled and queue_state is not None:
                    queue = self._new_queue(setup)
                    queue.restore(queue_state)  # type: ignore[arg-type]  # each queue checks its own kind
                    self.device.queues[index] = queue
            self.device.restore(decode(self.device.state_type, state.device))
            for bar, address in zip(self.bars, state.bars):
                if bar is not None and address >= 0:
                    bar.address = address
            self._update_mappings()
            for vector in range(self.msix.vectors):
                address, data, _ = self.msix.entry(vector)
                self.msix.sink.program(vector, address, data)
            self._set_intx(bool(self.isr) and not self.msix.enabled)
        for index, setup in enumerate(self.setups):
            if setup.enabled:
                self.worker.kick(index)  # requests the guest queued before the snapshot get served

    # --- configuration space hooks (MSI-X control, the PCI configuration access capability) -----

    def capability_written(self, offset: int, size: int) -> None:
        control_at = self.msix_at + 2
        if offset <= control_at + 1 and offset + size > control_at:
            self.msix.control_written(struct.unpack_from("<H", self.config, control_at)[0])
        data_at = self.pci_cfg + 16
        if offset >= data_at and offset < data_at + 4:
            self._pci_cfg_access(write=True)

    def config_read(self, offset: int, size: int) -> int:
        if self.msix_at + 2 <= offset < self.msix_at + 4:
            struct.pack_into("<H", self.config, self.msix_at + 2, self.msix.control)
        data_at = self.pci_cfg + 16
        if data_at <= offset < data_at + 4:
            self._pci_cfg_access(write=False)
        return super().config_read(offset, size)

    def _pci_cfg_access(self, write: bool) -> None:
        """VIRTIO_PCI_CAP_PCI_CFG: a window through configuration space into the BARs (4.1.4.9)."""
        bar, offset, length = self.config[self.pci_cfg + 4], *struct.unpack_from("<II", self.config, self.pci_cfg + 8)
        data_at = self.pci_cfg + 16
        if bar not in (0, 1) or length not in (1, 2, 4):
            return
        target = self.bar0_read if bar == 0 else self.bar1_read
        if write:
            value = int.from_bytes(self.config[data_at : data_at + length], "little")
            (self.bar0_write if bar == 0 else self.bar1_write)(offset, length, value)
        else:
            self.config[data_at : data_at + length] = target(offset, length).to_bytes(length, "little")

    # --- BAR0 -----------------------------------------------------------------------------

    def bar0_read(self, offset: int, size: int) -> int:
        with self.lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
                return self._common_read(offset - COMMON_OFFSET, size)
            if offset == ISR_OFFSET:
                value, self.isr = self.isr, 0  # reading ISR acknowledges the interrupt
                self._set_intx(False)
                return value
            if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
                config = self.device.config()
                at = offset - DEVICE_OFFSET
                return int.from_bytes(config[at : at + size].ljust(size, b"\0"), "little")
            return 0

    def bar0_write(self, offset: int, size: int, value: int) -> None:
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self.setups):
            # Normally an ioeventfd takes this write in the kernel; this is the path without one.
            self.worker.kick((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
            return
        with self.lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
                self._common_write(offset - COMMON_OFFSET, size, value)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
                self.device.config_write(offset - DEVICE_OFFSET, value.to_bytes(size, "little"))

    def notify_address(self, queue: int) -> int | None:
        """Where the guest writes to kick `queue`, while BAR0 is decoded."""
        bar = self.bars[0]
        if bar is None or bar.mapped_at is None:
            return None
        return bar.mapped_at + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * queue

    # --- BAR1: MSI-X --------------------------------------------------------------------------

    def bar1_read(self, offset: int, size: int) -> int:
        if offset >= MSIX_PBA_OFFSET:
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)

    def bar1_write(self, offset: int, size: int, value: int) -> None:
        if offset < MSIX_PBA_OFFSET:
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)

    # --- common configuration -----------------------------------------------------------------

    def _selected(self) -> QueueSetup | None:
        return self.setups[self.queue_select] if self.queue_select < len(self.setups) else None

    def _common_read(self, offset: int, size: int) -> int:
        queue = self._selected()
        features = self.device.device_features
        registers = {
            DEVICE_FEATURE_SELECT: self.device_feature_select,
            DEVICE_FEATURE: (features >> (32 * self.device_feature_select)) & 0xFFFFFFFF
            if self.device_feature_select < 2 else 0,
            DRIVER_FEATURE_SELECT: self.driver_feature_select,
            DRIVER_FEATURE: (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
            if self.driver_feature_select < 2 else 0,
            CONFIG_MSIX_VECTOR: self.config_vector,
            NUM_QUEUES: len(self.setups),
            DEVICE_STATUS: self.status,
            CONFIG_GENERATION: self.generation & 0xFF,
            QUEUE_SELECT: self.queue_select,
            QUEUE_SIZE: queue.size if queue else 0,
            QUEUE_MSIX_VECTOR: queue.msix_vector if queue else NO_VECTOR,
            QUEUE_ENABLE: int(queue.enabled) if queue else 0,
            QUEUE_NOTIFY_OFF: self.queue_select if queue else 0,
            QUEUE_DESC: queue.desc if queue else 0,
            QUEUE_DRIVER: queue.driver if queue else 0,
            QUEUE_DEVICE: queue.device if queue else 0,
        }
        # Registers are read whole or, for the 64-bit addresses, in 32-bit halves.
        for base in (QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE):
            if offset == base + 4:
                return registers[base] >> 32
            if offset == base and size == 4:
                return registers[base] & 0xFFFFFFFF
        return registers.get(offset, 0) & ((1 << (8 * size)) - 1)

    def _common_write(self, offset: int, size: int, value: int) -> None:
        queue = self._selected()
        if offset == DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif offset == DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif offset == DRIVER_FEATURE and self.driver_feature_select < 2 and not self.status & FEATURES_OK:
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)
        elif offset == CONFIG_MSIX_VECTOR:
            self.config_vector = value if value < self.msix.vectors else NO_VECTOR
        elif offset == DEVICE_STATUS:
            self._status_written(value & 0xFF)
        elif offset == QUEUE_SELECT:
            self.queue_select = value
        elif queue is None or queue.enabled and offset != QUEUE_MSIX_VECTOR:
            return  # nothing selected, or a live queue: its set-up is frozen (4.1.4.3.2)
        elif offset == QUEUE_SIZE:
            # A power of two no larger than the maximum; anything else stays, and fails at enable.
            queue.size = value if 0 < value <= queue.max_size else queue.size
        elif offset == QUEUE_MSIX_VECTOR:
            queue.msix_vector = value if value < self.msix.vectors else NO_VECTOR
        elif offset == QUEUE_ENABLE and value == 1:
            self._enable_queue(self.queue_select, queue)
        else:
            for base, name in ((QUEUE_DESC, "desc"), (QUEUE_DRIVER, "driver"), (QUEUE_DEVICE, "device")):
                if base <= offset < base + 8:
                    shift = 8 * (offset - base)
                    mask = ((1 << (8 * size)) - 1) << shift
                    setattr(queue, name, (getattr(queue, name) & ~mask) | ((value << shift) & mask))

    def _status_written(self, status: int) -> None:
        if status == 0:
            self._reset()
            return
        if status & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.device.device_features
            if self.driver_features & ~offered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                status &= ~FEATURES_OK  # refused: the driver will read it back and give up (3.1.1)
            else:
                self.device.driver_features = self.driver_features
        newly_ok = status & DRIVER_OK and not self.status & DRIVER_OK
        self.status = status | (self.status & DEVICE_NEEDS_RESET)
        if newly_ok and not self.broken:
            self.device.activate()
            for fd, _ in self.device.extra_fds():
                self.pause_input(fd, False)  # what came before DRIVER_OK waited (see _guarded)
            for index in range(len(self.setups)):
                self.worker.kick(index)  # serve whatever the driver queued before DRIVER_OK

    def _new_queue(self, setup: QueueSetup) -> Virtqueue:
        layout = PackedQueue if self.device.has(VIRTIO_F_RING_PACKED) else SplitQueue
        return layout(self.device.memory, setup.size, setup.desc, setup.driver, setup.device,
                      event_idx=self.device.has(VIRTIO_RING_F_EVENT_IDX),
                      indirect=self.device.has(VIRTIO_RING_F_INDIRECT_DESC))

    def _enable_queue(self, index: int, setup: QueueSetup) -> None:
        try:
            self.device.queues[index] = self._new_queue(setup)
        except VirtqueueError as error:
            self._needs_reset(f"queue {index}: {error}")
            return
        setup.enabled = True

    def _reset(self) -> None:
        self.device.reset()
        self.status = 0
        self.isr = 0
        self.broken = None
        self.driver_features = self.device.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.device.queues = [None] * len(self.setups)
        self.setups = [QueueSetup(setup.max_size) for setup in self.setups]
        self._set_intx(False)

    def _needs_reset(self, reason: str) -> None:
        self.broken = reason
        self.device.errors += 1
        self.status |= DEVICE_NEEDS_RESET
        self.generation += 1
        self.on_needs_reset(f"{self.device.name} needs a reset: {reason}")
        self.interrupt_config()

    # --- requests ----------------------------------------------------------------------------

    def _kicked(self, index: int) -> None:
        with self.lock:
            if not self.status & DRIVER_OK or self.status & (DEVICE_NEEDS_RESET | FAILED) or self.broken:
                return
            if self.device.queues[index] is None:
                return
            try:
                self.device.process(index)
            except VirtqueueError as error:
                self._needs_reset(f"queue {index}: {error}")
            except OSError as error:
                self._back_end_failed(error)

    # --- interrupts ---------------------------------------------------------------------------

    def interrupt(self, index: int) -> None:
        """A used-buffer notification for queue `index` (the device's link)."""
        if self.msix.enabled:
            self.msix.notify(self.setups[index].msix_vector)
        else:
            self.isr |= ISR_QUEUE
            self._set_intx(True)

    def interrupt_config(self) -> None:
        if self.msix.enabled:
            self.msix.notify(self.config_vector)
        else:
            self.isr |= ISR_CONFIG
            self._set_intx(True)

    def _set_intx(self, level: bool) -> None:
        status = struct.unpack_from("<H", self.config, STATUS)[0]
        status = status | STATUS_INTERRUPT if level else status & ~STATUS_INTERRUPT
        struct.pack_into("<H", self.config, STATUS, status)
        if self.intx is not None:
            self.intx.set_level(level and not self.command & COMMAND_INTX_DISABLE)

    @property
    def negotiated(self) -> bool:
        return bool(self.status & FEATURES_OK)

    def device_status_names(self) -> list[str]:
        names = {ACKNOWLEDGE: "ACKNOWLEDGE", DRIVER: "DRIVER", FEATURES_OK: "FEATURES_OK", DRIVER_OK: "DRIVER_OK",
                 DEVICE_NEEDS_RESET: "NEEDS_RESET", FAILED: "FAILED"}
        return [name for bit, name in names.items() if self.status & bit]
