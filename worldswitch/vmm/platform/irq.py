"""Interrupt lines the VMM hands to devices (worldswitch.devices.base.InterruptLine): a device only
ever calls `set_level(bool)`; here that becomes KVM_IRQ_LINE on the in-kernel PIC and IOAPIC."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...driver.kvm import Vm


class KvmIrqLine:
    """A GSI of the in-kernel irqchip (ISA IRQs 0-15 reach both the PIC and the IOAPIC)."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self.level = False
        self.raised = 0  # rising edges, for statistics
        self._lock = threading.Lock()

    def set_level(self, asserted: bool) -> None:
        with self._lock:
            if asserted == self.level:
                return  # the line is already there: no ioctl
            self.level = asserted
            if asserted:
                self.raised += 1
            self.vm.irq_line(self.gsi, 1 if asserted else 0)
