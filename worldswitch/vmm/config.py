"""What a machine is made of, as the user describes it (command line, machine file, API) and as a
snapshot records it: the program or kernel, memory, vCPUs and devices. The builder makes a
machine from it; nothing here touches KVM."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from ..errors import ConfigError
from ..guests import DEFAULT_GUEST, builtin_path
from .defaults import DEFAULT_CMDLINE, DEFAULT_LINUX_MEMORY, DEFAULT_MEMORY


@dataclass
class DiskConfig:
    path: str
    read_only: bool = False
    serial: str | None = None
    shared: bool = False  # read-only, and others may write it meanwhile (no write lock kept out)


@dataclass
class NetConfig:
    tap: str
    mac: str | None = None


@dataclass
class MachineConfig:
    memory: int | None = None  # bytes; None: 128 MiB for programs, 512 MiB for Linux
    cpus: int = 1
    elf: str | None = None  # a user's bare-metal ELF64 program
    guest: str | None = None  # or a built-in guest by name (the default when nothing is given)
    args: str = ""  # the program's argument string
    kernel: str | None = None  # or Linux: a bzImage or an ELF vmlinux
    initrd: str | None = None
    cmdline: str = DEFAULT_CMDLINE
    decompress: str = "auto"  # host, guest, or auto (host where guest kernel code is emulated)
    disks: list[DiskConfig] = field(default_factory=list)  # virtio-blk, in PCI slot order
    nets: list[NetConfig] = field(default_factory=list)  # virtio-net on tap devices
    rng: bool = False  # virtio-rng
    vconsole: str | None = None  # virtio-console back end: pty, file:PATH or none
    packed_queues: bool = False  # offer packed virtqueues (VIRTIO_F_RING_PACKED) on every virtio device

    def program(self) -> tuple[str, str]:
        """(display name, path) of what boots."""
        chosen = [what for what in (self.elf, self.guest, self.kernel) if what]
        if len(chosen) > 1:
            raise ConfigError("give one of a built-in guest, an ELF program or a Linux kernel")
        if self.initrd and not self.kernel:
            raise ConfigError("an initrd needs a Linux kernel (--kernel)")
        if self.kernel:
            return self.kernel, self.kernel
        if self.elf:
            return self.elf, self.elf
        name = self.guest or DEFAULT_GUEST
        return f"built-in guest '{name}'", str(builtin_path(name))

    @classmethod
    def from_dict(cls, data: dict) -> "MachineConfig":  # type: ignore[type-arg]
        """The inverse of dataclasses.asdict (snapshots store the description this way)."""
        data = dict(data)
        data["disks"] = [DiskConfig(**disk) for disk in data.get("disks", [])]
        data["nets"] = [NetConfig(**net) for net in data.get("nets", [])]
        return cls(**data)

    def absolute(self) -> "MachineConfig":
        """The same description with every file path absolute, so that a snapshot of it can be
        restored from any working directory."""
        def path(value: str | None) -> str | None:
            return os.path.abspath(value) if value else value

        vconsole = self.vconsole
        if vconsole is not None and vconsole.startswith("file:"):
            vconsole = "file:" + os.path.abspath(vconsole[5:])
        return replace(self, elf=path(self.elf), kernel=path(self.kernel), initrd=path(self.initrd),
                       disks=[replace(d, path=os.path.abspath(d.path)) for d in self.disks],
                       nets=[replace(n) for n in self.nets], vconsole=vconsole)

    @property
    def memory_bytes(self) -> int:
        if self.memory is not None:
            return self.memory
        return DEFAULT_LINUX_MEMORY if self.kernel else DEFAULT_MEMORY
