"""Fetching a real Linux to boot: Debian's cloud kernel and busybox, with apt-get download and
dpkg-deb -x into a cache folder (nothing is installed on the host). From the host's own apt
sources, or from a named Debian release on deb.debian.org, through an apt configuration of the
cache's own (its package lists there too), signed as the host's apt checks any: by the keys of
debian-archive-keyring."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError
from ..record import record

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MIRROR = "http://deb.debian.org/debian"
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
RELEASES = ("bookworm", "trixie", "forky", "sid")  # 12, 13, the testing of 2026, unstable


@record(frozen=True)
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
        lines = result.stderr.strip().splitlines()
        # apt's first error names what failed and why; its last is often only a summary
        why = next((line for line in lines if line.startswith("E: ")), lines[-1] if lines else result.returncode)
        raise ConfigError(f"{' '.join(command)} failed: {why}")
    return result.stdout


def _unpacked(root: Path, relative: str) -> Path | None:
    """`relative` as a package unpacked into `root` has it: Debian 13's packages put /bin and /lib
    under /usr (merged /usr), 12's do not."""
    return next((path for path in (root / relative, root / "usr" / relative) if path.exists()), None)


def find_extracted(root: Path) -> DebianLinux | None:
    """The kernel, modules and busybox unpacked into `root`: the kernel at /boot/vmlinuz-V (up to
    Debian 13) or /usr/lib/modules/V/vmlinuz (Debian 14's linux-binary-V)."""
    kernels = {path.name[len("vmlinuz-"):]: path for path in root.glob("boot/vmlinuz-*")}
    kernels.update({path.parent.name: path for path in root.glob("usr/lib/modules/*/vmlinuz")})
    busybox = _unpacked(root, "bin/busybox")
    if not kernels or busybox is None:
        return None
    version = sorted(kernels)[-1]
    modules = _unpacked(root, f"lib/modules/{version}") or root / "lib" / "modules" / version
    return DebianLinux(root, kernels[version], modules, busybox)


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


def _depends(package: str, options: list[str]) -> list[str]:
    lines = (line.strip() for line in _run(["apt-cache", *options, "depends", package]).splitlines())
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Depends:")]


def kernel_packages(metapackage: str = KERNEL_METAPACKAGE, options: list[str] | None = None) -> list[str]:
    """The versioned package a metapackage depends on (linux-image-6.1.0-NN-cloud-amd64), and the
    packages of the same version it depends on in turn: Debian 14 splits a kernel into its image
    (linux-binary-V: /usr/lib/modules/V/vmlinuz), its modules (linux-modules-V) and the rest
    (linux-base-V: modules.builtin), with linux-image-V only depending on them."""
    options = options or []
    image = next((name for name in _depends(metapackage, options) if name.startswith("linux-image-")), None)
    if image is None:
        raise ConfigError(f"apt-cache does not know which kernel {metapackage} stands for (run apt-get update?)")
    version = image[len("linux-image-"):]
    return [image, *(name for name in _depends(image, options) if name.endswith(f"-{version}") and name.startswith("linux-"))]


def fetch_debian(cache: Path, metapackage: str = KERNEL_METAPACKAGE, release: str | None = None) -> DebianLinux:
    """Download and unpack the kernel and busybox into cache/, unless they are there already: from
    the host's apt sources, or from Debian's `release`."""
    cache = cache.absolute()  # apt reads a relative Dir:: path as under its own /var/lib/apt
    root = cache / "root"
    found = find_extracted(root)
    if found is not None:
        return found
    options = apt_options(cache, release)
    if options:
        # --error-on=any: an index that failed to download fails the update, which otherwise exits 0
        # and leaves the lists empty (seen in a nested host without its network): apt-cache then knew
        # no kernel, which said nothing of why
        _run(["apt-get", *options, "--error-on=any", "update"])
    downloads = cache / "debs"
    downloads.mkdir(parents=True, exist_ok=True)
    packages = [*kernel_packages(metapackage, options), BUSYBOX_PACKAGE]
    _run(["apt-get", *options, "download", *packages], cwd=downloads)
    for deb in sorted(downloads.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    found = find_extracted(root)
    if found is None:
        raise ConfigError(f"the packages in {downloads} did not contain a kernel and busybox")
    return found
