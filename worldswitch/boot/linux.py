"""Booting Linux through the x86 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit
Boot Protocol"): place the kernel, the initrd and the command line, fill the zero page
(struct boot_params, with the e820 map and the ACPI RSDP), and name the entry point.

Two ways to place the kernel:
  - vmlinux: an ELF at its physical addresses, entered at its ELF entry (startup_64), as Firecracker
    does; a bzImage can be turned into one by decompressing its payload on the host (bzimage.py),
    so the guest skips its decompressor. This is the default where guest kernel code is emulated.
  - bzImage: the protected-mode kernel at 1 MiB, entered at its 64-bit entry (load address +
    0x200); the guest decompresses itself.
Both enter in long mode with RSI pointing at the zero page and the GDT selectors the protocol
requires (__BOOT_CS 0x10, __BOOT_DS 0x18).
"""

from __future__ import annotations

import ctypes
import time
from typing import Protocol, Sequence

from ..errors import ConfigError, GuestImageError
from ..memory.guest import GuestMemory
from ..memory.layout import MemoryMap, RegionKind
from ..record import field, record
from . import bootparams as bp
from .bzimage import BzImage, check_header, check_kernel_length, extract_vmlinux, is_bzimage, parse_bzimage
from .elf import load_elf

ZERO_PAGE = 0x7000
CMDLINE_ADDR = 0x20000
CMDLINE_AREA_END = 0x80000  # the command line must end below the VMM's stack
BZIMAGE_LOAD_ADDR = 0x100000
BZIMAGE_64BIT_ENTRY = 0x200  # boot.rst: "the 64-bit entry point is at load address + 0x200"
DEFAULT_CMDLINE_SIZE = 2048  # x86 COMMAND_LINE_SIZE, for a vmlinux that carries no header
VMLINUX_ALIGNMENT = 0x200000
INITRD_ALIGNMENT = 0x1000
HEAP_END = 0xFE00  # for setup code that never runs here, set as real boot loaders do
LOW_MEMORY_END = 0x100000  # nothing of Linux's goes below 1 MiB but the zero page and command line

DECOMPRESS_CHOICES = ("auto", "host", "guest")


@record(frozen=True)
class LinuxBoot:
    """What was placed where, for the vCPU set-up and for the user."""

    mode: str  # "vmlinux" (entered at startup_64) or "bzimage" (the guest decompresses)
    entry: int
    zero_page: int
    kernel: tuple[int, int]  # [start, end)
    initrd: tuple[int, int] | None
    cmdline: str
    version: str
    compression: str = ""
    decompress_s: float = 0.0  # host decompression time, when the vmlinux came from a bzImage
    notes: list[str] = field(default_factory=list)
    iret_site: int = 0  # its IRETQ to user mode, made a UD2 for the monitor (paravirt.py); 0 if untouched
    sysret_site: int = 0  # its SWAPGS before SYSRETQ, made a jump to the monitor (paravirt.py); 0 if untouched
    ap_entry: int = 0  # where its trampoline enters an AP's kernel, for the monitor to take it over; 0 if unknown
    flag_traps: bool = False  # without PARAVIRT_XXL: its PUSHFs and POPFs made to trap for the monitor (flag_sites.py)
    code_cache: bytes = b""  # without PARAVIRT_XXL: its translated sites, for the monitor's code cache (translator.py)


def e820_map(memory_map: MemoryMap) -> list[tuple[int, int, int]]:
    """(address, size, type) for the e820 table, from the one memory map."""
    kinds = {RegionKind.RAM: bp.E820_RAM, RegionKind.RESERVED: bp.E820_RESERVED, RegionKind.DEVICE: bp.E820_RESERVED}
    return [(r.start, r.size, kinds[r.kind]) for r in memory_map.regions if r.kind in kinds]


