"""What kind of KVM host this is: it decides what guest code costs (and what it can execute).

    vmx  Intel VT-x (kvm_intel): every guest ring runs natively
    svm  AMD-V (kvm_amd): the same
    pvm  PVM (kvm_pvm, no VT-x/AMD-V): guest ring 3 runs natively, guest ring 0 and real mode are
         emulated by KVM's instruction emulator (about 1 M instructions/s), shadow paging
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SYS_MODULE = Path("/sys/module")


@dataclass(frozen=True)
class HostKind:
    driver: str  # "vmx", "svm", "pvm" or "unknown"
    nested_paging: bool | None
    description: str

    @property
    def kernel_code_emulated(self) -> bool:
        """True where a guest kernel's own code runs through KVM's emulator."""
        return self.driver == "pvm"


def _param(module: str, name: str) -> str | None:
    try:
        return (SYS_MODULE / module / "parameters" / name).read_text().strip()
    except OSError:
        return None


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_host_kind(flags: set[str] | None = None) -> HostKind:
    flags = cpu_flags() if flags is None else flags
    if (SYS_MODULE / "kvm_intel").exists() and "vmx" in flags:
        ept = _param("kvm_intel", "ept") in ("Y", "1")
        return HostKind("vmx", ept, "Intel VT-x: guest code runs natively in every ring"
                        + ("; nested paging (EPT)" if ept else "; shadow paging (EPT off)"))
    if (SYS_MODULE / "kvm_amd").exists() and "svm" in flags:
        npt = _param("kvm_amd", "npt") in ("Y", "1")
        return HostKind("svm", npt, "AMD-V: guest code runs natively in every ring"
                        + ("; nested paging (NPT)" if npt else "; shadow paging (NPT off)"))
    if (SYS_MODULE / "kvm_pvm").exists():
        return HostKind(
            "pvm", False,
            "PVM (no VT-x/AMD-V): guest ring-3 code runs natively, guest ring-0 and real-mode code is "
            "emulated by KVM; shadow paging. Linux guests boot slowly here (minutes).",
        )
    return HostKind("unknown", None, "a KVM vendor module worldswitch does not recognise")


def emulated_kernel_parameters(cmdline: str) -> list[tuple[str, str]]:
    """(parameter, reason) a Linux guest needs where its kernel code is emulated, beyond CPUID
    (cpuid.kernel_parameters): work that takes milliseconds natively but so long emulated that
    the kernel gives up on it. Measured in docs/pvm.md; a parameter the user set is left alone."""
    words = cmdline.split()
    added = []
    if not any(word.startswith("cryptomgr.notests") for word in words):
        added.append(("cryptomgr.notests", "the crypto self-tests (RSA with private keys) take tens of minutes emulated, "
                                           "and certificate loading times out waiting for them"))
    return added
