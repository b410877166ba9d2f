"""Fetching a real Linux to boot: Debian's cloud kernel and busybox, with apt-get download and
dpkg-deb -x into a cache folder (nothing is installed on the host). From the host's own apt
sources, or from a named Debian release on deb.debian.org, through an apt configuration of the
cache's own (its package lists there too), signed as the host's apt checks any: by the keys of
debian-archive-keyring."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MIRROR = "http://deb.debian.org/debian"
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
RELEASES = ("bookworm", "trixie", "forky", "sid")  # 12, 13, the testing of 2026, unstable


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


def _unpacked(root: Path, relative: str) -> Path | None:
    """`relative` as a package unpacked into `root` has it: Debian 13's packages put /bin and /lib
    under /usr (merged /usr), 12's do not."""
    return next((path for path in (root / relative, root / "usr" / relative) if path.exists()), None)


def find_extracted(root: Path) -> DebianLinux | None:
    kernels = sorted(root.glob("boot/vmlinuz-*"))
    busybox = _unpacked(root, "bin/busybox")
    if not kernels or busybox is None:
        return None
    kernel = kernels[-1]
    version = kernel.name[len("vmlinuz-"):]
    modules = _unpacked(root, f"lib/modules/{version}") or root / "lib" / "modules" / version
    return DebianLinux(root, kernel, modules, busybox)


def release_cache(base: Path, release: str | None) -> Path:
    """The cache folder for `release` beside the host's own (`base`): .cache/debian, .cache/debian-trixie."""
    return base if release is None else base.with_name(f"{base.name}-{release}")


def apt_options(cache: Path, release: str | None) -> list[str]:
    """apt's options for `release` from deb.debian.org, with its state in `cache`/apt (none: the
    host's own sources and state)."""
    if release is None:
        return []
    if release not in RELEASES:
        raise ConfigError(f"unknown Debian release {release!r}: one of {', '.join(RELEASES)}")
    if not ARCHIVE_KEYRING.exists():
        raise ConfigError(f"{ARCHIVE_KEYRING} is missing: fetching from Debian's mirror needs debian-archive-keyring")
    apt = cache / "apt"
    for folder in ("lists/partial", "cache/archives/partial"):
        (apt / folder).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"deb [signed-by={ARCHIVE_KEYRING}] {MIRROR} {release} main\n")
    return ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
            "-o", "Dir::State::Status=/dev/null", "-o", "APT::Architecture=amd64",
            "-o", "Debug::NoLocking=true"]


def kernel_package(metapackage: str = KERNEL_METAPACKAGE, options: list[str] | None = None) -> str:
    """The versioned package a metapackage depends on (linux-image-6.1.0-NN-cloud-amd64)."""
    for line in _run(["apt-cache", *(options or []), "depends", metapackage]).splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise ConfigError(f"apt-cache does not know which kernel {metapackage} stands for (run apt-get update?)")


def fetch_debian(cache: Path, metapackage: str = KERNEL_METAPACKAGE, release: str | None = None) -> DebianLinux:
    """Download and unpack the kernel and busybox into cache/, unless they are there already: from
    the host's apt sources, or from Debian's `release`."""
    root = cache / "root"
    found = find_extracted(root)
    if found is not None:
        return found
    options = apt_options(cache, release)
    if options:
        _run(["apt-get", *options, "update"])
    downloads = cache / "debs"
    downloads.mkdir(parents=True, exist_ok=True)
    packages = [kernel_package(metapackage, options), BUSYBOX_PACKAGE]
    _run(["apt-get", *options, "download", *packages], cwd=downloads)
    for deb in sorted(downloads.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    found = find_extracted(root)
    if found is None:
        raise ConfigError(f"the packages in {downloads} did not contain a kernel and busybox")
    return found
