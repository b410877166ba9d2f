"""Vmm: the monitor of one virtual machine: its KVM objects, guest memory, buses, devices and vCPU
runners, and the single place that decides how the VM ended. vmm/builder.py assembles it; the VMX
(vmx/api.py's Machine, the one class of that name) drives it."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator, Protocol, runtime_checkable

from ..boot.linux import LinuxBoot
from ..devices.ucall import Ucall, UcallCommand
from ..driver import structs as s
from ..driver.kvm import Kvm, Vm
from ..errors import KvmError
from ..memory.guest import GuestMemory
from ..memory.layout import MemoryMap
from .config import MachineConfig
from .host import HostKind
from .platform.bus import MmioBus, PioBus
from .platform.pci_platform import PciPlatform
from .result import MachineResult, StopReason
from .runloop import VcpuRunner
from .stats import MachineStats
from .trace import DEFAULT_LIMIT as DEFAULT_TRACE_LIMIT
from .trace import TraceWriter
from .x86.cpuid import HiddenFeature

JOIN_TIMEOUT_S = 5.0


@runtime_checkable
class Counted(Protocol):
    """A device that counts what it does (serial, every virtio device)."""

    def counters(self) -> dict[str, int]: ...


class Service(Protocol):
    """A device with a thread of its own, started with the machine and stopped with it."""

    def start(self) -> None: ...

    def close(self) -> None: ...


class Vmm:
    def __init__(self, kvm: Kvm, vm: Vm, memory_map: MemoryMap, memory: GuestMemory, pio: PioBus, mmio: MmioBus,
                 config: MachineConfig, host: HostKind, warn: Callable[[str], None]) -> None:
        self.kvm = kvm
        self.vm = vm
        self.memory_map = memory_map
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.runners: list[VcpuRunner] = []
        self.devices: dict[str, object] = {}
        self.ucalls: list[Ucall] = []  # SYNC and PRINT calls, in arrival order
        self.on_ucall: Callable[[Ucall], None] | None = None
        self.on_exit: list[Callable[[MachineResult], None]] = []
        self._result: MachineResult | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._started_ns = 0
        self._ended_ns = 0
        self._closed = False
        self.trace_writer: TraceWriter | None = None  # while recording
        self.host = host
        self.boot: LinuxBoot | None = None  # when the machine boots Linux
        self.forced_cpuid: list[HiddenFeature] = []  # what the host would not let us hide
        self.pci: PciPlatform | None = None
        self.services: list[Service] = []  # devices with threads of their own (the RTC's periodic interrupt)
        self.warn = warn
        self.config = config  # with absolute paths, kept for snapshots
        self.stateful: dict[str, tuple[Callable[[], object], Callable[[object], None], type]] = {}
        self._paused_clock: s.kvm_clock_data | None = None
        self._paused = False

    # --- life cycle ------------------------------------------------------------------------

    def enable_trace(self, path: str, limit: int = DEFAULT_TRACE_LIMIT) -> None:
        """Record every world switch of every vCPU to `path` (see trace.py). Before start()."""
        if self._started_ns:
            raise RuntimeError("tracing must be enabled before the machine starts")
        self.trace_writer = TraceWriter(path, len(self.runners), limit, self.warn)
        for runner in self.runners:
            runner.trace = self.trace_writer.buffer_for(runner.index)

    def _finish_trace(self) -> None:
        writer, self.trace_writer = self.trace_writer, None
        if writer is None:
            return
        stats = self.stats()
        result = self._result
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
        for service in self.services:
            service.start()
        for runner in self.runners:
            runner.start()

    @property
    def started(self) -> bool:
        return bool(self._started_ns)

    @property
    def running(self) -> bool:
        return bool(self._started_ns) and not self._done.is_set()

    @property
    def result(self) -> MachineResult | None:
        return self._result

    def request_exit(self, result: MachineResult) -> None:
        """End the machine with `result`. The first request wins; later ones are ignored, so a
        vCPU that faults while another one powers off cannot rewrite history."""
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            self._ended_ns = time.perf_counter_ns()
        for runner in self.runners:
            runner.stop()
        self._done.set()
        for callback in self.on_exit:
            callback(result)

    def wait(self, timeout: float | None = None) -> MachineResult | None:
        """Block until the machine ends (its result) or `timeout` seconds pass (None)."""
        self._done.wait(timeout)
        if self._result is not None:
            for runner in self.runners:
                runner.join(JOIN_TIMEOUT_S)
        return self._result

    def stop(self, reason: StopReason = StopReason.STOPPED, message: str = "stopped") -> MachineResult:
        self.request_exit(MachineResult.of(reason, message))
        for runner in self.runners:
            runner.join(JOIN_TIMEOUT_S)
        assert self._result is not None
        return self._result

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

    def register_state(self, name: str, save: Callable[[], object], load: Callable[[object], None], kind: type) -> None:
        self.stateful[name] = (save, load, kind)

    def device_states(self) -> dict[str, object]:
        return {name: save() for name, (save, _load, _kind) in self.stateful.items()}

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Paused, with no device request half served, for as long as the caller copies state; a
        machine that was running runs again afterwards."""
        was_running = self.running and not self._paused
        self.pause()
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

    def close(self) -> None:
        if self._closed:
            return
        if self.running:
            self.stop(StopReason.STOPPED, "machine closed")
        for runner in self.runners:
            runner.join(JOIN_TIMEOUT_S)
        self._finish_trace()
        if self.pci is not None:
            self.pci.close()  # after the vCPUs: no request arrives any more; disks are synced
        for service in self.services:
            service.close()
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

    # --- guest reports ---------------------------------------------------------------------

    def handle_ucall(self, call: Ucall) -> None:
        if call.command == UcallCommand.DONE:
            message = f"guest finished: DONE {', '.join(str(a) for a in call.args)}"
            self.request_exit(MachineResult.of(StopReason.GUEST_DONE, message, call.args[0], ucall=call))
        elif call.command == UcallCommand.ABORT:
            self.request_exit(MachineResult.of(StopReason.GUEST_ABORT, call.describe(), call.args[0], ucall=call))
        else:
            self.ucalls.append(call)
        if self.on_ucall is not None:
            self.on_ucall(call)

    def guest_exit(self, value: int) -> None:
        self.request_exit(MachineResult.of(StopReason.GUEST_EXIT, f"guest exited with status {value}", value))

    def guest_power_off(self) -> None:
        self.request_exit(MachineResult.of(StopReason.POWER_OFF, "guest powered off (ACPI S5)"))

    def guest_reset(self) -> None:
        self.request_exit(MachineResult.of(StopReason.RESET, "guest requested a reset"))

    # --- numbers ---------------------------------------------------------------------------

    def stats(self) -> MachineStats:
        end = self._ended_ns or time.perf_counter_ns()
        if self._ended_ns and all(runner.finished_ns for runner in self.runners):
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
