"""Naming the instruction behind a KVM_EXIT_INTERNAL_ERROR.

On hosts where KVM emulates guest kernel code (PVM), an instruction its emulator does not know
ends the guest with "internal error, suberror 1". A bare code helps nobody; this module decodes
enough x86 to name the usual suspects (the CMPXCHG16B and XSAVE families, AVX, system
instructions) from the bytes KVM reports.
"""

from __future__ import annotations

from typing import Callable

from ...driver import structs as s
from ...driver.constants import InternalError
from ...driver.exits import InternalErrorExit

_LEGACY_PREFIXES = {
    0xF0: "lock",
    0xF2: "repne",
    0xF3: "rep",
    0x66: "",
    0x67: "",
    0x2E: "",
    0x36: "",
    0x3E: "",
    0x26: "",
    0x64: "",
    0x65: "",
}

_ONE_BYTE = {
    0xF4: "hlt",
    0x9B: "fwait",
    0xFA: "cli",
    0xFB: "sti",
    0xCF: "iret",
    0xCC: "int3",
    0xCD: "int",
    0xE4: "in",
    0xE5: "in",
    0xEC: "in",
    0xED: "in",
    0xE6: "out",
    0xE7: "out",
    0xEE: "out",
    0xEF: "out",
    0x6C: "ins",
    0x6D: "ins",
    0x6E: "outs",
    0x6F: "outs",
    0x9C: "pushf",
    0x9D: "popf",
    0xA4: "movs",
    0xA5: "movs",
    0xAA: "stos",
    0xAB: "stos",
}

_TWO_BYTE = {
    0x05: "syscall",
    0x06: "clts",
    0x07: "sysret",
    0x08: "invd",
    0x09: "wbinvd",
    0x0B: "ud2",
    0x20: "mov from cr",
    0x21: "mov from dr",
    0x22: "mov to cr",
    0x23: "mov to dr",
    0x30: "wrmsr",
    0x31: "rdtsc",
    0x32: "rdmsr",
    0x33: "rdpmc",
    0x34: "sysenter",
    0x35: "sysexit",
    0xA2: "cpuid",
    0xB0: "cmpxchg",
    0xB1: "cmpxchg",
    0xC0: "xadd",
    0xC1: "xadd",
    0xC3: "movnti",
    0xB8: "jmpe",
    0xBC: "bsf",
    0xBD: "bsr",
}

# 0F 01 with mod=3: the ModRM byte selects the instruction.
_0F01_REG = {
    0xC1: "vmcall",
    0xC8: "monitor",
    0xC9: "mwait",
    0xCA: "clac",
    0xCB: "stac",
    0xD0: "xgetbv",
    0xD1: "xsetbv",
    0xD9: "vmmcall",
    0xF8: "swapgs",
    0xF9: "rdtscp",
}
_0F01_MEM = {0: "sgdt", 1: "sidt", 2: "lgdt", 3: "lidt", 4: "smsw", 6: "lmsw", 7: "invlpg"}
_0FAE_MEM = {0: "fxsave", 1: "fxrstor", 2: "ldmxcsr", 3: "stmxcsr", 4: "xsave", 5: "xrstor", 6: "xsaveopt", 7: "clflush"}
_0FAE_REG = {5: "lfence", 6: "mfence", 7: "sfence"}
_0FC7_MEM = {1: "cmpxchg8b", 3: "xrstors", 4: "xsavec", 5: "xsaves", 6: "vmptrld", 7: "vmptrst"}


def decode_mnemonic(code: bytes) -> str:
    """A best-effort name for the instruction at the start of `code` ("" if unknown)."""
    i = 0
    prefixes: list[str] = []
    mandatory_f3 = False
    while i < len(code) and code[i] in _LEGACY_PREFIXES:
        if _LEGACY_PREFIXES[code[i]]:
            prefixes.append(_LEGACY_PREFIXES[code[i]])
        mandatory_f3 = code[i] == 0xF3
        i += 1
    rex_w = False
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex_w = bool(code[i] & 0x08)
        i += 1
    if i >= len(code):
        return ""
    op = code[i]
    name = ""
    if op in (0xC4, 0xC5):
        name = "an AVX instruction (VEX-encoded)"
    elif op == 0x62:
        name = "an AVX-512 instruction (EVEX-encoded)"
    elif op in _ONE_BYTE:
        name = _ONE_BYTE[op]
    elif op == 0x0F and i + 1 < len(code):
        op2 = code[i + 1]
        modrm = code[i + 2] if i + 2 < len(code) else None
        reg = (modrm >> 3) & 7 if modrm is not None else -1
        register_form = modrm is not None and modrm >> 6 == 3
        if op2 == 0x01 and modrm is not None:
            name = _0F01_REG.get(modrm, "") if register_form else _0F01_MEM.get(reg, "")
        elif op2 == 0xAE and modrm is not None:
            name = _0FAE_REG.get(reg, "") if register_form else _0FAE_MEM.get(reg, "")
            if name in ("xsave", "xrstor", "xsaveopt", "fxsave", "fxrstor") and rex_w:
                name += "64"
        elif op2 == 0xC7 and modrm is not None and not register_form:
            name = "cmpxchg16b" if reg == 1 and rex_w else _0FC7_MEM.get(reg, "")
        elif op2 == 0xC7 and register_form:
            name = {6: "rdrand", 7: "rdseed/rdpid"}.get(reg, "")
        elif op2 in (0xB8, 0xBC, 0xBD) and mandatory_f3:
            name = {0xB8: "popcnt", 0xBC: "tzcnt", 0xBD: "lzcnt"}[op2]  # F3 is part of the opcode
            prefixes = [p for p in prefixes if p != "rep"]
        elif op2 in (0x38, 0x3A):
            name = "an SSSE3/SSE4/AES-NI/SHA instruction (0F 38/0F 3A map)"
        elif op2 in _TWO_BYTE:
            name = _TWO_BYTE[op2]
    if not name:
        return ""
    return " ".join(prefixes + [name]) if not name.startswith("an ") else name


def describe_internal_error(
    exit_: InternalErrorExit,
    vcpu_index: int,
    regs: s.kvm_regs,
    sregs: s.kvm_sregs,
    fetch: Callable[[int], bytes] | None = None,
) -> str:
    """One line that says what failed, where, and with which instruction bytes."""
    ring = sregs.cs.dpl
    where = f"vCPU {vcpu_index} at rip {regs.rip:#x} (ring {ring})"
    if exit_.suberror == InternalError.EMULATION:
        code = exit_.insn_bytes
        if not code and fetch is not None:
            try:
                code = fetch(regs.rip)
            except Exception:  # noqa: BLE001 - a best-effort look at guest memory
                code = b""
        shown = code.hex(" ") if code else "unavailable"
        mnemonic = decode_mnemonic(code) if code else ""
        what = f" = {mnemonic}" if mnemonic else ""
        hint = (
            "; KVM's instruction emulator cannot execute it (on a PVM host all guest kernel code is emulated: "
            "hide the feature from the guest's CPUID)"
        )
        return f"KVM failed to emulate an instruction on {where}: bytes {shown}{what}{hint}"
    if exit_.suberror == InternalError.DELIVERY_EV:
        return f"KVM could not deliver an event to the guest on {where} (exception during event delivery)"
    data = " ".join(f"{d:#x}" for d in exit_.data)
    return f"KVM internal error ({exit_.name}) on {where}; data: {data or 'none'}"
