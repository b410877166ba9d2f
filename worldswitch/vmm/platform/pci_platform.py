"""Wiring PCI into the machine: the host bridge's two configuration mechanisms on the buses, BARs
placed in the PCI window (the firmware's job) and kept mapped where the guest moves them, INTx
lines, MSI-X routes with irqfds, and ioeventfds on every virtio notify address so that a queue
kick never leaves the kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from ...devices.pci import (COMMAND, COMMAND_MEMORY, CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, INTERRUPT_LINE,
                            INTERRUPT_PIN, RESET_CONTROL_OFFSET, Bar, HostBridge, PciBus, PciFunction)
from ...driver.constants import KVM_IOEVENTFD_FLAG_DEASSIGN, Cap
from ...driver.kvm import Vm
from ...errors import BusError, ConfigError
from ...memory.layout import ECAM_BASE, ECAM_SIZE, PCI_MMIO_END, PCI_MMIO_START
from .bus import BusRange, MmioBus, PioBus, ReadFn, WriteFn, all_ones
from .irq import KvmIrqLine
from .irqroute import GsiRouter

if TYPE_CHECKING:  # add_virtio imports them: a machine without virtio devices never loads them
    from ...devices.virtio.device import VirtioDevice, VirtioLink
    from ...devices.virtio.pci import VirtioPciFunction

FIRST_INTX_GSI = 16


class PciPlatform:
    """`reset` is the chipset's reset control register (a byte at 0xcf9, inside the host bridge's
    0xcf8-0xcfb), as (read, write) taking offsets from 0xcf9."""

    def __init__(self, vm: Vm, pio: PioBus, mmio: MmioBus, reset: tuple[ReadFn, WriteFn],
                 on_bug: Callable[[str], None], warn: Callable[[str], None] | None = None,
                 chipset: Sequence[PciFunction] = ()) -> None:
        """`chipset`: the host bridge and its companions, from slot 0 on (a generic PCIe host bridge
        when empty)."""
        self.vm = vm
        self.on_bug = on_bug  # a device thread died: end the machine (status 70)
        self.pio = pio
        self.mmio = mmio
        self.warn = warn or (lambda text: None)
        reset_read, reset_write = reset
        self.bus = PciBus(
            lambda offset, size: reset_read(0, 1) if (offset, size) == (RESET_CONTROL_OFFSET, 1) else all_ones(size),
            lambda offset, size, value: reset_write(0, 1, value) if (offset, size) == (RESET_CONTROL_OFFSET, 1) else None,
        )
        self.router = GsiRouter(vm)
        self.functions: list[PciFunction] = []
        self._virtio: dict[int, VirtioPciFunction] = {}  # by id(): the functions add_virtio made
        self._mapped: dict[tuple[int, int], BusRange] = {}
        self._ioeventfds: dict[int, list[tuple[int, int]]] = {}
        self._next_mmio = PCI_MMIO_START
        self._any_length = bool(vm.check_extension(Cap.IOEVENTFD_ANY_LENGTH))
        pio.register("PCI CONFIG_ADDRESS and reset control", CONFIG_ADDRESS_PORT, 4, self.bus.address_read,
                     self.bus.address_write)
        pio.register("PCI CONFIG_DATA", CONFIG_DATA_PORT, 4, self.bus.data_read, self.bus.data_write)
        # PCIe configuration requests are at most a dword: wider accesses arrive split (PCIe 4.0, 7.2.2)
        mmio.register("PCIe ECAM", ECAM_BASE, ECAM_SIZE, self.bus.ecam_read, self.bus.ecam_write, max_size=4)
        for slot, function in enumerate(chipset or [HostBridge()]):
            self.add(function, slot)

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        slot = self.bus.add(function, slot)
        self.functions.append(function)
        pin = function.config_read(INTERRUPT_PIN, 1)
        if pin:
            function.config[INTERRUPT_LINE] = self._intx_gsi(slot, pin)  # what firmware writes for the OS
        # Firmware's job: give every BAR an address in the window and turn decoding on.
        for index, bar in enumerate(function.bars):
            if bar is None or bar.io:
                continue
            address = -(-self._next_mmio // bar.size) * bar.size
            if address + bar.size > PCI_MMIO_END:
                raise ConfigError("the PCI window is full: too many devices")
            self._next_mmio = address + bar.size
            bar.address = address
        function.config_write(COMMAND, 2, function.command | COMMAND_MEMORY)
        return slot

    def add_virtio(self, make_device: Callable[[VirtioLink], VirtioDevice], packed: bool = False) -> VirtioPciFunction:
        """A virtio device on the next free slot, wired to its INTx line (pin A), MSI-X routes and
        this platform's BAR mapping."""
        from ...devices.virtio.pci import PciWiring, VirtioPciFunction

        slot = self.bus.free_slot()
        wiring = PciWiring(intx=KvmIrqLine(self.vm, self._intx_gsi(slot, 1)), msi=self.router.msi_vectors,
                           on_bar_change=self._bar_moved, on_needs_reset=self.warn, on_bug=self.on_bug)
        function = VirtioPciFunction(make_device, wiring, packed=packed)
        self._virtio[id(function)] = function
        self.add(function, slot)
        return function

    @staticmethod
    def _intx_gsi(slot: int, pin: int) -> int:
        return FIRST_INTX_GSI + (slot + pin - 1) % 4  # the swizzle the DSDT's _PRT describes

    def _bar_moved(self, function: PciFunction, index: int, bar: Bar, old: int | None, new: int | None) -> None:
        key = (id(function), index)
        if key in self._mapped:
            self.mmio.unregister(self._mapped.pop(key))
        virtio = self._virtio.get(id(function))
        if virtio is not None and index == 0:
            self._unbind_notifications(virtio)
        if new is None or bar.io or bar.read is None or bar.write is None:
            return
        try:
            self._mapped[key] = self.mmio.register(f"{type(function).__name__} BAR{index}", new, bar.size, bar.read, bar.write)
        except BusError as error:
            # A guest may program a BAR over RAM or another device; the real thing would decode
            # garbage. Here the BAR stays unmapped and the user hears about it.
            self.warn(f"guest placed a PCI BAR where it cannot go ({error}); left unmapped")
            bar.mapped_at = None
            return
        if virtio is not None and index == 0:
            self._bind_notifications(virtio)

    def _bind_notifications(self, function: VirtioPciFunction) -> None:
        bound = []
        for queue, fd in enumerate(function.worker.kick_fds):
            address = function.notify_address(queue)
            if address is None:
                continue
            # Length 0 ("any") where KVM has it: the guest may kick with a 16- or 32-bit write.
            length = 0 if self._any_length else 2
            self.vm.ioeventfd(fd, address, length)
            bound.append((fd, address))
        self._ioeventfds[id(function)] = bound

    def _unbind_notifications(self, function: VirtioPciFunction) -> None:
        length = 0 if self._any_length else 2
        for fd, address in self._ioeventfds.pop(id(function), []):
            self.vm.ioeventfd(fd, address, length, KVM_IOEVENTFD_FLAG_DEASSIGN)

    def start(self) -> None:
        for function in self._virtio.values():
            function.start()

    def close(self) -> None:
        for function in self._virtio.values():
            function.close()
        self.router.close()
