"""QEMU's firmware configuration interface (fw_cfg; QEMU's docs/specs/fw_cfg.rst), the de facto
standard SeaBIOS, OVMF and Linux's qemu_fw_cfg driver read a machine's description through: items
chosen by a 16-bit selector and read byte by byte from the data port, or moved by DMA.

    0x510  selector (16-bit write)        0x511  data (8-bit read; writes are ignored)
    0x514  DMA address, big-endian: the high 32 bits at 0x514, the low 32 bits at 0x518 (writing
           them starts the transfer); reading 0x514 as 64 bits gives the signature "QEMU CFG"

Items are the legacy numbered ones (signature, ID, RAM size, CPU count, ...) and named files, listed
in the directory at selector 0x19 and selected from 0x20 on. A DMA request is a FWCfgDmaAccess in
guest memory (big-endian control, length, address): select, then read, skip or write; every guest
address and length goes through the bounds-checked accessor, and a transfer is done in pieces, so a
hostile length costs the VMX nothing. A failed request is answered with the error bit.
"""

from __future__ import annotations

import struct
import threading

from ..errors import GuestMemoryError
from ..memory.guest import GuestMemory
from ..record import record

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
DMA_PORT = 0x514
PORT_SPAN = 12  # 0x510 - 0x51b

SIGNATURE, ID, UUID, RAM_SIZE, NOGRAPHIC, NB_CPUS, MACHINE_ID = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
BOOT_MENU, MAX_CPUS, FILE_DIR, FILE_FIRST = 0x0E, 0x0F, 0x19, 0x20
# a kernel for the firmware to boot (what QEMU's linuxboot_dma option ROM reads)
KERNEL_ADDR, KERNEL_SIZE, INITRD_ADDR, INITRD_SIZE = 0x07, 0x08, 0x0A, 0x0B
KERNEL_DATA, INITRD_DATA, CMDLINE_ADDR, CMDLINE_SIZE, CMDLINE_DATA = 0x11, 0x12, 0x13, 0x14, 0x15
SETUP_ADDR, SETUP_SIZE, SETUP_DATA = 0x16, 0x17, 0x18
ID_TRADITIONAL, ID_DMA = 1 << 0, 1 << 1
DMA_SIGNATURE = 0x51454D5520434647  # "QEMU CFG"

DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 0x01, 0x02, 0x04, 0x08, 0x10
DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address
FILE_ENTRY = struct.Struct(">IHH56s")  # size, select, reserved, name
CHUNK = 64 << 10  # zeros written per step when a read runs past an item's end


@record(frozen=True)
class FwCfgFile:
    name: str
    data: bytes


class FwCfg:
    """`items` are the numbered items, `files` the named ones (in directory order)."""

    def __init__(self, memory: GuestMemory, items: dict[int, bytes], files: list[FwCfgFile]) -> None:
        if len({file.name for file in files}) != len(files) or any(len(f.name.encode()) > 55 for f in files):
            raise ValueError("fw_cfg file names must be unique and at most 55 bytes")
        self.memory = memory
        self.entries: dict[int, bytes] = {SIGNATURE: b"QEMU", ID: struct.pack("<I", ID_TRADITIONAL | ID_DMA), **items}
        directory = struct.pack(">I", len(files))
        for index, file in enumerate(files):
            self.entries[FILE_FIRST + index] = file.data
            directory += FILE_ENTRY.pack(len(file.data), FILE_FIRST + index, 0, file.name.encode())
        self.entries[FILE_DIR] = directory
        self.selector = 0
        self.offset = 0
        self.dma_high = 0
        self.transfers = 0
        self.errors = 0
        self._lock = threading.Lock()  # one selector and offset, whichever vCPU touches them

    def counters(self) -> dict[str, int]:
        return {"dma_transfers": self.transfers, "dma_errors": self.errors}

    # --- the port block at 0x510 ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA_PORT - SELECTOR_PORT:
                return self._data_byte() if size == 1 else _all_ones(size)
            if offset == DMA_PORT - SELECTOR_PORT and size in (4, 8):
                return DMA_SIGNATURE >> 32 if size == 4 else DMA_SIGNATURE  # read big-endian: "QEMU", " CFG"
            if offset == DMA_PORT + 4 - SELECTOR_PORT and size == 4:
                return DMA_SIGNATURE & 0xFFFFFFFF
            return _all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0 and size == 2:
                self.selector, self.offset = value, 0
            elif offset == DMA_PORT - SELECTOR_PORT and size == 4:
                self.dma_high = _swap32(value)
            elif offset == DMA_PORT + 4 - SELECTOR_PORT and size == 4:
                self._dma((self.dma_high << 32) | _swap32(value))
                self.dma_high = 0

    def _data_byte(self) -> int:
        entry = self.entries.get(self.selector, b"")
        if self.offset >= len(entry):
            return 0
        byte = entry[self.offset]
        self.offset += 1
        return byte

    # --- DMA ------------------------------------------------------------------------------------

    def _dma(self, address: int) -> None:
        self.transfers += 1
        try:
            control, length, target = self.memory.unpack(DMA_ACCESS, address)
        except GuestMemoryError:
            self.errors += 1  # nowhere to answer: the request is dropped, as on QEMU
            return
        if control & DMA_SELECT:
            self.selector, self.offset = control >> 16, 0
        ok = True
        try:
            if control & DMA_READ:
                self._dma_read(target, length)
            elif control & DMA_SKIP:
                self.offset += length
            elif control & DMA_WRITE:
                ok = False  # no item is writable
        except GuestMemoryError:
            ok = False
        if not ok:
            self.errors += 1
        try:
            self.memory.write(address, struct.pack(">I", 0 if ok else DMA_ERROR))
        except GuestMemoryError:
            pass

    def _dma_read(self, target: int, length: int) -> None:
        entry = self.entries.get(self.selector, b"")
        data = entry[self.offset : self.offset + length]
        self.memory.write(target, data)
        for at in range(len(data), length, CHUNK):  # past the item's end: zeros
            self.memory.fill(target + at, min(CHUNK, length - at))
        self.offset += length


def _swap32(value: int) -> int:
    """The port's little-endian dword as the big-endian number the guest meant."""
    return int.from_bytes((value & 0xFFFFFFFF).to_bytes(4, "little"), "big")


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1
