"""Opening a disk image in its format, named by the user or probed from its first bytes."""


from __future__ import annotations

import os
from typing import Callable

from ...errors import ConfigError
from . import FORMATS
from .image import DiskImage, open_file, probe
from .qcow2 import MAX_BACKING_DEPTH, Qcow2Image
from .raw import RawImage


def open_disk(path: str, read_only: bool, shared: bool = False, format: str | None = None,
              depth: int = 0) -> DiskImage:
    """The image at `path` in `format` (None: probed), opened and locked."""
    if format is not None and format not in FORMATS:
        raise ConfigError(f"disk image {path}: unknown format {format!r} (known: {', '.join(FORMATS)})")
    fd = open_file(path, read_only, shared)
    try:
        chosen = format or probe(fd)
        if chosen == "qcow2":
            return Qcow2Image(fd, path, read_only, _open_backing(depth + 1))
        return RawImage(fd, path, read_only, probed=format is None)
    except BaseException:
        os.close(fd)
        raise


def _open_backing(depth: int) -> Callable[[str, str | None], DiskImage]:
    def open_backing(path: str, format: str | None) -> DiskImage:
        if depth > MAX_BACKING_DEPTH:
            raise ConfigError(f"disk image {path}: more than {MAX_BACKING_DEPTH} backing files deep (a loop?)")
        return open_disk(path, read_only=True, format=format, depth=depth)

    return open_backing
