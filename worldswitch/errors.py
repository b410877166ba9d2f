"""One exception hierarchy: the CLI turns every WorldswitchError into one line."""

import os


class WorldswitchError(Exception):
    """Root of every error worldswitch raises on purpose."""


class KvmError(WorldswitchError):
    """An ioctl on a KVM file descriptor failed; keeps the errno and the ioctl's name."""

    def __init__(self, request: str, errno: int, detail: str = "") -> None:
        self.request = request
        self.errno = errno
        message = f"{request} failed: {os.strerror(errno)} (errno {errno})"
        super().__init__(f"{message}: {detail}" if detail else message)


class KvmUnavailableError(WorldswitchError):
    """/dev/kvm is missing, not accessible, or speaks an API we do not know."""


class GuestMemoryError(WorldswitchError):
    """A guest-physical access fell outside guest RAM."""


class GuestImageError(WorldswitchError):
    """A guest program or kernel image cannot be loaded."""


class ConfigError(WorldswitchError):
    """The user asked for a machine that cannot be built."""


class BusError(WorldswitchError):
    """A device registration conflicts with another one."""
