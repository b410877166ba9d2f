"""boot_params and setup_header against <asm/bootparam.h>, as the C compiler lays them out."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from worldswitch.boot import bootparams as bp

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/bootparam.h")


@pytest.mark.skipif(not HEADER.exists() or shutil.which("gcc") is None, reason="needs asm/bootparam.h and gcc")
def test_layout_matches_the_kernel_header(tmp_path: Path) -> None:
    lines = []
    for cls in (bp.setup_header, bp.boot_e820_entry, bp.boot_params):
        name = cls.__name__
        lines.append(f'P("sizeof {name}", sizeof(struct {name}));')
        for field, *_ in cls._fields_:
            if not field.startswith("_"):
                lines.append(f'P("{name}.{field}", __builtin_offsetof(struct {name}, {field}));')
    source = ("#include <stdio.h>\n#include <asm/bootparam.h>\n"
              '#define P(n, v) printf("%s %lu\\n", n, (unsigned long)(v))\nint main(void) {\n'
              + "\n".join(lines) + "\nreturn 0; }\n")
    (tmp_path / "l.c").write_text(source)
    subprocess.run(["gcc", "-o", str(tmp_path / "l"), str(tmp_path / "l.c")], check=True)
    c = dict(line.rsplit(" ", 1) for line in subprocess.run([str(tmp_path / "l")], capture_output=True, text=True,
                                                            check=True).stdout.splitlines())
    for cls in (bp.setup_header, bp.boot_e820_entry, bp.boot_params):
        assert ctypes.sizeof(cls) == int(c[f"sizeof {cls.__name__}"])
        for field, *_ in cls._fields_:
            if not field.startswith("_"):
                assert getattr(cls, field).offset == int(c[f"{cls.__name__}.{field}"]), f"{cls.__name__}.{field}"


def test_offsets_the_boot_protocol_documents() -> None:
    # Documentation/arch/x86/boot.rst, "The real-mode kernel header" and zero-page.rst
    header_at = bp.boot_params.hdr.offset
    assert header_at == 0x1F1
    for field, offset in (("boot_flag", 0x1FE), ("header", 0x202), ("version", 0x206), ("type_of_loader", 0x210),
                          ("loadflags", 0x211), ("ramdisk_image", 0x218), ("cmd_line_ptr", 0x228),
                          ("initrd_addr_max", 0x22C), ("kernel_alignment", 0x230), ("xloadflags", 0x236),
                          ("cmdline_size", 0x238), ("payload_offset", 0x248), ("pref_address", 0x258),
                          ("init_size", 0x260)):
        assert header_at + getattr(bp.setup_header, field).offset == offset, field
    assert bp.boot_params.acpi_rsdp_addr.offset == 0x070
    assert bp.boot_params.e820_entries.offset == 0x1E8
    assert bp.boot_params.e820_table.offset == 0x2D0
