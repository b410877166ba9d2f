"""Coalesced port writes: the serial console's bytes without a world switch each.

A Linux console prints a byte as two port accesses, a read of the UART's line status and a write
of its transmit register (THR), each an exit: a boot's console was 37,854 of its 37,877 world
switches under the monitor (docs/monitor.md). A read needs its answer at once; a write to THR does
not, while nothing but the VMX can see that it happened. KVM then queues it in the coalesced ring
(KVM_CAP_COALESCED_PIO) and the guest goes on; the VMX applies the queued writes, in order, before
it handles any exit (everything the guest could see the write by is an exit, and every exit sees
the ring emptied first) and from a thread of its own every DRAIN_PERIOD_S, for a guest that
writes and then waits with nothing exiting.

A THR write is seen by other means where it raises the interrupt line: with the THR-empty
interrupt enabled, or looped back with a receive interrupt enabled. The UART says when that
becomes possible (ThrCoalescing.thr_may_interrupt) and its writes exit again from then on, for the
rest of the machine's life: taking the port out of the ring costs KVM an SRCU grace period (5 to 8
ms here, 2026-12-04), more than the exits a register round trip would save; putting it back costs
25 us. So the console is coalesced while the kernel alone writes to it, which it does with both
interrupts off, and not once a tty driver drives the port with interrupts.
"""

from __future__ import annotations

import threading
from typing import Callable

from ...driver.kvm import CoalescedRing, Vm
from ...sandbox import confine_thread
from .bus import MmioBus, PioBus

DRAIN_PERIOD_S = 0.01  # the longest a queued byte waits for a guest that does not exit


class ThrCoalescing:
    """The port KVM queues writes to (THR, one byte) while the UART says a write there cannot raise
    its interrupt line; registered when made, taken out for good the first time it can."""

    def __init__(self, vm: Vm, port: int) -> None:
        self.vm = vm
        self.port = port
        vm.register_coalesced_pio(port, 1)
        self.active = True

    def thr_may_interrupt(self, may: bool) -> None:
        """The UART's report, made at every change and on restore (its lock held: reports arrive in
        the order of the changes)."""
        if may and self.active:
            self.vm.unregister_coalesced_pio(self.port, 1)
            self.active = False


class CoalescedDrain:
    """Applies the ring's writes to the buses they were made on: `drain()` before each exit the
    runners handle (they compare the ring's `first` and `last` themselves, the cost of an exit
    that finds it empty), and a thread's drain every DRAIN_PERIOD_S while the port is coalesced."""

    def __init__(self, ring: CoalescedRing, pio: PioBus, mmio: MmioBus, coalescing: ThrCoalescing,
                 fail: Callable[[str], None]) -> None:
        """`fail`: how the thread ends the machine when a write fails (the console's back end)."""
        self.ring = ring
        self.pio = pio
        self.mmio = mmio
        self.coalescing = coalescing
        self.fail = fail
        self.writes = 0
        self.drains = 0
        self._lock = threading.Lock()  # one drain at a time: the ring has one reader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drain(self) -> None:
        with self._lock:
            taken = self.ring.take()
            for address, length, pio, value in taken:
                (self.pio if pio else self.mmio).write(address, length, value)
            if taken:
                self.writes += len(taken)
                self.drains += 1

    def counters(self) -> dict[str, int]:
        """For --stats: the writes that made no world switch, and the drains that applied them."""
        return {"writes": self.writes, "drains": self.drains}

    # --- the thread (a machine's service) ----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._drain_meanwhile, name="coalesced-drain", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the vCPUs have stopped: what is still queued, then the ring's views go."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._thread is None or not self._thread.is_alive():
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - the machine has ended: a failing console has nothing left to stop
                pass
            self.ring.release()

    def _drain_meanwhile(self) -> None:
        try:
            while not self._stop.wait(DRAIN_PERIOD_S):
                if self.ring.first.value != self.ring.last.value:
                    confine_thread()  # the guest's writes are handled here: no path calls once sandboxed
                    self.drain()
                elif not self.coalescing.active:
                    return  # nothing queued and nothing will be: the exits drain what is left
        except Exception as error:  # noqa: BLE001 - a failed write ends the machine, as on a vCPU thread
            self.fail(f"coalesced port writes: {type(error).__name__}: {error}")