def build_zero_page(
    header: bytes | None,
    memory_map: MemoryMap,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    rsdp_address: int,
) -> bp.boot_params:
    """boot_params: the kernel's own setup header when there is one (boot.rst: copy it, then fill
    in what the loader owns), a synthesised one for a bare vmlinux."""
    params = bp.boot_params()
    hdr_offset = bp.boot_params.hdr.offset
    if header is not None:
        ctypes.memmove(ctypes.addressof(params) + hdr_offset, header, len(header))
    else:
        params.hdr.boot_flag = bp.BOOT_FLAG
        params.hdr.header = bp.HDRS_MAGIC
        params.hdr.version = 0x020F
        params.hdr.kernel_alignment = 0x1000000
        params.hdr.loadflags = bp.LOADED_HIGH
    hdr = params.hdr
    hdr.type_of_loader = bp.TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags |= bp.CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END
    hdr.cmd_line_ptr = cmdline_addr
    if initrd is not None:
        start, end = initrd
        hdr.ramdisk_image = start & 0xFFFFFFFF
        hdr.ramdisk_size = (end - start) & 0xFFFFFFFF
        params.ext_ramdisk_image = start >> 32
        params.ext_ramdisk_size = (end - start) >> 32
    params.acpi_rsdp_addr = rsdp_address
    entries = e820_map(memory_map)
    if len(entries) > bp.E820_MAX_ENTRIES_ZEROPAGE:
        raise ConfigError(f"the memory map has {len(entries)} regions; the zero page holds 128")
    for i, (address, size, kind) in enumerate(entries):
        params.e820_table[i] = bp.boot_e820_entry(address, size, kind)
    params.e820_entries = len(entries)
    return params


def choose_decompression(requested: str, kernel_code_emulated: bool) -> str:
    if requested not in DECOMPRESS_CHOICES:
        raise ConfigError(f"--decompress must be host or guest, not {requested!r}")
    if requested == "auto":
        # Where the guest decompressor would run emulated (PVM: about 160 s for a Debian kernel),
        # do it on the host in well under a second; on VT-x/AMD-V let the kernel do its own work.
        return "host" if kernel_code_emulated else "guest"
    return requested


def place_initrd(memory_map: MemoryMap, size: int, above: int, initrd_addr_max: int, name: str) -> tuple[int, int]:
    """The highest page-aligned spot for the initrd in one range of RAM, ending at or below
    initrd_addr_max and below the PCI hole, and starting above the kernel (boot.rst: "as high as
    possible")."""
    ceiling = min(initrd_addr_max + 1, memory_map.top_of_low_ram)
    for region in sorted(memory_map.ram(), key=lambda r: r.end, reverse=True):
        top = min(ceiling, region.end)
        start = (top - size) & ~(INITRD_ALIGNMENT - 1)
        if size and start >= max(region.start, above):
            return start, start + size
    room = max(0, ceiling - above)
    raise GuestImageError(
        f"initrd {name} ({size >> 20} MiB) does not fit between the kernel (ends at {above:#x}) and "
        f"{ceiling:#x} ({room >> 20} MiB free); give the machine more memory"
    )


class CpuFeature(Protocol):
    """A CPU feature a kernel can be told not to use."""

    @property
    def name(self) -> str: ...

    @property
    def linux_feature(self) -> int:
        """X86_FEATURE_* number (word * 32 + bit), as clearcpuid= takes it."""


def kernel_parameters(cmdline: str, refused: Sequence[CpuFeature], code_emulated: bool,
                      monitor: bool = False, cpus: int = 1) -> list[tuple[str, str]]:
    """(parameter, reason) a kernel needs beyond what the user wrote: not to use the `refused` CPU
    features, which KVM's emulator (or, under the in-guest `monitor`, the kernel's ring 3) cannot run
    although the kernel's CPUID shows them (the host forces them into KVM's table; under the monitor
    CPUID runs natively in ring 3), and, where guest kernel code is emulated (not under the monitor),
    not to start work that takes milliseconds natively but so long emulated that the kernel gives up
    on it (measured in docs/pvm.md); under the monitor with more than one CPU, not to use PV spinlocks.
    A parameter the user set is left alone."""
    words = cmdline.split()
    added: list[tuple[str, str]] = []

    def why(names: str, instructions: str) -> str:
        if monitor:
            return (f"under the monitor the kernel's CPUID runs natively in ring 3 and may show the host CPU's "
                    f"{names}, which the monitor does not give the kernel")
        return f"the host forces {names} into the guest's CPUID, and KVM's emulator runs {instructions}"

    if any(f.name == "xsave" for f in refused) and "noxsave" not in words:
        added.append(("noxsave", why("XSAVE", "no XRSTOR")))
    rest = [f for f in refused if f.name != "xsave"]
    if rest and not any(word.startswith("clearcpuid=") for word in words):
        numbers = ",".join(str(f.linux_feature) for f in rest)
        added.append((f"clearcpuid={numbers}", why(", ".join(f.name for f in rest), "none of them")))
    if monitor and cpus > 1 and "nopvspin" not in words:
        added.append(("nopvspin", "under the monitor the kernel runs in ring 3, where KVM takes no hypercall: a CPU "
                                  "halted in a PV spinlock would never be kicked (KVM_HC_KICK_CPU)"))
    if code_emulated and not monitor and not any(word.startswith("cryptomgr.notests") for word in words):
        added.append(("cryptomgr.notests", "the crypto self-tests (RSA with private keys) take tens of minutes emulated, "
                                           "and certificate loading times out waiting for them"))
    return added


