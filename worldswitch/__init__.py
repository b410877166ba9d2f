"""worldswitch: a hackable hosted hypervisor on Linux KVM.

    worldswitch.vmx     the VMX: CLI, console, control API (what the user sees as "the VM")
    worldswitch.vmm     the VMM: machine, guest memory, vCPU threads, the run loop (the world switch)
    worldswitch.driver  the VMM driver binding: KVM's ioctl API
    worldswitch.devices emulated devices (front ends) with their host back ends
    worldswitch.boot    loaders and firmware tables
    worldswitch.guests  worldswitch's own guest programs
"""

__version__ = "0.1.0"
