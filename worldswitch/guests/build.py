"""Build the built-in guests from src/ with the host's gcc and GNU ld.

    python -m worldswitch.guests.build            # rebuild bin/*.elf and MANIFEST.json
    python -m worldswitch.guests.build --out DIR  # build elsewhere (the reproducibility test does)

The build is deterministic: no debug info, no build IDs, sources compiled by relative path, so
the same toolchain gives the same bytes. MANIFEST.json records that toolchain and each guest's
SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import BIN_DIR, BUILTIN_GUESTS, GUESTS_DIR, SOURCE_DIR

MANIFEST = GUESTS_DIR / "MANIFEST.json"
RUNTIME_SOURCES = ("start.S", "pvh.S", "runtime.c", "string.c")
EXTRA_SOURCES = {"smp": ("aps.c", "ap_trampoline.S"), "count": ("aps.c", "ap_trampoline.S")}  # guests with more than their own .c file
# The in-guest monitor (docs/monitor.md) is not a guest program: its own sources, linked in the
# hypervisor's hole of the address space (position-independent code: no 32-bit absolute address
# reaches there), beside the guests in bin/.
MONITOR = "monitor"
MONITOR_SOURCES = ("monitor.S", "monitor.c", "string.c")

CFLAGS = [
    "-std=gnu11", "-O2", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
    "-ffreestanding", "-fno-builtin", "-fno-pic", "-fno-pie", "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-mno-red-zone", "-mgeneral-regs-only",
    "-mcmodel=small", "-fno-ident",
]
LDFLAGS = [
    "-nostdlib", "-static", "-no-pie", "-Wl,-T,guest.ld", "-Wl,--build-id=none",
    "-Wl,-z,noexecstack", "-Wl,-z,max-page-size=4096", "-Wl,--no-warn-rwx-segments",
]


def toolchain() -> str:
    """The compiler and linker versions, which decide the bytes of the build."""
    versions = []
    for tool in ("gcc", "ld"):
        path = shutil.which(tool)
        if path is None:
            raise SystemExit(f"{tool} is not installed; it is needed to build the guests")
        first = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        versions.append(first.strip())
    return " / ".join(versions)


def _command(name: str, target: Path) -> list[str]:
    if name == MONITOR:
        flags = [flag for flag in CFLAGS if flag not in ("-fno-pic", "-fno-pie")] + ["-fpie", "-fvisibility=hidden"]
        links = [flag.replace("guest.ld", "monitor.ld") for flag in LDFLAGS]
        return ["gcc", *flags, *links, "-o", str(target), *MONITOR_SOURCES]
    sources = [*RUNTIME_SOURCES, *EXTRA_SOURCES.get(name, ()), f"{name}.c"]
    return ["gcc", *CFLAGS, *LDFLAGS, "-o", str(target), *sources]


def build(out_dir: Path) -> dict[str, str]:
    """Build every guest and the monitor into out_dir; return name -> SHA-256 of its ELF."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    with tempfile.TemporaryDirectory(prefix="ws-guests-") as tmp:
        for name in sorted([*BUILTIN_GUESTS, MONITOR]):
            target = Path(tmp) / f"{name}.elf"
            result = subprocess.run(_command(name, target), cwd=SOURCE_DIR, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"building guest {name} failed:\n{result.stderr}")
            data = target.read_bytes()
            (out_dir / f"{name}.elf").write_bytes(data)
            digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the package's bin/)")
    options = parser.parse_args(argv)
    chain = toolchain()
    digests = build(options.out or BIN_DIR)
    if options.out is None:
        MANIFEST.write_text(json.dumps({"toolchain": chain, "sha256": digests}, indent=2) + "\n")
    for name, digest in digests.items():
        print(f"{name:8} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
