"""worldswitch: a hackable hosted hypervisor on Linux KVM.

    worldswitch.vmx     the VMX: CLI, console, control API (what the user sees as "the VM")
    worldswitch.vmm     the VMM: machine, guest memory, vCPU threads, the run loop (the world switch)
    worldswitch.driver  the VMM driver binding: KVM's ioctl API
    worldswitch.devices emulated devices (front ends) with their host back ends
    worldswitch.boot    loaders and firmware tables
    worldswitch.guests  worldswitch's own guest programs
"""

from .version import __version__

__all__ = ["Machine", "__version__"]


def __getattr__(name: str) -> object:
    # `from worldswitch import Machine` without importing the VMM for `worldswitch --version`
    if name == "Machine":
        from .vmx.api import Machine

        return Machine
    raise AttributeError(f"module 'worldswitch' has no attribute {name!r}")