def load_linux(
    memory: GuestMemory,
    memory_map: MemoryMap,
    kernel_image: bytes,
    kernel_name: str,
    initrd_image: bytes | None,
    initrd_name: str,
    cmdline: str,
    decompress: str,
    kernel_code_emulated: bool,
    rsdp_address: int,
    pv_ops: dict[str, int] | None = None,
) -> LinuxBoot:
    """Place a bzImage or an ELF vmlinux, its initrd and command line, and the zero page. With
    `pv_ops`, the vmlinux is made ready for the in-guest monitor (paravirt.py): its paravirtual
    interrupt flag and MSR writes go to those functions, its IRETQ to user mode traps."""
    bz: BzImage | None = None
    notes: list[str] = []
    if is_bzimage(kernel_image):
        bz = parse_bzimage(kernel_image, kernel_name)
    elif not kernel_image.startswith(b"\x7fELF"):
        raise GuestImageError(f"{kernel_name} is not a Linux kernel: neither a bzImage ('HdrS' header) nor an ELF vmlinux")
    cmdline_size = bz.header.cmdline_size if bz is not None and bz.header.cmdline_size else DEFAULT_CMDLINE_SIZE
    encoded = cmdline.encode()
    if len(encoded) >= cmdline_size or b"\0" in encoded:
        raise ConfigError(f"the kernel command line is {len(encoded)} bytes; this kernel takes at most {cmdline_size - 1}")
    if CMDLINE_ADDR + len(encoded) + 1 > CMDLINE_AREA_END:
        raise ConfigError("the kernel command line is too long for the space below the VMM's stack")

    decompress_s = 0.0
    iret_site = sysret_site = ap_entry = 0
    flag_traps = False
    code_cache = b""
    compression = bz.compression if bz is not None else "none"
    mode = choose_decompression(decompress, kernel_code_emulated) if bz is not None else "host"
    if bz is not None and mode == "host":
        started = time.perf_counter()
        vmlinux = extract_vmlinux(bz)
        decompress_s = time.perf_counter() - started
        notes.append(f"decompressed its {compression} payload on the host in {decompress_s * 1000:.0f} ms")
    elif bz is None:
        vmlinux = kernel_image
    else:
        vmlinux = b""

    if pv_ops is not None:
        if not vmlinux:
            raise ConfigError("a paravirtual interrupt flag needs the kernel decompressed on the host (--decompress host)")
        vmlinux, iret_site, sysret_site, ap_entry, flag_traps, code_cache = _paravirtualize(vmlinux, pv_ops, notes)

    if vmlinux:
        kernel_range, entry = _load_vmlinux(memory, memory_map, vmlinux, kernel_name, [])
        boot_mode = "vmlinux"
    else:
        assert bz is not None
        init_size = bz.header.init_size or len(bz.kernel)
        # The decompressor works in place from the load address, or moves up to pref_address:
        # it needs init_size bytes from whichever is higher.
        end = max(BZIMAGE_LOAD_ADDR, bz.header.pref_address) + init_size
        if not memory.contains(BZIMAGE_LOAD_ADDR, end - BZIMAGE_LOAD_ADDR):
            raise GuestImageError(
                f"{kernel_name} needs {end >> 20} MiB of RAM below its end to decompress itself; give the machine more memory"
            )
        memory.write(BZIMAGE_LOAD_ADDR, bz.kernel)
        kernel_range = (BZIMAGE_LOAD_ADDR, end)
        entry = BZIMAGE_LOAD_ADDR + BZIMAGE_64BIT_ENTRY
        boot_mode = "bzimage"

    initrd = None
    if initrd_image is not None:
        addr_max = bz.header.initrd_addr_max if bz is not None and bz.header.initrd_addr_max else 0x7FFFFFFF
        initrd = place_initrd(memory_map, len(initrd_image), kernel_range[1], addr_max, initrd_name)
        memory.write(initrd[0], initrd_image)

    memory.write(CMDLINE_ADDR, encoded + b"\0")
    header = bz.header_bytes if bz is not None else None
    params = build_zero_page(header, memory_map, CMDLINE_ADDR, initrd, rsdp_address)
    memory.write(ZERO_PAGE, bytes(params))
    version = bz.version_string if bz is not None else ""
    return LinuxBoot(boot_mode, entry, ZERO_PAGE, kernel_range, initrd, cmdline, version, compression, decompress_s, notes,
                     iret_site, sysret_site, ap_entry, flag_traps, code_cache)


