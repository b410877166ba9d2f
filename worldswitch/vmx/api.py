"""The Python API: a virtual machine you script (kernel CI, teaching, sandboxes), in process.

    from worldswitch import Machine

    with Machine(kernel="vmlinuz", initrd="initrd.img", memory="512M") as vm:
        vm.start()
        vm.console.expect(r"login:|# ", timeout=600)
        vm.console.send("uname -a\\n")
        vm.console.expect(r"Linux")
        vm.snapshot("after-boot")

    with Machine.restore("after-boot") as vm:      # exactly where it was
        vm.start()

The `worldswitch` command is built on this class; leaving the `with` block always tears the VM down.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError
from ..vmm.builder import build_for_boot, restore_machine
from ..vmm.config import MachineConfig
from ..vmm.machine import Vmm
from ..vmm.result import MachineResult, StopReason
from ..vmm.trace import DEFAULT_LIMIT as DEFAULT_TRACE_LIMIT
from ..vmm.trace import TraceRequest
from .control import ControlServer
from .settings import from_keywords

if TYPE_CHECKING:  # the snapshot module (hashing, mincore) loads when a snapshot is taken
    from ..vmm.snapshot import SnapshotInfo

PANIC = re.compile(rb"Kernel panic - not syncing[^\r\n]*(?=\r?\n)")  # whole lines only


class ConsoleBuffer:
    """The guest's serial console from Python: what it printed, and a way to type.

    At most `keep` bytes are kept (the oldest go first), so a VM that runs for weeks does not
    grow without bound; expect() never matches across what was dropped."""

    def __init__(self, echo: Callable[[bytes], None] | None = None, keep: int = 64 << 20,
                 on_panic: Callable[[str], None] | None = None) -> None:
        """`on_panic` hears a guest kernel's panic line, once per panic."""
        self.echo = echo
        self.keep = keep
        self.data = bytearray()
        self.dropped = 0  # bytes dropped from the front
        self.cursor = 0  # expect() searches from here and moves it past each match
        self._after_panic = 0  # a panic line is reported once
        self._changed = threading.Condition()
        self._receive: Callable[[bytes], None] | None = None  # the UART of the VM attached
        self.on_panic = on_panic

    def __call__(self, chunk: bytes) -> None:
        with self._changed:
            start = max(self.data.rfind(b"\n") + 1, self._after_panic)  # the line in progress
            self.data += chunk
            panic = PANIC.search(self.data, start) if b"\n" in chunk else None
            if panic is not None:
                self._after_panic = panic.end()
            if len(self.data) > self.keep:
                excess = len(self.data) - self.keep
                del self.data[:excess]
                self.dropped += excess
                self.cursor = max(0, self.cursor - excess)
                self._after_panic = max(0, self._after_panic - excess)
            self._changed.notify_all()
        if self.echo is not None:
            self.echo(chunk)
        if panic is not None and self.on_panic is not None:
            self.on_panic(panic.group(0).decode(errors="replace"))

    @property
    def text(self) -> str:
        with self._changed:
            return self.data.decode(errors="replace")

    def expect(self, pattern: str | bytes, timeout: float = 30.0) -> re.Match[bytes]:
        """Wait until the console shows `pattern` (a regular expression) after the previous match."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self.data, self.cursor)
                if match is not None:
                    self.cursor = match.end()
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = bytes(self.data[-300:]).decode(errors="replace")
                    raise TimeoutError(f"the console did not show {regex.pattern.decode(errors='replace')!r} within {timeout:g} s; it ends with: {tail!r}")
                self._changed.wait(remaining)

    def attach(self, receive: Callable[[bytes], None]) -> None:
        """Type into this UART from now on: a console outlives its VM (a reboot builds a new one)."""
        self._receive = receive

    def send(self, text: str | bytes) -> None:
        """Type `text` into the guest's serial port (it waits in the UART's receive FIFO)."""
        if self._receive is None:
            raise RuntimeError("the machine is not running")
        self._receive(text.encode() if isinstance(text, str) else text)


def vcpu_registers(vcpu: Any) -> dict[str, int]:
    """General registers, control registers, EFER and the privilege level of one (parked) vCPU."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    values = {name: getattr(regs, name) for name, _ in regs._fields_}
    values.update({name: getattr(sregs, name) for name in ("cr0", "cr2", "cr3", "cr4", "efer")})
    values.update(cs=sregs.cs.selector, ss=sregs.ss.selector, cpl=sregs.cs.selector & 3)
    return values


