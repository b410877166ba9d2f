"""A VM session, as `worldswitch run` and `worldswitch restore` drive it: settings from the command
line over a machine file, the console attached, the control socket open, the guest run until it
ends, a timeout passes, the user quits or a signal arrives, then the report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..sandbox import Sandbox, SandboxSettings
from ..vmm.result import MachineResult, StopReason
from . import stats_report
from .api import Machine as VirtualMachine
from .console import Console, open_console, stderr_line
from .settings import MACHINE_OPTIONS, SESSION_OPTIONS, SessionConfig, given, merge, settings_of
from .signals import StopSignals

POLL_S = 0.1  # how often the session looks at signals and the deadline while the guest runs
# Said where a Linux boot would take minutes: the host emulates guest kernel code and the monitor,
# which runs it natively, was not asked for (docs/monitor.md; 23 minutes to init against 4 s here)
MONITOR_HINT = ("this host emulates guest kernel code (PVM): Linux takes minutes to boot here; under --monitor "
                "its kernel runs natively and boots in seconds (docs/monitor.md)")
PANIC_GRACE_S = 2.0  # a panicking kernel prints its backtrace after the panic line; let it finish


def run_from_options(options: argparse.Namespace) -> int:
    file_values = {}
    if getattr(options, "machine", None):
        from .machine_file import load_machine_file  # tomllib, only for a run that has a machine file

        file_values = load_machine_file(options.machine)
    settings = settings_of(merge(file_values, given(options, MACHINE_OPTIONS + SESSION_OPTIONS)))
    return run_session(lambda **keywords: VirtualMachine(config=settings.machine, **keywords), settings.session,
                       options.signals, options.whole_process, options.kvm_path)


def restore_from_options(options: argparse.Namespace) -> int:
    session = settings_of(merge(given(options, SESSION_OPTIONS))).session
    return run_session(lambda **keywords: VirtualMachine.restore(options.snapshot, **keywords), session,
                       options.signals, options.whole_process, options.kvm_path)


def make_sandbox(settings: SessionConfig, whole_process: bool) -> Sandbox:
    """The sandbox the settings ask for, checked before anything is built; none for a session that
    shares its process with other code (a sandbox would confine that code too)."""
    if not whole_process and settings.jail is not None:
        raise ConfigError("--jail needs the worldswitch command: this process is not the VMX's alone")
    chosen = SandboxSettings(enabled=settings.sandbox and whole_process, jail=settings.jail, uid=settings.uid,
                             gid=settings.gid, off_reason="--no-sandbox" if whole_process else "in another program's process")
    return Sandbox(chosen, debug=bool(os.environ.get("WORLDSWITCH_DEBUG")))


def check_power_cycle(vm: VirtualMachine, settings: SessionConfig) -> None:
    """--reboot builds a new VM after set-up; refuse what a sandboxed VMX could not build again."""
    if not settings.reboot or not settings.sandbox:
        return
    if settings.jail is not None:
        raise ConfigError("--reboot cannot go with --jail: a power-cycle opens the kernel and disks again, "
                          "which are outside the jail")
    if vm.config.net:
        raise ConfigError("--reboot with --net needs --no-sandbox: a power-cycle creates the tap again, which "
                          "needs CAP_NET_ADMIN, and the sandbox gives every capability up")


class ProgressLine:
    """'restore: memory 50% of 4096 MiB' in quarter steps, for memory big enough to take a while."""

    THRESHOLD = 256 << 20

    def __init__(self, what: str, console: Console) -> None:
        self.what = what
        self.console = console
        self.shown = -1

    def __call__(self, phase: str, done: int, total: int) -> None:
        if total < self.THRESHOLD:
            return
        quarter = done * 4 // total
        if quarter > self.shown:
            self.shown = quarter
            stderr_line(f"{self.what}: {phase} {quarter * 25}% of {total >> 20} MiB", self.console)


def run_session(make: Callable[..., VirtualMachine], settings: SessionConfig, signals: StopSignals,
                whole_process: bool, kvm_path: str) -> int:
    """Build (or restore) the machine, run it on the console until it ends, report how."""
    quiet = settings.quiet
    timeout = settings.timeout
    sandbox = make_sandbox(settings, whole_process)
    console = open_console(settings.serial)
    try:
        vm = make(echo=console.write, warn=lambda text: stderr_line(text, console), control=settings.control or True,
                  trace=settings.trace, trace_limit=settings.trace_limit, console_keep=64 << 10,
                  kvm_path=kvm_path)
        check_power_cycle(vm, settings)
        with vm:
            if not quiet:
                vm.progress = ProgressLine("restore", console)
            machine = vm.build()
            if not quiet:
                vm.progress = ProgressLine("snapshot", console)
                if vm.restoring:
                    stderr_line(f"restored {vm.config.program()[0]} from {vm.restored_from}", console)
                elif machine.boot is not None:
                    boot = machine.boot
                    notes = "; ".join(boot.notes)
                    stderr_line(f"booting {boot.version or vm.config.kernel} as a {boot.mode}" + (f" ({notes})" if notes else ""), console)
                if (not vm.restoring and machine.host.kernel_code_emulated and not vm.config.monitor
                        and (machine.boot is not None or vm.config.boots_firmware)):
                    stderr_line(MONITOR_HINT, console)
            console_device = machine.devices.get("virtio-console")
            if console_device is not None:
                from ..devices.virtio.console import PtyBackend  # loaded by the machine that has one

                if isinstance(console_device.device.backend, PtyBackend):  # type: ignore[attr-defined]
                    # said even with --quiet: without it nobody can reach the console
                    stderr_line(f"virtio console on {console_device.device.backend.name}", console)  # type: ignore[attr-defined]
            watch_for_panics(vm, settings.on_panic, console)
            vm.serve_control()
            sandbox.apply()  # everything is open: give up what a running VMX does not need
            # The guest's time starts now: building, and above all restoring, do not count against it.
            deadline = None if timeout is None else time.monotonic() + timeout
            signals.in_session = True  # from here a signal stops the VM in order; announce only then
            try:
                if not quiet and vm.control is not None:
                    stderr_line(f"control socket {vm.control.path}", console)
                if not quiet:
                    stderr_line(sandbox.describe(), console)
                result = drive(vm, console, deadline, timeout, VirtualMachine.start, signals)
                while result.reason is StopReason.RESET and settings.reboot:
                    if deadline is not None and time.monotonic() >= deadline:
                        result = MachineResult.of(StopReason.TIMEOUT, f"the guest did not finish within {timeout:g} s "
                                                  f"(it reset {vm.boots} times); stopped it")
                        break
                    stderr_line(f"guest reset; starting it again (boot {vm.boots + 1})", console)
                    result = drive(vm, console, deadline, timeout, VirtualMachine.restart, signals)
            finally:
                signals.in_session = False
            # taken only for a report (it reads the residency of all guest memory: ~6 ms at 128 MiB)
            stats = vm.vmm.stats() if settings.stats or settings.stats_json or not quiet else None
            boots = vm.boots
    finally:
        console.close()
    if not quiet or not result.ok:
        stderr_line(result.message, console)
    if stats is None:
        return result.exit_status
    if settings.stats:
        sys.stderr.write(stats_report.table(stats) + "\n" + sandbox.describe() + "\n")
    elif not quiet:
        stderr_line(stats_report.summary(stats), console)
    if settings.stats_json:
        ucall = result.details.get("ucall")
        payload = {"result": {"reason": result.reason.value, "message": result.message, "exit_status": result.exit_status,
                              "value": result.value, "boots": boots,
                              "ucall_args": list(ucall.args) if ucall is not None else None},  # type: ignore[attr-defined]
                   "stats": stats.as_dict(), "sandbox": sandbox.describe()}
        try:
            Path(settings.stats_json).write_text(json.dumps(payload, indent=2) + "\n")
        except OSError as error:  # the host's failure, after the guest's run: report it, keep the guest's status
            stderr_line(f"warning: cannot write the statistics to {settings.stats_json}: {error.strerror or error}")
    return result.exit_status


def watch_for_panics(vm: VirtualMachine, action: str, console: Console) -> None:
    """What a guest kernel panic does to the session: stop (the default: a panicked kernel only
    spins), pause (inspect it with `worldswitch ctl SOCKET registers` or a snapshot), or nothing."""
    def on_event(name: str, details: dict[str, Any]) -> None:
        if name != "guest-panic" or action == "continue" or not vm.alive:
            return
        if action == "pause":
            stderr_line(f"guest panicked; paused for inspection: {details['line']}", console)
            threading.Thread(target=vm.pause, name="panic-pause", daemon=True).start()
        else:
            message = f"guest kernel panic: {details['line']}"
            timer = threading.Timer(PANIC_GRACE_S, vm.request_stop, args=(StopReason.GUEST_CRASH, message))
            timer.daemon = True
            timer.start()

    vm.on_event.append(on_event)


def drive(vm: VirtualMachine, console: Console, deadline: float | None, timeout: float | None,
          begin: Callable[[VirtualMachine], object], signals: StopSignals) -> MachineResult:
    """Start the guest with `begin` and wait until it ends, the deadline passes, the user quits
    (Ctrl-A x) or a signal arrives: SIGINT interrupts, SIGTERM and SIGHUP stop."""
    quit_requested: list[bool] = []
    console.attach(vm.console.send, lambda: quit_requested.append(True))
    try:
        begin(vm)
        while True:
            result = vm.wait(POLL_S)
            if result is not None:
                return result
            if signals.first == signal.SIGINT:
                return vm.stop(StopReason.INTERRUPTED, "interrupted")
            if signals.first is not None:
                return vm.stop(StopReason.STOPPED, f"stopped by the user ({signal.Signals(signals.first).name})")
            if quit_requested:
                return vm.stop(StopReason.STOPPED, "stopped by the user")
            if deadline is not None and time.monotonic() >= deadline:
                return vm.stop(StopReason.TIMEOUT, f"the guest did not finish within {timeout:g} s; stopped it")
    finally:
        console.detach()