def _paravirtualize(vmlinux: bytes, pv_ops: dict[str, int],
                    notes: list[str]) -> tuple[bytes, int, int, int, bool, bytes]:
    """The vmlinux made ready for the in-guest monitor (paravirt.py), its IRETQ site, its SWAPGS
    before SYSRETQ (0 if it was left to trap), where its APs enter it (0 if unknown), whether its
    PUSHFs and POPFs were made to trap and the code cache of its translated sites (a kernel without
    PARAVIRT_XXL)."""
    from .paravirt import paravirtualize

    paravirtualized = paravirtualize(vmlinux, pv_ops)
    iret_site = paravirtualized.iret_site
    if paravirtualized.xxl:
        notes.append(f"pointed pv_ops at the monitor: irq ({paravirtualized.sites} call sites, each kept a call), "
                     f"cpu.write_msr and load_gs_index ({paravirtualized.cpu_sites}), mmu.read_cr2 and write_cr3 "
                     f"({paravirtualized.mmu_sites}); {paravirtualized.alternatives} native alternatives over the irq "
                     "and mmu calls disarmed")
    else:
        notes.append(f"the kernel has no PARAVIRT_XXL: its {paravirtualized.flag_sites.pushf} PUSHFs and "
                     f"{paravirtualized.flag_sites.popf} POPFs made to trap, its other privileged instructions trap "
                     "as they are")
        translation = paravirtualized.translation
        if translation.refused:
            notes.append(f"its sensitive instructions not translated: {translation.refused}")
        else:
            reasons = "; ".join(f"{reason}: {count}" for reason, count in translation.left.most_common())
            notes.append(f"translated {translation.sites} sensitive instructions (CLI, STI, PUSHF, MOV to CR3, MOV "
                         f"from CR2, WRMSR, INVLPG) in {translation.windows} windows "
                         f"({len(translation.cache)} bytes of code cache); left to trap: {sum(translation.left.values())}"
                         + (f" ({reasons})" if reasons else "")
                         + f"; {translation.calls} calls of asm_load_gs_index made the monitor's load_gs_index")
    notes.append(f"its IRETQ to user mode at {iret_site:#x} made a UD2")
    if paravirtualized.kernel_return_site is not None:
        notes.append(f"its return to itself at {paravirtualized.kernel_return_site:#x} "
                     "(restore_regs_and_return_to_kernel) pointed at the monitor")
    else:
        notes.append("its returns to itself trap at the IRETQ (the kernel has no early_xen_iret_patch, and its "
                     "restore_regs_and_return_to_kernel is not POP_REGS, a skip of orig_ax and the IRETQ)")
    if paravirtualized.sysret_site is not None:
        notes.append(f"its return from a system call at {paravirtualized.sysret_site:#x} (entry_SYSRETQ_unsafe_stack) "
                     "pointed at the monitor")
    else:
        notes.append("its returns from system calls trap at the SWAPGS (the kernel has no entry_SYSRETQ_unsafe_stack)")
    if paravirtualized.refused_kvm:
        notes.append(f"KVM's PV IPIs and PV TLB flush refused ({', '.join(paravirtualized.refused_kvm)} made to return "
                     "false): KVM takes no hypercall from the kernel's ring 3")
    if paravirtualized.ss_load_site is not None:
        notes.append(f"__switch_to's load of SS at {paravirtualized.ss_load_site:#x} made a NOP (an AMD CPU's, "
                     "a trap that changes nothing deprivileged)")
    return (paravirtualized.vmlinux, iret_site, paravirtualized.sysret_site or 0, paravirtualized.ap_entry,
            not paravirtualized.xxl, paravirtualized.translation.cache)


