"""Outcome: how one VM ends, decided once, and what its guest reported on the way.

Everything that can end a VM reports here: the devices a guest ends itself with (debug-exit, ACPI
power-off, the reset ports, the ucall port), the vCPU runners (a fault, an error), the PCI platform
(a device bug) and the VMX (stop, timeout). It exists before any of them, so each gets it when it is
made; the Vmm and the VMX listen to it."""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..devices.ucall import Ucall, UcallCommand
from .result import MachineResult, StopReason


class Outcome:
    def __init__(self) -> None:
        self._result: MachineResult | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._listeners: list[Callable[[MachineResult], None]] = []
        self._ucall_listeners: list[Callable[[Ucall], None]] = []
        self.ended_ns = 0  # perf_counter_ns when the result was decided
        self.ucalls: list[Ucall] = []  # SYNC and PRINT calls, in arrival order

    def listen(self, listener: Callable[[MachineResult], None]) -> None:
        """Call `listener` with the result once it is decided, before wait() returns."""
        self._listeners.append(listener)

    def listen_to_ucalls(self, listener: Callable[[Ucall], None]) -> None:
        """Call `listener` with every ucall as it arrives (on the vCPU's thread)."""
        self._ucall_listeners.append(listener)

    def request(self, result: MachineResult) -> None:
        """End the VM with `result`. The first request wins; later ones are ignored, so a vCPU that
        faults while another one powers off cannot rewrite history. Safe from any thread."""
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            self.ended_ns = time.perf_counter_ns()
        try:
            for listener in self._listeners:
                listener(result)
        finally:
            self._done.set()

    @property
    def result(self) -> MachineResult | None:
        return self._result

    @property
    def decided(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> MachineResult | None:
        self._done.wait(timeout)
        return self._result if self._done.is_set() else None

    # --- what the guest reports ------------------------------------------------------------

    def ucall(self, call: Ucall) -> None:
        if call.command == UcallCommand.DONE:
            message = f"guest finished: DONE {', '.join(str(a) for a in call.args)}"
            self.request(MachineResult.of(StopReason.GUEST_DONE, message, call.args[0], ucall=call))
        elif call.command == UcallCommand.ABORT:
            self.request(MachineResult.of(StopReason.GUEST_ABORT, call.describe(), call.args[0], ucall=call))
        else:
            self.ucalls.append(call)
        for listener in self._ucall_listeners:
            listener(call)

    def guest_exit(self, value: int) -> None:
        self.request(MachineResult.of(StopReason.GUEST_EXIT, f"guest exited with status {value}", value))

    def guest_power_off(self) -> None:
        self.request(MachineResult.of(StopReason.POWER_OFF, "guest powered off (ACPI S5)"))

    def guest_reset(self) -> None:
        self.request(MachineResult.of(StopReason.RESET, "guest requested a reset"))
