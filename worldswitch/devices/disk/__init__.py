"""Disk images, as a block device's back end: raw files and block devices (raw.py), and QEMU's qcow2
format with backing files (qcow2.py). A device sees a DiskImage: a size, vectored reads and writes at
byte offsets, flush, and what the format can do with discards.

The format is the user's to name (`--disk PATH,format=qcow2`) or probed from the image's first bytes.
A probed raw image never lets its guest write an image format's signature into its first sector:
otherwise the guest could make the next run open it as qcow2 with a backing file of its choosing,
anywhere on the host (QEMU refuses the same write for the same reason).
"""

FORMATS = ("raw", "qcow2")  # here, not in image.py: checking a --disk option needs no more than the names