def _load_vmlinux(memory: GuestMemory, memory_map: MemoryMap, vmlinux: bytes, name: str,
                  keep: list[tuple[int, int]]) -> tuple[tuple[int, int], int]:
    """The vmlinux at its physical addresses: ([start, end), its startup_64). Not over the first
    megabyte (the loader's own structures), memory the map reserves above it, or `keep`."""
    reserved = [(0, LOW_MEMORY_END), *keep] + [(r.start, r.end) for r in memory_map.regions
                                               if r.kind is RegionKind.RESERVED and r.start >= LOW_MEMORY_END]
    loaded = load_elf(memory, vmlinux, name, reserved=reserved)
    # startup_64 began the image up to Linux 6.1; 6.12's is 0xc43 bytes in, after the SEV code
    if not loaded.low <= loaded.entry < loaded.high:
        raise GuestImageError(f"{name}: ELF entry {loaded.entry:#x} is outside the image it loads")
    return (loaded.low, loaded.high), loaded.entry


HANDED_OVER = "the kernel its boot loader started"


SETUP_HEADER_SIZE = ctypes.sizeof(bp.setup_header)
HDRS_AT = bp.setup_header.header.offset  # "HdrS", within the setup header


def loader_entry(setup_header: bytes) -> int | None:
    """Where a boot loader enters the bzImage whose setup header (the file's bytes from 0x1f1) this
    is, or None if it is none: a relocatable kernel of protocol 2.10 or later at its pref_address
    (GRUB's `linux`, SYSLINUX), any other at 1 MiB (boot.rst, "pref_address")."""
    if len(setup_header) < SETUP_HEADER_SIZE:
        return None
    header = bp.setup_header.from_buffer_copy(setup_header)
    if header.boot_flag != bp.BOOT_FLAG or header.header != bp.HDRS_MAGIC or header.version < 0x200:
        return None
    relocatable = header.version >= 0x20A and header.relocatable_kernel
    return int(header.pref_address) if relocatable else BZIMAGE_LOAD_ADDR


def enters_linux(memory: GuestMemory, zero_page: int, entry: int) -> bool:
    """Whether code reached at `entry` with `zero_page` in ESI is a boot loader entering Linux: the
    zero page holds a setup header whose code32_start is that entry (a boot loader's own code may run
    at the same address first: GRUB's decompressed core starts at 1 MiB)."""
    at = zero_page + bp.SETUP_HEADER_OFFSET
    if not memory.contains(at, ctypes.sizeof(bp.setup_header)):
        return False
    header = memory.read_obj(at, bp.setup_header)
    return bool(header.header == bp.HDRS_MAGIC and header.code32_start == entry)


