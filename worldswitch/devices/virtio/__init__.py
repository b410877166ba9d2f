"""virtio 1.x devices (OASIS virtio 1.2) over PCI: the virtqueue (queue.py: split, packed.py: packed), the device base
(device.py), the PCI transport (pci.py), the I/O thread (worker.py) and one module per device."""

# Device status (2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# Reserved feature bits (6)
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34

# Device types (5)
NET = 1
BLOCK = 2
CONSOLE = 3
ENTROPY = 4

PCI_VENDOR_ID = 0x1AF4
PCI_DEVICE_ID_BASE = 0x1040  # modern devices: 0x1040 + device type (4.1.2.1)
