"""KVM's GSI routing table and the irqfds bound to it.

KVM_SET_GSI_ROUTING replaces the whole table, so this module keeps all of it: the default routes of
the in-kernel irqchip (GSI 0-15 to the PIC and to the IOAPIC pin of the same number, 16-23 to the
IOAPIC only; what KVM sets up by itself), plus one MSI route per MSI-X vector a device uses. Each
MSI route has an eventfd registered with KVM_IRQFD: a device's I/O thread raises the interrupt with
one eventfd_write, and KVM injects the message without an ioctl and without a vCPU exit.
"""

from __future__ import annotations

import os
import threading

from ...driver import structs as s
from ...driver.constants import (KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC,
                                 KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQFD_FLAG_DEASSIGN)
from ...driver.kvm import Vm

IOAPIC_PINS = 24
MSI_ADDRESS_BASE = 0xFEE00000
MSI_ADDRESS_MASK = 0xFFF00000


def default_routes() -> list[s.kvm_irq_routing_entry]:
    entries = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 16:
            chip, pin = (KVM_IRQCHIP_PIC_MASTER, gsi) if gsi < 8 else (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            entry = s.kvm_irq_routing_entry(gsi=gsi, type=KVM_IRQ_ROUTING_IRQCHIP)
            entry.u.irqchip = s.kvm_irq_routing_irqchip(chip, pin)
            entries.append(entry)
        entry = s.kvm_irq_routing_entry(gsi=gsi, type=KVM_IRQ_ROUTING_IRQCHIP)
        entry.u.irqchip = s.kvm_irq_routing_irqchip(KVM_IRQCHIP_IOAPIC, gsi)
        entries.append(entry)
    return entries


class MsiRoute:
    """One GSI, routed to whatever message the guest programmed, raised through its irqfd."""

    def __init__(self, router: "GsiRouter", gsi: int) -> None:
        self.router = router
        self.gsi = gsi
        self.address = 0
        self.data = 0
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.raised = 0
        self.dropped = 0  # raised while the guest had not programmed a valid message

    @property
    def valid(self) -> bool:
        return self.address & MSI_ADDRESS_MASK == MSI_ADDRESS_BASE

    def program(self, address: int, data: int) -> None:
        if (address, data) != (self.address, self.data):
            self.address, self.data = address, data
            self.router.commit()

    def raise_(self) -> None:
        if not self.valid:
            self.dropped += 1  # a message to nowhere: the guest never set this vector up
            return
        self.raised += 1
        os.eventfd_write(self.eventfd, 1)


class MsiVectors:
    """One function's MSI-X vectors, each its own MsiRoute: the MsiSink its capability is given."""

    def __init__(self, routes: list[MsiRoute]) -> None:
        self.routes = routes

    def program(self, vector: int, address: int, data: int) -> None:
        self.routes[vector].program(address, data)

    def deliver(self, vector: int, address: int, data: int) -> None:
        self.routes[vector].raise_()


class GsiRouter:
    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.routes: list[MsiRoute] = []
        self._next_gsi = IOAPIC_PINS
        self._lock = threading.Lock()

    def msi_route(self) -> MsiRoute:
        with self._lock:
            route = MsiRoute(self, self._next_gsi)
            self._next_gsi += 1
            self.routes.append(route)
        self.commit()
        self.vm.irqfd(route.eventfd, route.gsi)
        return route

    def msi_vectors(self, count: int) -> MsiVectors:
        """`count` MSI-X vectors for one function, a route each."""
        return MsiVectors([self.msi_route() for _ in range(count)])

    def commit(self) -> None:
        """Hand KVM the whole table: defaults, then every MSI route with a valid message."""
        with self._lock:
            entries = default_routes()
            for route in self.routes:
                if route.valid:
                    entry = s.kvm_irq_routing_entry(gsi=route.gsi, type=KVM_IRQ_ROUTING_MSI)
                    entry.u.msi = s.kvm_irq_routing_msi(route.address & 0xFFFFFFFF, route.address >> 32, route.data, 0)
                    entries.append(entry)
            self.vm.set_gsi_routing(entries)

    def close(self) -> None:
        for route in self.routes:
            try:
                self.vm.irqfd(route.eventfd, route.gsi, KVM_IRQFD_FLAG_DEASSIGN)
            except Exception:  # noqa: BLE001 - the VM may already be gone; the fd goes either way
                pass
            os.close(route.eventfd)
        self.routes = []
