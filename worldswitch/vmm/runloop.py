"""The run loop: one thread per vCPU, one world switch per iteration.

    enter the guest (KVM_RUN) -> the guest runs until something needs the VMX -> KVM_RUN returns
    -> count and time the exit -> dispatch it by reason through one table -> enter again

The loop is the hot path of the whole VMM. It allocates nothing per exit: the kvm_run fields it
reads are ctypes views made once, handlers are bound methods in a list indexed by exit reason,
and the port/MMIO data is read and written through fixed-size views of the kvm_run page.

Host events reach a running vCPU through the hosted interrupt path (kick.py): a request flag, then
immediate_exit plus a signal; KVM_RUN returns EINTR (ExitReason.INTR) and _on_intr acts on the
request (stop, or park for a pause) before the guest is entered again.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import TYPE_CHECKING, Callable

from ..driver import structs as s
from ..driver.binary_stats import BinaryStats
from ..driver.constants import EXIT_REASON_LIMIT, KVM_EXIT_IO_OUT, Cap, ExitReason, InternalError, SystemEvent
from ..driver.exits import InternalErrorExit, decode_exit
from ..driver.ioctl import kvm_run_call
from ..driver.kvm import PIO_DATA_OFFSET, Vcpu, run_failed
from ..errors import WorldswitchError
from ..sandbox import confine_thread
from .kick import kick_thread
from .platform.bus import MmioBus, PioBus
from .result import MachineResult, StopReason
from .stats import KVM_VCPU_COUNTERS, VcpuStats, reason_name
from .trace import FLAG_KICKED, FLAG_WRITE, TraceBuffer  # small: constants and two classes
from .x86.insn import describe_internal_error

if TYPE_CHECKING:
    from .platform.coalesced import CoalescedDrain
    from .x86.ap_start import ApStart
    from .x86.emulate import TrapEmulator
    from .x86.handoff import FirmwareHandoff
    from .x86.user_syscall import UserSyscall

RequestExit = Callable[[MachineResult], None]

_IO_OFFSET = s.kvm_run.u.offset  # kvm_run.io and kvm_run.mmio both start the exit union
_MMIO_OFFSET = s.kvm_run.u.offset
_VIEW_TYPES = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}
_MMIO_SIZES = frozenset(_VIEW_TYPES)
# Plain ints: comparing against IntEnum members costs more on the hot path.
_IO = int(ExitReason.IO)
_MMIO = int(ExitReason.MMIO)
_INTR = int(ExitReason.INTR)
_UNKNOWN = int(ExitReason.UNKNOWN)
_PUBLISH_EVERY = 4096
RESET_RIP, RESET_CS_BASE = 0xFFF0, 0xFFFF_0000  # a vCPU after RESET or INIT (SDM vol. 3, 10.1.4)
SAMPLE_PERIOD = 0.25  # seconds between looks at where the firmware runs: GRUB's loading takes minutes
_NO_RING = ctypes.c_uint32()  # a machine without coalesced writes: its ring's first and last, always equal


class VcpuRunner:
    """Runs one vCPU on its own thread and accounts for its world switches."""

    def __init__(
        self,
        vcpu: Vcpu,
        pio: PioBus,
        mmio: MmioBus,
        request_exit: RequestExit,
        fetch_code: Callable[[int], bytes] | None = None,
        emulator: TrapEmulator | None = None,
        user_syscall: UserSyscall | None = None,
        trace: TraceBuffer | None = None,
        handoff: FirmwareHandoff | None = None,
        explain_shutdown: Callable[[], str] | None = None,
        coalesced: CoalescedDrain | None = None,
        ap_start: ApStart | None = None,
    ) -> None:
        """`user_syscall`: on PVM hosts, where the VMX completes the guest's ring-3 SYSCALLs;
        `trace`: where every world switch is recorded, if it is; `handoff`: on the boot vCPU of a
        machine that boots Linux through firmware under the monitor, its watch for the kernel's entry;
        `explain_shutdown`: what else is known of a triple fault (under the monitor, the event it
        could not deliver), or empty; `coalesced`: the VM's queued port writes, applied before
        each exit is handled; `ap_start`: on an application processor under the monitor,
        its watch for its entry into the kernel."""
        self.vcpu = vcpu
        self.fetch_code = fetch_code  # guest virtual address -> instruction bytes, for error reports
        self.emulator = emulator  # what the VMX emulates when KVM's emulator gives up
        self.index = vcpu.id
        self.pio = pio
        self.mmio = mmio
        self.request_exit = request_exit
        self.counts = [0] * EXIT_REASON_LIMIT
        self.guest_ns = 0
        self.vmx_ns = 0
        self.parked_ns = 0
        self.kicks = 0
        self.kick_latency_ns_max = 0
        self.user_syscall = user_syscall
        self.trace = trace
        self.handoff = handoff
        self.explain_shutdown = explain_shutdown
        self.coalesced = coalesced
        self.ap_start = ap_start
        self._last_kick_latency = 0
        self.kvm_stats: BinaryStats | None = None
        if vcpu.vm.check_extension(Cap.BINARY_STATS_FD):
            self.kvm_stats = BinaryStats(vcpu.get_stats_fd())
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

        self._stop = False
        self._pause = False
        self._kicked_at = 0
        self._sample_due = False  # a kick from _sample_firmware, to be answered by handoff.on_sample
        self._calls: list[tuple[Callable[[], None], threading.Event]] = []  # call_on_thread's, not run yet
        self._state = threading.Condition()
        self.parked = threading.Event()
        self.finished = threading.Event()
        self.finished_ns = 0  # perf_counter_ns when the thread ended

        run = vcpu.kvm_run
        page = vcpu.run_mmap
        self._run = run
        self._exit_reason = ctypes.c_uint32.from_buffer(page, s.kvm_run.exit_reason.offset)
        self._io_head = ctypes.c_uint64.from_buffer(page, _IO_OFFSET)
        self._io_data_offset = ctypes.c_uint64.from_buffer(page, _IO_OFFSET + s.kvm_run_io.data_offset.offset)
        self._mmio_addr = ctypes.c_uint64.from_buffer(page, _MMIO_OFFSET + s.kvm_run_mmio.phys_addr.offset)
        self._mmio_len = ctypes.c_uint32.from_buffer(page, _MMIO_OFFSET + s.kvm_run_mmio.len.offset)
        self._mmio_is_write = ctypes.c_uint8.from_buffer(page, _MMIO_OFFSET + s.kvm_run_mmio.is_write.offset)
        # Indexed by access size: views of the data KVM hands over (port I/O in the page after
        # kvm_run proper, MMIO inside kvm_run.mmio.data).
        # Sizes no exit reports (3, 5-7) hold a view of nothing, never read, so the hot path indexes
        # without a check.
        unused = ctypes.c_uint64()
        self._pio_values: list[ctypes._SimpleCData[int]] = [
            _VIEW_TYPES[size].from_buffer(page, PIO_DATA_OFFSET) if size in (1, 2, 4) else unused for size in range(5)]
        self._mmio_values: list[ctypes._SimpleCData[int]] = [
            _VIEW_TYPES[size].from_buffer(page, _MMIO_OFFSET + s.kvm_run_mmio.data.offset) if size in _MMIO_SIZES
            else unused for size in range(9)]

        handlers: list[Callable[[], None]] = [self._on_unexpected] * EXIT_REASON_LIMIT
        handlers[ExitReason.INTR] = self._on_intr
        handlers[ExitReason.HLT] = self._on_hlt
        handlers[ExitReason.SHUTDOWN] = self._on_shutdown
        handlers[ExitReason.SYSTEM_EVENT] = self._on_system_event
        handlers[ExitReason.FAIL_ENTRY] = self._on_fail_entry
        handlers[ExitReason.INTERNAL_ERROR] = self._on_internal_error
        handlers[ExitReason.DEBUG] = self._on_debug
        handlers[ExitReason.X86_WRMSR] = self._on_wrmsr
        handlers[ExitReason.IRQ_WINDOW_OPEN] = self._on_nothing
        self._handlers = handlers

    # --- thread control (called from other threads) -----------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()
        if self.handoff is not None:
            threading.Thread(target=self._sample_firmware, name=f"vcpu{self.index}-sampler", daemon=True).start()

    def kick(self) -> None:
        """Bring the vCPU back to the VMX (see kick.py); idempotent and safe from any thread."""
        self._kicked_at = time.perf_counter_ns()
        self._run.immediate_exit = 1
        thread = self.thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            kick_thread(thread.ident)

    def stop(self) -> None:
        with self._state:
            self._stop = True
            self._state.notify_all()
        self.kick()

    def pause(self) -> None:
        with self._state:
            self._pause = True
        self.kick()

    def resume(self) -> None:
        with self._state:
            self._pause = False
            self._state.notify_all()

    def call_on_thread(self, work: Callable[[], None], timeout: float) -> bool:
        """Run `work` on the vCPU's own thread, at the exit a kick brings (or where it is parked), and
        wait for it: the vCPU's ioctls belong there, since another thread's would wait for KVM_RUN to
        return. True once it has run; False if the vCPU did not come to it within `timeout` seconds, or
        its thread has ended."""
        if self.finished.is_set():
            return False
        done = threading.Event()
        with self._state:
            self._calls.append((work, done))
            self._state.notify_all()
        self.kick()
        return done.wait(timeout)

    def on_own_thread(self) -> bool:
        """Whether the caller is this vCPU's thread."""
        return self.thread is threading.current_thread()

    def _run_calls(self) -> None:
        """call_on_thread's work, on this thread (self._state held)."""
        while self._calls:
            work, done = self._calls.pop(0)
            try:
                work()
            finally:
                done.set()

    def join(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    def _sample_firmware(self) -> None:
        """While the boot vCPU runs firmware, a look at where it is every SAMPLE_PERIOD, taken on
        the vCPU's thread at a kick (handoff.on_sample: a boot loader's copy loop, caught running)."""
        handoff = self.handoff
        while handoff is not None and handoff.watching and not self.finished.wait(SAMPLE_PERIOD):
            if not self._pause:
                self._sample_due = True
                self.kick()

    # --- the loop --------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            confine_thread()  # the guest's exits are handled here: no path calls once sandboxed
            self._loop()
        except BaseException as error:  # noqa: BLE001 - any failure must end the VM, not hang it
            self.error = error
            self.request_exit(
                MachineResult.of(StopReason.VMX_ERROR, f"vCPU {self.index}: {type(error).__name__}: {error}")
            )
        finally:
            self.finished_ns = time.perf_counter_ns()
            self.finished.set()

    def _loop(self) -> None:
        """The world switch, repeated. Written for speed rather than beauty: on hosts without
        PCID every world switch flushes the TLB, so each Python object or code page touched per
        exit costs a page walk. The common exits (single port I/O and MMIO accesses) are handled
        inline with locals only; everything else goes through the dispatch table.

        kvm_run fields are read through fixed views: one 64-bit read gives the whole io header
        (direction, size, port, count), see structs.kvm_run_io."""
        run_ioctl = kvm_run_call
        fd = self.vcpu.fd
        request = self.vcpu.run_request
        exit_reason = self._exit_reason
        io_head = self._io_head
        io_data_offset = self._io_data_offset
        pio_values = self._pio_values
        pio_table = self.pio.table
        mmio_addr = self._mmio_addr
        mmio_len = self._mmio_len
        mmio_is_write = self._mmio_is_write
        mmio_values = self._mmio_values
        mmio_bus = self.mmio
        counts = self.counts
        handlers = self._handlers
        clock = time.perf_counter_ns
        guest_ns = self.guest_ns
        vmx_ns = self.vmx_ns
        publish_in = _PUBLISH_EVERY
        trace = self.trace
        coalesced = self.coalesced
        ring_first = coalesced.ring.first if coalesced is not None else _NO_RING
        ring_last = coalesced.ring.last if coalesced is not None else _NO_RING
        drain = coalesced.drain if coalesced is not None else self._on_nothing  # never called: no ring
        t_enter = clock()
        try:
            while not self._stop:
                if run_ioctl(fd, request, None) < 0:
                    reason = run_failed()  # a kick (INTR: see _on_intr) or an error
                else:
                    reason = exit_reason.value
                t_exit = clock()
                in_guest = t_exit - t_enter
                guest_ns += in_guest
                try:
                    counts[reason] += 1
                except IndexError:  # a reason newer than EXIT_REASON_LIMIT
                    reason = _UNKNOWN
                    counts[reason] += 1
                if ring_first.value != ring_last.value:
                    drain()  # the writes queued before this exit come first
                if reason == _IO:
                    head = io_head.value
                    if head >> 32 == 1 and io_data_offset.value == PIO_DATA_OFFSET:
                        port = (head >> 16) & 0xFFFF
                        size = (head >> 8) & 0xFF
                        entry = pio_table.get(port)
                        # a device sees only accesses inside its ports and naturally aligned (bus.py)
                        if entry is None or port + size > entry.end or port & (size - 1) or size > entry.max_size:
                            if head & 0xFF:
                                self.pio.write(port, size, pio_values[size].value)
                            else:
                                pio_values[size].value = self.pio.read(port, size)
                        elif head & 0xFF:
                            entry.write(port - entry.base, size, pio_values[size].value)
                        else:
                            pio_values[size].value = entry.read(port - entry.base, size)
                    else:
                        self._on_string_io()
                elif reason == _MMIO:
                    length = mmio_len.value
                    if length in _MMIO_SIZES:
                        if mmio_is_write.value:
                            mmio_bus.write(mmio_addr.value, length, mmio_values[length].value)
                        else:
                            mmio_values[length].value = mmio_bus.read(mmio_addr.value, length)
                    else:
                        self._on_odd_mmio()
                else:
                    self.guest_ns = guest_ns
                    self.vmx_ns = vmx_ns
                    handlers[reason]()
                t_enter = clock()
                vmx_ns += t_enter - t_exit
                if trace is not None:
                    self._trace(trace, reason, t_exit, in_guest, t_enter - t_exit)
                # Other threads read the times; publishing them costs two attribute stores, so
                # the fast path does it every so many exits (and every slow exit does it above).
                publish_in -= 1
                if not publish_in:
                    publish_in = _PUBLISH_EVERY
                    self.guest_ns = guest_ns
                    self.vmx_ns = vmx_ns
        finally:
            self.guest_ns = guest_ns
            self.vmx_ns = vmx_ns

    def _trace(self, trace: TraceBuffer, reason: int, t_exit: int, in_guest: int, in_vmx: int) -> None:
        """One trace record, its details read back from the kvm_run page (still as KVM left it,
        plus the data the VMX answered with)."""
        address = value = size = flags = 0
        if reason == _IO:
            head = self._io_head.value
            address, size = (head >> 16) & 0xFFFF, (head >> 8) & 0xFF
            flags = FLAG_WRITE if head & 0xFF else 0
            view = self._pio_values[size] if size < len(self._pio_values) else None
            value = view.value if view is not None else 0
        elif reason == _MMIO:
            address, size = self._mmio_addr.value, self._mmio_len.value
            flags = FLAG_WRITE if self._mmio_is_write.value else 0
            view = self._mmio_values[size] if size < len(self._mmio_values) else None
            value = view.value if view is not None else 0
        elif reason == _INTR and self._last_kick_latency:
            address, flags = self._last_kick_latency, FLAG_KICKED
            self._last_kick_latency = 0
        trace.record(t_exit, in_guest, in_vmx, reason, address, value, size, flags)

    # --- exit handlers ---------------------------------------------------------------------

    def _on_string_io(self) -> None:
        """rep ins/outs: `count` items back to back from data_offset in the kvm_run page."""
        io = self._run.io
        page = self.vcpu.run_mmap
        size, port, start = io.size, io.port, io.data_offset
        for i in range(io.count):
            at = start + i * size
            if io.direction == KVM_EXIT_IO_OUT:
                self.pio.write(port, size, int.from_bytes(page[at : at + size], "little"))
            else:
                page[at : at + size] = self.pio.read(port, size).to_bytes(size, "little")

    def _on_odd_mmio(self) -> None:
        """Accesses of 3, 5, 6 or 7 bytes (KVM splits larger ones into pieces of at most 8)."""
        mmio = self._run.mmio
        length = min(mmio.len, 8)
        if mmio.is_write:
            self.mmio.write(mmio.phys_addr, length, int.from_bytes(bytes(mmio.data[:length]), "little"))
        else:
            value = self.mmio.read(mmio.phys_addr, length)
            ctypes.memmove(mmio.data, value.to_bytes(length, "little"), length)

    def _on_intr(self) -> None:
        # Clear immediate_exit before looking at requests: a kick that lands after this line
        # sets it again and is seen on the next entry; none can slip between.
        self._run.immediate_exit = 0
        kicked_at = self._kicked_at
        if kicked_at:
            self.kicks += 1
            latency = time.perf_counter_ns() - kicked_at
            self._last_kick_latency = latency
            if latency > self.kick_latency_ns_max:
                self.kick_latency_ns_max = latency
            self._kicked_at = 0
        if self._sample_due and self.handoff is not None:
            self._sample_due = False
            self.handoff.on_sample()
        with self._state:
            self._run_calls()
            if self._pause and not self._stop:
                parked_from = time.perf_counter_ns()
                self.parked.set()
                while self._pause and not self._stop:
                    self._state.wait()
                    self._run_calls()
                self.parked.clear()
                self.parked_ns += time.perf_counter_ns() - parked_from

    def _on_nothing(self) -> None:
        pass

    def _on_hlt(self) -> None:
        # With the in-kernel LAPIC, KVM keeps a halted vCPU in the kernel until an interrupt
        # wakes it, so this exit is rare; entering again is the right answer either way.
        pass

    def _on_shutdown(self) -> None:
        regs = self.vcpu.get_regs()
        known = self.explain_shutdown() if self.explain_shutdown is not None else ""
        if regs.rip == RESET_RIP and self.vcpu.get_sregs().cs.base == RESET_CS_BASE:
            # AMD's KVM answers a shutdown by putting the vCPU through INIT (svm.c, shutdown_interception:
            # the VMCB is undefined after one), so what the registers say is the reset state, not the fault
            where = "where: not known, this host's KVM reset the vCPU at the shutdown"
        else:
            where = f"rip {regs.rip:#x}, rsp {regs.rsp:#x}"
        self._end(
            StopReason.TRIPLE_FAULT,
            f"guest triple-faulted on vCPU {self.index} ({where}): "
            + (known or "an exception it could not handle, usually a missing or broken IDT or stack"),
        )

    def _on_system_event(self) -> None:
        event = self._run.system_event
        if event.type == SystemEvent.SHUTDOWN:
            self._end(StopReason.POWER_OFF, "guest powered off")
        elif event.type == SystemEvent.RESET:
            self._end(StopReason.RESET, "guest requested a reset")
        elif event.type == SystemEvent.CRASH:
            self._end(StopReason.GUEST_CRASH, "guest reported a crash")
        else:
            self._end(StopReason.VMX_ERROR, f"unhandled KVM system event {event.type}")

    def _on_fail_entry(self) -> None:
        fail = self._run.fail_entry
        self._end(
            StopReason.ENTRY_FAILURE,
            f"KVM could not enter the guest on vCPU {self.index} "
            f"(hardware entry failure reason {fail.hardware_entry_failure_reason:#x}): invalid vCPU state",
        )

    def _on_internal_error(self) -> None:
        exit_ = decode_exit(ExitReason.INTERNAL_ERROR, self._run, memoryview(self.vcpu.run_mmap))
        assert isinstance(exit_, InternalErrorExit)  # what decode_exit gives for this reason
        regs = self.vcpu.get_regs()
        if self.emulator is not None and exit_.suberror == InternalError.EMULATION:
            code = exit_.insn_bytes
            if not code and self.fetch_code is not None:
                try:
                    code = self.fetch_code(regs.rip)
                except Exception:  # noqa: BLE001 - no bytes, no emulation: the error below stands
                    code = b""
            if code and self.emulator.try_emulate(self.vcpu, code):
                return  # trap-and-emulate: the guest goes on
        sregs = self.vcpu.get_sregs()
        self._end(StopReason.EMULATION_FAILURE, describe_internal_error(exit_, self.index, regs, sregs, self.fetch_code))

    def _on_wrmsr(self) -> None:
        """A WRMSR the MSR filter sent to the VMX (only LSTAR, for user_syscall)."""
        msr = self._run.msr
        if self.user_syscall is not None and self.user_syscall.on_wrmsr(msr.index, msr.data):
            msr.error = 0
        else:
            msr.error = 1  # KVM injects #GP, as for an MSR the CPU does not have

    def _on_debug(self) -> None:
        """A debug exit: user_syscall's breakpoint or single step, or the handoff's or an AP's breakpoint
        (nothing else turns debugging on)."""
        for watch in (self.ap_start, self.handoff):  # the monitor's takeovers, each of its own breakpoints
            if watch is None:
                continue
            try:
                if watch.on_debug():
                    return
            except WorldswitchError as error:
                self._end(StopReason.EMULATION_FAILURE, f"--monitor: {error}")
                return
        if self.user_syscall is not None:
            self.user_syscall.on_debug()

    def _on_unexpected(self) -> None:
        reason = self._run.exit_reason
        self._end(StopReason.VMX_ERROR, f"unexpected KVM exit reason {reason_name(reason)} ({reason}) on vCPU {self.index}")

    def _end(self, reason: StopReason, message: str) -> None:
        self._stop = True
        self.request_exit(MachineResult.of(reason, message))

    def release(self) -> None:
        """Drop the views into the kvm_run page so that the vCPU can unmap it."""
        if self.kvm_stats is not None:
            self.kvm_stats.close()
            self.kvm_stats = None
        for name in ("_run", "_exit_reason", "_io_head", "_io_data_offset", "_mmio_addr", "_mmio_len", "_mmio_is_write"):
            setattr(self, name, None)
        self._pio_values = []
        self._mmio_values = []

    # --- numbers ---------------------------------------------------------------------------

    def stats(self) -> VcpuStats:
        exits = {reason_name(reason): count for reason, count in enumerate(self.counts) if count}
        kvm: dict[str, int] = {}
        if self.kvm_stats is not None:
            values = self.kvm_stats.read()
            kvm = {name: int(values[name]) for name in KVM_VCPU_COUNTERS if name in values}  # type: ignore[arg-type]
        return VcpuStats(
            vcpu=self.index,
            exits=exits,
            guest_ns=self.guest_ns,
            vmx_ns=max(0, self.vmx_ns - self.parked_ns),
            kicks=self.kicks,
            kick_latency_ns_max=self.kick_latency_ns_max,
            kvm=kvm,
            vmx_emulated=dict(self.emulator.emulated) if self.emulator is not None else {},
            copies=({"calls": self.handoff.copies, "bytes": self.handoff.copied_bytes}
                    if self.handoff is not None and self.handoff.copies else {}),
        )