class Machine:
    """A worldswitch virtual machine. Its option keywords are `worldswitch run`'s options and the keys
    of a machine file (one schema: vmx/settings.py); `control=True` (or a socket path) also serves
    the control API."""

    def __init__(self, config: MachineConfig | None = None, *, echo: Callable[[bytes], None] | None = None,
                 warn: Callable[[str], None] | None = None, control: str | bool = False, trace: str | None = None,
                 trace_limit: int = DEFAULT_TRACE_LIMIT, console_keep: int = 64 << 20, kvm_path: str = "/dev/kvm",
                 **options: Any) -> None:
        """`options` are MachineConfig's (vmx/settings.py lists them: memory="512M", kernel=...,
        disk=["root.img", "data.img,ro"], net=["tap=tap0"], ...), taken as the command line takes them;
        or give a whole `config`."""
        if config is None:
            config = MachineConfig(**from_keywords(options))
        elif options:
            raise ConfigError(f"give either a config or options ({', '.join(options)}), not both")
        config.program()  # contradictions are refused here, not at start()
        self.config = config
        self.console = ConsoleBuffer(echo, console_keep, on_panic=lambda line: self._event("guest-panic", line=line))
        self.warn = warn
        self.kvm_path = kvm_path
        self.control_path = control
        self.trace = trace
        self.trace_limit = trace_limit
        self.control: ControlServer | None = None  # while started with control
        self.on_event: list[Callable[[str, dict[str, Any]], None]] = []
        self.progress: Callable[[str, int, int], None] | None = None  # (phase, done, total) for big memory
        self.boots = 0
        self._transition = threading.Lock()  # pause, resume and snapshot one at a time, from any thread
        self._restore_from: str | None = None
        self._vm: Vmm | None = None

    @classmethod
    def from_file(cls, path: str | Path, **keywords: Any) -> "Machine":
        """A machine described by a TOML machine file (see worldswitch/vmx/machine_file.py).
        Keywords are the constructor's non-machine ones (echo, warn, control, ...)."""
        from .machine_file import load_machine_file
        from .settings import merge, settings_of

        return cls(config=settings_of(merge(load_machine_file(path))).machine, **keywords)

    @classmethod
    def restore(cls, path: str | Path, **keywords: Any) -> "Machine":
        """A machine that resumes from a snapshot directory when started."""
        from ..vmm.snapshot import SnapshotError, open_snapshot

        snapshot = open_snapshot(path)
        try:
            config = MachineConfig.from_dict(snapshot.config)
        except (TypeError, KeyError, ValueError) as error:
            raise SnapshotError(f"the snapshot's machine description is malformed: {error}") from None
        machine = cls(config=config, **keywords)
        machine._restore_from = str(path)
        return machine

    # --- life cycle -----------------------------------------------------------------------------

    @property
    def vmm(self) -> Vmm:
        """The VMM-level machine (vCPUs, memory, devices) behind this one."""
        if self._vm is None:
            raise RuntimeError("the machine has not been started")
        return self._vm

    @property
    def alive(self) -> bool:
        return self._vm is not None and self._vm.running

    @property
    def restoring(self) -> bool:
        return self._restore_from is not None

    @property
    def restored_from(self) -> str | None:
        return self._restore_from

    def build(self) -> Vmm:
        """Create the VM (or restore it) without starting it."""
        if self._vm is None:
            trace = TraceRequest(self.trace, self.trace_limit) if self.trace else None
            if self._restore_from is not None:
                vm = restore_machine(self._restore_from, self.console, self.warn, self.kvm_path, self.progress, trace)
            else:
                vm = build_for_boot(self.config, self.console, self.warn, self.kvm_path, trace)
            self._vm = vm
            self.console.attach(vm.serial.receive)
            vm.outcome.listen(lambda result: self._event(
                "shutdown", reason=result.reason.value, message=result.message, exit_status=result.exit_status))
        return self._vm

    def start(self) -> "Machine":
        """Build (or restore) the VM, open the control socket if asked, and run the vCPUs."""
        vm = self.build()
        self.serve_control()
        vm.start()
        self.boots += 1
        self._event("started", restored=self._restore_from is not None, boot=self.boots)
        return self

    def serve_control(self) -> None:
        """Open the control socket now (start() does it too), if the machine was made with control."""
        if self.control_path is not False and self.control is None:
            server = ControlServer(self, self.control_path if isinstance(self.control_path, str) else None)
            server.start()
            self.control = server

    def restart(self) -> "Machine":
        """Power-cycle after the guest reset: a fresh VM from the same description (never the
        snapshot again); the console buffer and the control socket stay."""
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        self._restore_from = None
        return self.start()

    def wait(self, timeout: float | None = None) -> MachineResult | None:
        """The result once the guest has ended, or None if it still runs after `timeout` seconds."""
        return self.vmm.wait(timeout)

    def run(self, timeout: float | None = None) -> MachineResult:
        """start() if needed and wait until the guest ends; after `timeout` seconds it is stopped."""
        if self._vm is None or not self._vm.started:
            self.start()
        result = self.wait(timeout)
        if result is None:
            result = self.stop(StopReason.TIMEOUT, f"the guest did not finish within {timeout:g} s; stopped it")
        return result

    def pause(self) -> None:
        """Every vCPU back in the VMX and parked; guest time stands still until resume()."""
        with self._transition:
            self.vmm.pause()
        self._event("paused")

    def resume(self) -> None:
        with self._transition:
            self.vmm.resume()
        self._event("resumed")

    def stop(self, reason: StopReason = StopReason.STOPPED, message: str = "stopped") -> MachineResult:
        """End the guest now (the VM stays inspectable until close())."""
        return self.vmm.stop(reason, message)

    def request_stop(self, reason: StopReason = StopReason.STOPPED, message: str = "stopped") -> None:
        """Ask the guest to end without waiting for the vCPUs (safe from any thread, even a vCPU's)."""
        self.vmm.request_exit(MachineResult.of(reason, message))

    def snapshot(self, path: str | Path, progress: Callable[[str, int, int], None] | None = None) -> SnapshotInfo:
        """Suspend to disk: write the whole machine to the new directory `path`; a running guest
        goes on running afterwards."""
        from ..vmm.snapshot import take  # hashing and mincore load when a snapshot is taken, not at start

        with self._transition:
            info = take(self.vmm, str(path), progress or self.progress)
        self._event("snapshot", path=info.path, seconds=info.seconds)
        return info

    def registers(self) -> list[dict[str, int]]:
        """Each vCPU's registers, as a debugger shows them (taken while paused: a running machine is
        paused for the moment it takes, and goes on)."""
        with self._transition:
            vm = self.vmm
            was_running = vm.running and not vm.paused
            if was_running:
                vm.pause()
            try:
                return [vcpu_registers(runner.vcpu) for runner in vm.runners]
            finally:
                if was_running:
                    vm.resume()

    def stats(self) -> dict[str, Any]:
        """The world-switch table: exits by reason, time in the guest and in the VMX, per vCPU."""
        return self.vmm.stats().as_dict()

    def status(self) -> dict[str, Any]:
        vm = self.vmm
        state = "paused" if vm.paused else ("running" if vm.running else "ended")
        result = vm.result
        return {
            "state": state,
            "vcpus": len(vm.runners),
            "memory_bytes": vm.memory.size,
            "guest": self.config.program()[0],
            "devices": sorted(vm.devices),
            "boots": self.boots,
            "restored_from": self._restore_from,
            "uptime_s": vm.stats().wall_ns / 1e9,
            "result": None if result is None else {"reason": result.reason.value, "message": result.message,
                                                   "exit_status": result.exit_status},
            "control_socket": str(self.control.path) if self.control is not None else None,
        }

    def close(self) -> None:
        """Tear everything down: vCPUs stopped, disks flushed, the socket removed. Idempotent."""
        if self._vm is not None:
            self._vm.close()
        if self.control is not None:
            self.control.close()
            self.control = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self, name: str, **details: Any) -> None:
        if self.control is not None:
            self.control.publish(name, **details)
        for callback in self.on_event:
            callback(name, details)