def take_over_linux(memory: GuestMemory, memory_map: MemoryMap, zero_page: int, entry: int,
                    pv_ops: dict[str, int], refused: Sequence[CpuFeature], cpus: int = 1) -> LinuxBoot:
    """A bzImage that a boot loader (GRUB, or SeaBIOS's linuxboot through the kernel's own setup code)
    loaded and is entering at its 32-bit entry (boot.rst, "32-bit Boot Protocol": ESI the zero page,
    the protected-mode kernel at code32_start), made ready for the in-guest monitor as `load_linux`
    makes a file: its payload decompressed on the host, paravirtualized, the vmlinux at its physical
    addresses, and the loader's zero page and command line copied to where the 64-bit entry finds
    them, with the parameters the monitor needs (kernel_parameters) added to its command line.
    Everything here is read from guest memory, which guest code wrote: each length and address is
    checked against RAM, and nothing is written until all of it has been."""
    name = HANDED_OVER
    size = ctypes.sizeof(bp.boot_params)
    if not memory.contains(zero_page, size):
        raise GuestImageError(f"{name}: its zero page at {zero_page:#x} is not in guest RAM")
    params = bp.boot_params.from_buffer_copy(memory.read(zero_page, size))
    header = params.hdr
    if header.header != bp.HDRS_MAGIC:
        raise GuestImageError(f"{name}: the zero page at {zero_page:#x} holds no setup header ('HdrS')")
    check_header(header, name)
    if header.code32_start != entry:
        raise GuestImageError(f"{name}: entered at {entry:#x}, but its zero page says code32_start {header.code32_start:#x}")
    length = header.syssize * 16
    if not memory.contains(entry, length) or header.init_size > memory_map.memory:
        raise GuestImageError(f"{name}: {length} bytes of kernel at {entry:#x}, needing {header.init_size} "
                              "to decompress, do not fit in guest RAM")
    check_kernel_length(header, length, name)
    header_bytes = bytes(params)[bp.SETUP_HEADER_OFFSET: bp.SETUP_HEADER_OFFSET + ctypes.sizeof(bp.setup_header)]
    notes = [f"its boot loader (type {header.type_of_loader:#04x}) started it at {entry:#x}"]
    initrd = None
    initrd_size = header.ramdisk_size | params.ext_ramdisk_size << 32
    if initrd_size:
        start = header.ramdisk_image | params.ext_ramdisk_image << 32
        if not memory.contains(start, initrd_size):
            raise GuestImageError(f"{name}: its initrd at {start:#x}+{initrd_size:#x} is not in guest RAM")
        initrd = (start, start + initrd_size)
    cmdline_size = min(header.cmdline_size or DEFAULT_CMDLINE_SIZE, CMDLINE_AREA_END - CMDLINE_ADDR - 1)
    cmdline_at = header.cmd_line_ptr | params.ext_cmd_line_ptr << 32
    if cmdline_at and not memory.contains(cmdline_at):
        raise GuestImageError(f"{name}: its command line at {cmdline_at:#x} is not in guest RAM")
    given = memory.read_cstring(cmdline_at, cmdline_size).decode(errors="replace") if cmdline_at else ""
    added = kernel_parameters(given, refused, True, monitor=True, cpus=cpus)
    notes.extend(f"added {parameter}: {why}" for parameter, why in added)
    cmdline = " ".join([given, *(parameter for parameter, _ in added)]).strip().encode()
    if len(cmdline) >= cmdline_size:
        raise GuestImageError(f"{name}: its command line with {' '.join(p for p, _ in added)} added is "
                              f"{len(cmdline)} bytes; it takes at most {cmdline_size - 1}")

    bz = BzImage(name, header, header_bytes, memory.read(entry, length), "")
    started = time.perf_counter()
    vmlinux = extract_vmlinux(bz)
    decompress_s = time.perf_counter() - started
    notes.append(f"decompressed its {bz.compression} payload on the host in {decompress_s * 1000:.0f} ms")
    vmlinux, iret_site, sysret_site, ap_entry, flag_traps, code_cache = _paravirtualize(vmlinux, pv_ops, notes)

    kernel_range, startup_64 = _load_vmlinux(memory, memory_map, vmlinux, name, [initrd] if initrd else [])
    memory.write(CMDLINE_ADDR, cmdline + b"\0")
    header.cmd_line_ptr, params.ext_cmd_line_ptr = CMDLINE_ADDR, 0
    memory.write(ZERO_PAGE, bytes(params))
    return LinuxBoot("vmlinux", startup_64, ZERO_PAGE, kernel_range, initrd, cmdline.decode(errors="replace"), "",
                     bz.compression, decompress_s, notes, iret_site, sysret_site, ap_entry, flag_traps, code_cache)
