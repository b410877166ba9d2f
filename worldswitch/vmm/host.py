"""What kind of KVM host this is: it decides what guest code costs (and what it can execute).

    vmx  Intel VT-x (kvm_intel): every guest ring runs natively
    svm  AMD-V (kvm_amd): the same
    pvm  PVM (kvm_pvm, no VT-x/AMD-V): guest ring 3 runs natively, guest ring 0 and real mode are
         emulated by KVM's instruction emulator (about 1 M instructions/s), shadow paging
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

from ..driver.constants import REQUIRED_CAPS, USEFUL_CAPS
from ..driver.kvm import Kvm
from ..record import record

SYS_MODULE = Path("/sys/module")
DMI = Path("/sys/class/dmi/id")


@record(frozen=True)
class HostKind:
    driver: str  # "vmx", "svm", "pvm" or "unknown"
    nested_paging: bool | None
    description: str
    # Set where this host is itself a virtual machine (the CPU's "hypervisor" flag): what it says it
    # is, from its firmware's DMI table and its hypervisor's CPUID signature. Nested hosts run guests
    # slower, and under an emulated CPU (QEMU's TCG), much slower and with the emulator's own bugs.
    virtual_machine: str | None = None
    hypervisor_signature: str | None = None  # CPUID leaf 0x40000000 (KVMKVMKVM, TCGTCGTCGTCG, ...)
    # Set where the host's user mode runs with protection keys on (CR4.PKE; its CPUID's OSPKE), which
    # a PVM guest's ring 3 runs with too (x86/cpuid.py PROTECTION_KEYS).
    ring3_protection_keys: bool = False

    @property
    def cpu_emulated(self) -> bool:
        """This host's own CPU is QEMU's software emulation (TCG): nested, on no hardware support."""
        return self.hypervisor_signature == "TCGTCGTCGTCG"

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


# cpuid(leaf, subleaf, out[4]) for the SysV ABI: Python has no other way to run CPUID, and the kernel's
# /dev/cpu/N/cpuid needs a module that is often not loaded.
_CPUID_CODE = bytes([
    0x53,                    # push rbx
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """EAX, EBX, ECX, EDX of this CPU's CPUID, or None where the host refuses executable memory."""
    try:
        code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return None
    with code:
        code.write(_CPUID_CODE)
        out = (ctypes.c_uint32 * 4)()
        function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(
            ctypes.addressof(ctypes.c_char.from_buffer(code)))
        function(leaf, subleaf, ctypes.addressof(out))
        del function  # the buffer export must end before the mapping closes
        return out[0], out[1], out[2], out[3]


def hypervisor_signature() -> str | None:
    """The 12-byte vendor signature at CPUID 0x40000000 (SDM: reserved for hypervisors)."""
    registers = host_cpuid(0x40000000)
    if registers is None:
        return None
    raw = b"".join(value.to_bytes(4, "little") for value in registers[1:])
    return raw.rstrip(b"\0").decode("ascii", "replace") or None


HYPERVISORS = {"KVMKVMKVM": "KVM", "TCGTCGTCGTCG": "QEMU's TCG (an emulated CPU)", "Microsoft Hv": "Hyper-V",
               "VMwareVMware": "VMware", "XenVMMXenVMM": "Xen"}


def _virtual_machine(flags: set[str], signature: str | None) -> str | None:
    if "hypervisor" not in flags:
        return None
    try:
        names = [(DMI / name).read_text().strip() for name in ("sys_vendor", "product_name")]
        platform = " ".join(dict.fromkeys(name for name in names if name))
    except OSError:
        platform = ""
    under = f" under {HYPERVISORS.get(signature, signature)}" if signature else ""
    return f"a virtual machine{f' ({platform})' if platform else ''}{under}"


def detect_host_kind(flags: set[str] | None = None) -> HostKind:
    flags = cpu_flags() if flags is None else flags
    signature = hypervisor_signature() if "hypervisor" in flags else None
    inside = _virtual_machine(flags, signature)
    nested = f"; nested: this host is itself {inside}" if inside else ""
    if (SYS_MODULE / "kvm_intel").exists() and "vmx" in flags:
        ept = _param("kvm_intel", "ept") in ("Y", "1")
        return HostKind("vmx", ept, "Intel VT-x: guest code runs natively in every ring"
                        + ("; nested paging (EPT)" if ept else "; shadow paging (EPT off)") + nested, inside, signature)
    if (SYS_MODULE / "kvm_amd").exists() and "svm" in flags:
        npt = _param("kvm_amd", "npt") in ("Y", "1")
        return HostKind("svm", npt, "AMD-V: guest code runs natively in every ring"
                        + ("; nested paging (NPT)" if npt else "; shadow paging (NPT off)") + nested, inside, signature)
    if (SYS_MODULE / "kvm_pvm").exists():
        return HostKind(
            "pvm", False,
            "PVM (no VT-x/AMD-V): guest ring-3 code runs natively, guest ring-0 and real-mode code is "
            "emulated by KVM; shadow paging" + nested + ". Linux guests boot slowly here (minutes).", inside, signature,
            "ospke" in flags,
        )
    return HostKind("unknown", None, "a KVM vendor module worldswitch does not recognise" + nested, inside, signature)


@record(frozen=True)
class KvmFacts:
    """What this host's KVM answers: its API version and the capabilities worldswitch asks about."""

    api_version: int
    capabilities: dict[str, int]  # by name, in the order asked: the required ones first

    @property
    def required_missing(self) -> list[str]:
        return [cap.name for cap in REQUIRED_CAPS if not self.capabilities[cap.name]]



def required_capabilities() -> set[str]:
    """The capabilities worldswitch cannot run without, by name."""
    return {cap.name for cap in REQUIRED_CAPS}


def probe_kvm(kvm_path: str) -> KvmFacts:
    with Kvm(kvm_path) as kvm:
        return KvmFacts(kvm.get_api_version(),
                        {cap.name: kvm.check_extension(cap) for cap in (*REQUIRED_CAPS, *USEFUL_CAPS)})
