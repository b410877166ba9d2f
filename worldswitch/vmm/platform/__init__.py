"""The platform around the CPUs: buses (port I/O, MMIO), interrupt lines and routes, and the PCI
wiring of devices (BARs, MSI-X routes, ioeventfds)."""
