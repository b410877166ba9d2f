"""Vmm: the monitor of one virtual machine: its KVM objects, its platform (guest memory, buses,
devices), its vCPU runners and its Outcome (how it ended). vmm/builder.py makes every part and then
the Vmm, whole; the VMX (vmx/api.py's Machine, the one class of that name) drives it."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, runtime_checkable

from ..devices.serial import Serial
from ..driver import structs as s
from ..driver.kvm import Kvm, Vm
from ..errors import KvmError
from ..memory.guest import GuestMemory
from ..memory.layout import MemoryMap
from ..record import field, record
from .config import MachineConfig
from .host import HostKind
from .outcome import Outcome
from .platform.bus import MmioBus, PioBus
from .platform.coalesced import CoalescedDrain, ThrCoalescing
from .platform.pci_platform import PciPlatform
from .result import MachineResult, StopReason
from .runloop import VcpuRunner
from .stats import MachineStats
from .x86.cpu_state import software_exception_in_flight

if TYPE_CHECKING:  # parts only some machines have; the builder imports them for those (start-up time)
    from ..boot.linux import LinuxBoot
    from ..boot.monitor import MonitorPlacement
    from .trace import TraceWriter

JOIN_TIMEOUT_S = 5.0
SETTLE_ROUNDS = 20  # runs of the guest before a snapshot gives up waiting for an int3 to be delivered
SETTLE_RUN_S = 0.001  # the first run; each next one is longer by as much


@runtime_checkable
class Counted(Protocol):
    """A device that counts what it does (serial, every virtio device)."""

    def counters(self) -> dict[str, int]: ...


class Owned(Protocol):
    """A host resource the machine closes when it ends (the CD-ROM's image)."""

    def close(self) -> None: ...


class Service(Owned, Protocol):
    """A part with a thread of its own, started with the machine and closed with it (the RTC's
    periodic interrupt)."""

    def start(self) -> None: ...


@record(frozen=True)
class StateBinding:
    """How a snapshot saves and restores one part: its state() and restore(state), and the state's type."""
    save: Callable[[], object]
    load: Callable[[Any], None]
    kind: type


@record(frozen=True)
class Parts:
    """What one step of the builder made: devices by name, the state of those a snapshot saves, the
    services among them and the host resources they hold. Steps' parts add up (a name is used once)."""
    devices: dict[str, object] = field(default_factory=dict)
    states: dict[str, StateBinding] = field(default_factory=dict)
    services: tuple[Service, ...] = ()
    owned: tuple[Owned, ...] = ()

    def __add__(self, other: "Parts") -> "Parts":
        twice = (self.devices.keys() & other.devices.keys()) | (self.states.keys() & other.states.keys())
        if twice:
            raise ValueError(f"two parts named {', '.join(sorted(twice))}")
        return Parts({**self.devices, **other.devices}, {**self.states, **other.states},
                     self.services + other.services, self.owned + other.owned)

    def close(self) -> None:
        for part in (*self.services, *self.owned):
            part.close()


@record(frozen=True)
class Platform:
    """The machine without its vCPUs: memory, the buses, and what is attached to them."""
    memory_map: MemoryMap
    memory: GuestMemory
    pio: PioBus
    mmio: MmioBus
    pci: PciPlatform | None
    parts: Parts
    serial: Serial  # also in parts: the console the VMX attaches to
    coalescing: ThrCoalescing | None  # where KVM queues the serial's THR writes (the host has coalesced port I/O)


class Vmm:
    def __init__(self, kvm: Kvm, vm: Vm, platform: Platform, runners: list[VcpuRunner], outcome: Outcome,
                 boot: LinuxBoot | None, monitor: MonitorPlacement | None,
                 trace: TraceWriter | None, config: MachineConfig, host: HostKind, warn: Callable[[str], None],
                 coalesced: CoalescedDrain | None) -> None:
        """`boot`: when the machine boots Linux; `monitor`: where the in-guest monitor is, if the
        program runs under it; `trace`: where every world switch is recorded, if it is (the runners
        hold its buffers); `coalesced`: the drain of port writes KVM queued, if the host queues them
        (the runners drain at their exits)."""
        self.kvm = kvm
        self.vm = vm
        self.memory_map = platform.memory_map
        self.memory = platform.memory
        self.pio = platform.pio
        self.mmio = platform.mmio
        self.pci = platform.pci
        self.parts = platform.parts
        self.serial = platform.serial
        self.runners = runners
        self.outcome = outcome
        self.boot = boot
        self.monitor = monitor
        self.trace_writer = trace
        self.host = host
        self.warn = warn
        self.config = config  # with absolute paths, kept for snapshots
        self.coalesced = coalesced
        self._started_ns = 0
        self._closed = False
        self._paused_clock: s.kvm_clock_data | None = None
        self._paused = False
        outcome.listen(self._stop_runners)

    # --- life cycle ------------------------------------------------------------------------

    def _finish_trace(self) -> None:
        writer, self.trace_writer = self.trace_writer, None
        if writer is None:
            return
        stats = self.stats()
        result = self.outcome.result
        writer.close({
            "devices": [
                {"bus": bus_name, "name": r.name, "base": r.base, "length": r.length}
                for bus_name, bus in (("port", self.pio), ("mmio", self.mmio)) for r in bus.ranges
            ],
            "stats": stats.as_dict(),
            "result": None if result is None else {"reason": result.reason.value, "message": result.message},
        })

    def start(self) -> None:
        if self._started_ns:
            raise RuntimeError("machine already started")
        self._started_ns = time.perf_counter_ns()
        if self.pci is not None:
            self.pci.start()  # device I/O threads first: a guest may kick a queue at once
        for service in self.parts.services:
            service.start()
        if self.coalesced is not None:
            self.coalesced.start()
        for runner in self.runners:
            runner.start()

    @property
    def started(self) -> bool:
        return bool(self._started_ns)

    @property
    def devices(self) -> dict[str, object]:
        return self.parts.devices

    @property
    def running(self) -> bool:
        return bool(self._started_ns) and not self.outcome.decided

    @property
    def result(self) -> MachineResult | None:
        return self.outcome.result

    def request_exit(self, result: MachineResult) -> None:
        """End the machine with `result` (Outcome.request: the first request wins)."""
        self.outcome.request(result)

    def _stop_runners(self, _result: MachineResult) -> None:
        for runner in self.runners:
            runner.stop()

    def wait(self, timeout: float | None = None) -> MachineResult | None:
        """Block until the machine ends (its result) or `timeout` seconds pass (None)."""
        result = self.outcome.wait(timeout)
        if result is not None:
            for runner in self.runners:
                runner.join(JOIN_TIMEOUT_S)
        return result

    def stop(self, reason: StopReason = StopReason.STOPPED, message: str = "stopped") -> MachineResult:
        self.request_exit(MachineResult.of(reason, message))
        for runner in self.runners:
            runner.join(JOIN_TIMEOUT_S)
        result = self.outcome.result
        assert result is not None
        return result

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def paused_clock(self) -> int | None:
        """The guest's kvmclock when it was paused: guest time stands still until resume."""
        return self._paused_clock.clock if self._paused_clock is not None else None

    def pause(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Bring every vCPU back to the VMX and park it there (the hosted interrupt path). Guest
        time stands still while paused: the kvmclock is saved here and set back on resume."""
        if self._paused:
            return
        for runner in self.runners:
            runner.pause()
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            while not runner.parked.wait(0.05):
                if runner.finished.is_set():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vCPU {runner.index} did not come back to the VMX within {timeout} s")
                runner.kick()  # a kick is idempotent: repeat it in case the vCPU was between states
        self._paused = True
        self._paused_clock = self.vm.get_clock()

    def resume(self) -> None:
        if self._paused and self._paused_clock is not None:
            self.vm.set_clock(s.kvm_clock_data(clock=self._paused_clock.clock))
            for runner in self.runners:
                try:
                    runner.vcpu.kvmclock_ctrl()  # tell the guest it was stopped: its watchdogs forgive the gap
                except KvmError:
                    pass  # EINVAL: the guest does not use kvmclock
        self._paused = False
        self._paused_clock = None
        for runner in self.runners:
            runner.resume()

    # --- snapshots -----------------------------------------------------------------------------

    def device_states(self) -> dict[str, object]:
        return {name: binding.save() for name, binding in self.parts.states.items()}

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Paused, with no device request half served, for as long as the caller copies state; a
        machine that was running runs again afterwards."""
        was_running = self.running and not self._paused
        self.pause()
        self._settle()
        locks = [f.lock for f in (self.pci.functions if self.pci is not None else []) if hasattr(f, "worker")]
        for lock in locks:
            lock.acquire()  # no request is half served while its queue indices are copied
        try:
            yield
        finally:
            for lock in locks:
                lock.release()
            if was_running:
                self.resume()

    def _settle(self) -> None:
        """Where a state round trip can lose an int3 the guest executed but was not delivered yet
        (PVM: docs/pvm.md, section 8), let a vCPU that may hold one run on for a moment, so that
        the breakpoint is delivered before its state is saved (a machine the user paused too: it runs
        for milliseconds, its clock held). Rarely needed: it takes a pause at the instant between
        the two, or one just after the guest's own return past an int3."""
        if not self.host.kernel_code_emulated or not self.running:
            return

        def may_hold_one() -> bool:
            return any(software_exception_in_flight(runner.vcpu, self.memory) for runner in self.runners
                       if not runner.finished.is_set())

        for round_ in range(SETTLE_ROUNDS):
            if not may_hold_one():
                return
            self.resume()
            time.sleep(SETTLE_RUN_S * (round_ + 1))
            self.pause()
        if may_hold_one():
            self.warn("the guest's int3 just before this snapshot may be lost: this host's KVM does not show "
                      "whether it was delivered (docs/pvm.md, section 8)")

    def close(self) -> None:
        if self._closed:
            return
        if self.running:
            self.stop(StopReason.STOPPED, "machine closed")
        for runner in self.runners:
            runner.join(JOIN_TIMEOUT_S)
        if self.coalesced is not None:
            self.coalesced.close()  # the vCPUs have stopped: what they queued last reaches the console
        self._finish_trace()
        if self.pci is not None:
            self.pci.close()  # after the vCPUs: no request arrives any more; disks are synced
        self.parts.close()
        self._closed = True
        for runner in self.runners:
            if not runner.finished.is_set() and runner.thread is not None:
                continue  # a vCPU thread that will not stop keeps its fd; the process exit cleans up
            runner.release()
            runner.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.memory.close()

    def __enter__(self) -> "Vmm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- numbers ---------------------------------------------------------------------------

    def stats(self) -> MachineStats:
        ended_ns = self.outcome.ended_ns
        end = ended_ns or time.perf_counter_ns()
        if ended_ns and all(runner.finished_ns for runner in self.runners):
            # a vCPU accounts the exit that ended the machine until it leaves its loop
            end = max(end, *(runner.finished_ns for runner in self.runners))
        wall = end - self._started_ns if self._started_ns else 0
        return MachineStats(
            vcpus=[runner.stats() for runner in self.runners],
            wall_ns=wall,
            unmapped_mmio=self.mmio.unmapped.count,
            unmapped_pio=self.pio.unmapped.count,
            devices={name: device.counters() for name, device in self.devices.items() if isinstance(device, Counted)},
            vmx_resident_kib=process_resident_kib(),
            guest_resident_kib=self.memory.resident_bytes() // 1024 if not self._closed else 0,
            monitor=self.monitor.counters(self.memory) if self.monitor is not None and not self._closed else {},
            coalesced=self.coalesced.counters() if self.coalesced is not None else {},
        )


def process_resident_kib() -> int:
    """VmRSS of this process."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
