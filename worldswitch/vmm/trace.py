"""The exit trace: one 32-byte record per world switch, written by `worldswitch run --trace FILE`.

    file   = header (64 bytes) | record* | end record | trailer (JSON)
    header = "WSTRACE1", u32 header size, u32 record size, u64 clock base (ns), f64 wall-clock start,
             u32 vCPU count, padding
    record = u64 t_exit    ns since the clock base, when KVM_RUN returned
             u32 guest_ns  time inside that KVM_RUN (saturates at 4.29 s)
             u32 vmx_ns    time in the VMX handling the exit, until the next KVM_RUN
             u64 address   port or guest-physical address; for a kick (flags & KICKED), the ns from
                           the host event to KVM_RUN's return
             u32 value     data of the access (first 4 bytes)
             u8 vcpu, u8 exit reason, u8 access size, u8 flags (WRITE, KICKED)
    end    = a record with vcpu and reason 0xff whose address is the trailer's length

Cost is bounded: a struct.pack_into per exit into a per-vCPU buffer flushed in 64 KiB writes, and
at most `limit` records (later ones are counted, not written).
"""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple

from ..errors import WorldswitchError
from ..record import record

MAGIC = b"WSTRACE1"
HEADER = struct.Struct("<8sIIQdI28x")
RECORD = struct.Struct("<QIIQIBBBB")
END_MARK = 0xFF
FLAG_WRITE = 1
FLAG_KICKED = 2
U32_MAX = 0xFFFFFFFF
BUFFER_RECORDS = 2048
DEFAULT_LIMIT = 2_000_000


@record(frozen=True)
class TraceRequest:
    """Record every world switch of the machine to `path`, at most `limit` records."""
    path: str
    limit: int = DEFAULT_LIMIT


class TraceRecord(NamedTuple):
    t_exit_ns: int
    guest_ns: int
    vmx_ns: int
    address: int
    value: int
    vcpu: int
    reason: int
    size: int
    flags: int


class TraceWriter:
    """Owns the trace file; vCPU runners write through their own TraceBuffer."""

    def __init__(self, path: str | Path, vcpus: int, limit: int = DEFAULT_LIMIT,
                 warn: Callable[[str], None] | None = None) -> None:
        """`warn` hears once if the file fails while the VM runs (a full disk): tracing then stops,
        the VM does not."""
        self.path = str(path)
        self.base_ns = time.perf_counter_ns()
        self.warn = warn or (lambda text: None)
        try:
            self.file: BinaryIO = open(path, "wb", buffering=0)
            self.file.write(HEADER.pack(MAGIC, HEADER.size, RECORD.size, self.base_ns, time.time(), vcpus))
        except OSError as error:
            raise WorldswitchError(f"cannot write the trace file {path}: {error.strerror}") from None
        self.limit_per_vcpu = max(1, limit // max(1, vcpus))
        self.lock = threading.Lock()
        self.buffers: list[TraceBuffer] = []
        self.closed = False

    def buffer_for(self, vcpu: int) -> "TraceBuffer":
        buffer = TraceBuffer(self, vcpu)
        self.buffers.append(buffer)
        return buffer

    def write(self, data: bytes | memoryview) -> None:
        with self.lock:
            if not self.closed:
                self._write(data)

    def _write(self, data: bytes | memoryview) -> None:
        """With the lock held."""
        try:
            self.file.write(data)
        except OSError as error:
            self.closed = True
            self.file.close()
            self.warn(f"the trace file {self.path} failed ({error.strerror or error}); tracing stopped, the VM goes on")

    def close(self, trailer: dict[str, object]) -> None:
        for buffer in self.buffers:
            buffer.flush()
        trailer = {**trailer, "dropped": {b.vcpu: b.dropped for b in self.buffers if b.dropped}}
        data = json.dumps(trailer).encode()
        with self.lock:
            if self.closed:
                return
            self._write(RECORD.pack(0, 0, 0, len(data), 0, END_MARK, END_MARK, 0, 0) + data)
            if not self.closed:
                self.file.close()
                self.closed = True


class TraceBuffer:
    def __init__(self, writer: TraceWriter, vcpu: int) -> None:
        self.writer = writer
        self.vcpu = vcpu
        self.base_ns = writer.base_ns
        self.buffer = bytearray(RECORD.size * BUFFER_RECORDS)
        self.position = 0
        self.count = 0
        self.limit = writer.limit_per_vcpu
        self.dropped = 0

    def record(self, t_exit: int, guest_ns: int, vmx_ns: int, reason: int, address: int, value: int, size: int,
               flags: int) -> None:
        if self.count >= self.limit:
            self.dropped += 1
            return
        RECORD.pack_into(
            self.buffer, self.position, t_exit - self.base_ns, min(guest_ns, U32_MAX), min(vmx_ns, U32_MAX),
            address, value & U32_MAX, self.vcpu, reason, size, flags,
        )
        self.position += RECORD.size
        self.count += 1
        if self.position == len(self.buffer):
            self.flush()

    def flush(self) -> None:
        if self.position:
            self.writer.write(memoryview(self.buffer)[: self.position])
            self.position = 0


@record
class Trace:
    path: str
    base_ns: int
    wall_start: float
    vcpus: int
    records: list[TraceRecord]
    trailer: dict[str, object]


def read_trace(path: str | Path) -> Trace:
    """Parse a trace file; a truncated or foreign file is one clear error."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise WorldswitchError(f"cannot read trace file {path}: {error.strerror}") from None
    if len(data) < HEADER.size:
        raise WorldswitchError(f"{path} is not a worldswitch trace (too short)")
    magic, header_size, record_size, base_ns, wall, vcpus = HEADER.unpack_from(data)
    if magic != MAGIC or record_size != RECORD.size or header_size != HEADER.size:
        raise WorldswitchError(f"{path} is not a worldswitch trace (or a newer format)")
    records = []
    trailer: dict[str, object] = {}
    offset = header_size
    while offset + RECORD.size <= len(data):
        fields = RECORD.unpack_from(data, offset)
        offset += RECORD.size
        if fields[5] == END_MARK and fields[6] == END_MARK:
            try:
                trailer = json.loads(data[offset : offset + fields[3]])
            except ValueError:
                raise WorldswitchError(f"{path}: the trace trailer is corrupt") from None
            break
        records.append(TraceRecord(*fields))
    else:
        trailer = {"truncated": True}
    return Trace(str(path), base_ns, wall, vcpus, records, trailer)


def iter_records(trace: Trace, vcpu: int | None = None) -> Iterator[TraceRecord]:
    for one in trace.records:
        if vcpu is None or one.vcpu == vcpu:
            yield one
