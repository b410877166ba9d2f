"""Fetching a real Linux to boot: Debian's cloud kernel and busybox, with apt-get download and
dpkg-deb -x into a cache folder (nothing is installed on the host)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class DebianLinux:
    root: Path
    kernel: Path
    modules: Path
    busybox: Path

    @property
    def version(self) -> str:
        return self.modules.name


def _run(command: list[str], cwd: Path | None = None) -> str:
    if shutil.which(command[0]) is None:
        raise ConfigError(f"{command[0]} is not installed: fetching Debian packages needs a Debian-based host")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"{' '.join(command)} failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return result.stdout


def find_extracted(root: Path) -> DebianLinux | None:
    kernels = sorted(root.glob("boot/vmlinuz-*"))
    busybox = root / "bin" / "busybox"
    if not kernels or not busybox.exists():
        return None
    kernel = kernels[-1]
    version = kernel.name[len("vmlinuz-"):]
    return DebianLinux(root, kernel, root / "lib" / "modules" / version, busybox)


def kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> str:
    """The versioned package a metapackage depends on (linux-image-6.1.0-NN-cloud-amd64)."""
    for line in _run(["apt-cache", "depends", metapackage]).splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise ConfigError(f"apt-cache does not know which kernel {metapackage} stands for (run apt-get update?)")


def fetch_debian(cache: Path, metapackage: str = KERNEL_METAPACKAGE) -> DebianLinux:
    """Download and unpack the kernel and busybox into cache/, unless they are there already."""
    root = cache / "root"
    found = find_extracted(root)
    if found is not None:
        return found
    downloads = cache / "debs"
    downloads.mkdir(parents=True, exist_ok=True)
    packages = [kernel_package(metapackage), BUSYBOX_PACKAGE]
    _run(["apt-get", "download", *packages], cwd=downloads)
    for deb in sorted(downloads.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    found = find_extracted(root)
    if found is None:
        raise ConfigError(f"the packages in {downloads} did not contain a kernel and busybox")
    return found
