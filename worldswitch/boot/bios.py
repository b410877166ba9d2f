"""Where the firmware files are: Debian's SeaBIOS and QEMU's kernel-loading option ROM. A leaf, so that
describing a machine (vmm/config.py, and with it every command's parser) does not load the loaders."""

SEABIOS = "/usr/share/seabios/bios-256k.bin"  # Debian's seabios package, as QEMU's pc machine uses it
LINUXBOOT_ROM = "/usr/share/qemu/linuxboot_dma.bin"  # QEMU's option ROM that boots a kernel from fw_cfg (qemu-system-data)


def firmware_path(choice: str) -> str:
    """`bios` is Debian's SeaBIOS; anything else is the path of another build."""
    return SEABIOS if choice == "bios" else choice
