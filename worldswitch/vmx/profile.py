"""A sampling profiler for whatever runs in the guest, from outside: `worldswitch profile SOCKET`
asks a running VM for its vCPUs' registers (the control API's `registers`, which parks the vCPUs
for the moment it takes) at a fixed interval, and counts where each vCPU was, by function.

Names come from a System.map (or `nm` output: "ADDRESS TYPE NAME" per line) or from an ELF file's
symbol table; a kernel's System.map is in its -dbg package (Debian ships a placeholder in /boot).
Nothing needs to be built into the guest, and it works in the middle of a boot that prints nothing.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..boot.elf import ELF_MAGIC, read_function_symbols
from ..errors import ConfigError, WorldswitchError
from ..record import field, record
from .control import request

TEXT_TYPES = set("TtWw")  # code symbols in nm's letters


class Symbols:
    """Addresses to 'function+offset', from sorted (address, name) pairs."""

    def __init__(self, pairs: list[tuple[int, str]]) -> None:
        pairs = sorted(pairs)
        self.addresses = [address for address, _ in pairs]
        self.names = [name for _, name in pairs]

    @classmethod
    def load(cls, path: str | Path) -> "Symbols":
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ConfigError(f"cannot read symbols from {path}: {error.strerror}") from None
        if data[:4] == ELF_MAGIC:
            pairs = read_function_symbols(data)
            if not pairs:
                raise ConfigError(f"{path} has no symbol table (stripped?)")
            return cls(pairs)
        pairs = []
        for line in data.decode(errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] in TEXT_TYPES:
                try:
                    pairs.append((int(fields[0], 16), fields[2]))
                except ValueError:
                    continue
        if not pairs:
            raise ConfigError(f"{path} lists no functions: expected System.map or nm output (ADDRESS TYPE NAME)")
        return cls(pairs)

    def name(self, address: int) -> str | None:
        index = bisect.bisect_right(self.addresses, address) - 1
        return self.names[index] if index >= 0 else None


@record
class Profile:
    samples: int = 0
    by_place: Counter[tuple[int, int]] = field(default_factory=Counter)  # (cpl, rip) -> samples
    by_cpl: Counter[int] = field(default_factory=Counter)

    def add(self, vcpus: list[dict[str, Any]]) -> None:
        self.samples += 1
        for vcpu in vcpus:
            cpl = int(vcpu["cpl"])
            self.by_cpl[cpl] += 1
            self.by_place[(cpl, int(vcpu["rip"], 16))] += 1

    def by_function(self, symbols: Symbols | None) -> Counter[str]:
        functions: Counter[str] = Counter()
        for (cpl, rip), count in self.by_place.items():
            name = symbols.name(rip) if symbols is not None else None
            functions[f"{name or hex(rip)}{' (user)' if cpl == 3 else ''}"] += count
        return functions


def sample(socket: str | Path, seconds: float, interval: float, limit: int | None = None,
           clock: Callable[[], float] = time.monotonic) -> Profile:
    """Registers of every vCPU every `interval` seconds for `seconds`, or until `limit` samples or
    the VM ends. A slow host answers fewer requests a second: a limit asks for a sample size."""
    profile = Profile()
    deadline = clock() + seconds
    while clock() < deadline and (limit is None or profile.samples < limit):
        response = request(socket, "registers", timeout=30)
        if not response.get("ok"):
            if response.get("error", {}).get("code") == "not-running" and profile.samples:
                break
            raise WorldswitchError(f"the VMX refused registers: {response.get('error', {}).get('message')}")
        profile.add(response["result"]["vcpus"])
        time.sleep(interval)
    return profile


def report(profile: Profile, symbols: Symbols | None, top: int) -> str:
    total = sum(profile.by_cpl.values())
    if not total:
        return "no samples"
    rings = ", ".join(f"ring {cpl} {count * 100 / total:.0f}%" for cpl, count in sorted(profile.by_cpl.items()))
    lines = [f"{profile.samples} samples of {total // profile.samples} vCPU(s): {rings}", "", "    %  samples  where"]
    for name, count in profile.by_function(symbols).most_common(top):
        lines.append(f"{count * 100 / total:5.1f}  {count:7}  {name}")
    return "\n".join(lines)
