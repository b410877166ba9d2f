"""KVM's binary statistics (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst 4.133): what the
kernel counts per VM and per vCPU, including the exits it handled without returning to us.

The file holds a header, an id string, one descriptor (struct kvm_stats_desc plus a name of
header.name_size bytes) per statistic, and the data block; values are re-read with pread.
"""

from __future__ import annotations

import ctypes
import os

from ..record import record
from . import structs as s

KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_UNIT_MASK = 0xF << 4
KVM_STATS_UNIT_SECONDS = 0x2 << 4
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_LINEAR_HIST = 0x3
KVM_STATS_TYPE_LOG_HIST = 0x4


@record(frozen=True)
class StatDescriptor:
    name: str
    flags: int
    exponent: int
    size: int  # number of u64 values (more than one for histograms)
    offset: int  # in the data block

    @property
    def is_histogram(self) -> bool:
        return self.flags & KVM_STATS_TYPE_MASK in (KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST)


class BinaryStats:
    """An open stats file descriptor, its descriptors parsed once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        header = s.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(s.kvm_stats_header), 0))
        self.id = os.pread(fd, header.name_size, header.id_offset).split(b"\0", 1)[0].decode()
        stride = ctypes.sizeof(s.kvm_stats_desc) + header.name_size
        raw = os.pread(fd, stride * header.num_desc, header.desc_offset)
        self.descriptors: list[StatDescriptor] = []
        for i in range(header.num_desc):
            base = i * stride
            desc = s.kvm_stats_desc.from_buffer_copy(raw, base)
            name = raw[base + ctypes.sizeof(s.kvm_stats_desc) : base + stride].split(b"\0", 1)[0].decode()
            self.descriptors.append(StatDescriptor(name, desc.flags, desc.exponent, desc.size, desc.offset))
        self.data_offset = header.data_offset
        self.data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)

    def read(self) -> dict[str, int | list[int]]:
        """Current values: one int per counter, a list per histogram."""
        data = os.pread(self.fd, self.data_size, self.data_offset)
        values: dict[str, int | list[int]] = {}
        for d in self.descriptors:
            words = [int.from_bytes(data[d.offset + 8 * i : d.offset + 8 * i + 8], "little") for i in range(d.size)]
            values[d.name] = words if d.is_histogram or d.size > 1 else words[0]
        return values

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
