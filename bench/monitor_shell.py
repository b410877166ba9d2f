"""Debian's busybox shell under the in-guest monitor (`--monitor`, docs/monitor.md): how long commands
take, and what the monitor did for them, on a host that emulates guest kernel code (PVM).

    python -m bench.monitor_shell [--rounds N] [--release trixie] [--cpus N] [--kernel bzImage]

One VM boots Debian's cloud kernel (or `--kernel`: one of your own, such as the kernel without
PARAVIRT_XXL the tests build, tests/kernels/) to its shell; each command then runs N times (default 5), timed
from the line sent on the console to the shell's answer. Beside the median time, what one run of
it cost: the instructions KVM emulated (ring 0's, the cost the host's load does not change), the
events the monitor took (traps into it), its shadow fills, the shadows it made (`shadow_flush`: a
new address space's, or all of them emptied), its calls into ring 0 and the guest's system calls. The commands
go from one process to a pipeline of seven (more address spaces than the monitor kept before
2026-12-01), a pipe of many small writes (a context switch and system calls each line) and a read
into 8 MiB of fresh memory (a page fault in the kernel every 4 KiB, each then a return to the kernel).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from worldswitch.boot.initramfs import InitramfsSpec, build_initramfs
from worldswitch.vmx.api import Machine
from worldswitch.vmx.debian import fetch_debian, release_cache

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "debian"
COMMANDS = ("echo hi", "ls /bin | wc -l", "ls /bin | cat | cat | cat | cat | cat | wc -l", "seq 1 2000 | wc -l",
            "dd if=/dev/zero of=/dev/null bs=8M count=1 2>/dev/null")
COUNTERS = ("events", "shadow_fill", "shadow_flush", "ring0", "syscall")
COLUMNS = ("emulated",) + COUNTERS


def counters(vm: Machine) -> dict[str, int]:
    """The monitor's counters, and the instructions KVM emulated (ring 0's, at about a microsecond each
    here: the cost that does not vary with the host's load, as time does)."""
    stats = vm.stats()
    return {**stats["monitor"], "emulated": sum(v["kvm"].get("insn_emulation", 0) for v in stats["vcpus"])}


def ask(vm: Machine, n: int, command: str) -> None:
    vm.console.send(f"{command}; echo bench-done-$(({n}*1))\n")
    vm.console.expect(rb"bench-done-" + str(n).encode() + rb"\r?\n", timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor_shell", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--cpus", type=int, default=1, help="vCPUs, each on its own copy of the monitor (default 1)")
    parser.add_argument("--release", help="Debian's kernel of that release (fetch-debian --release; default: "
                                          "the host's apt sources)")
    parser.add_argument("--kernel", help="this kernel instead of Debian's (its busybox still Debian's)")
    options = parser.parse_args(argv)
    if shutil.which("apt-get") is None:
        print("bench.monitor_shell: needs apt-get (Debian's kernel and busybox)", file=sys.stderr)
        return 2
    debian = fetch_debian(release_cache(CACHE, options.release), release=options.release)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        initrd = Path(scratch) / "initrd.img"
        initrd.write_bytes(build_initramfs(InitramfsSpec(debian.busybox, [], "WORLDSWITCH-INIT-MARKER", True),
                                           compress=False))
        with Machine(kernel=options.kernel or str(debian.kernel), initrd=str(initrd), monitor=True, cpus=options.cpus,
                     append="console=ttyS0") as vm:
            vm.start()
            vm.console.expect(rb"poweroff -f ends the VM", timeout=120)
            vm.console.expect(rb"# ", timeout=60)
            n = 0
            for command in COMMANDS:
                ask(vm, n, command)  # once first: the programs' pages read, their first fills made
                n += 1
                times, counts = [], {}
                for _ in range(options.rounds):
                    before = counters(vm)
                    started = time.monotonic()
                    ask(vm, n, command)
                    times.append(time.monotonic() - started)
                    after = counters(vm)
                    counts = {name: after.get(name, 0) - before.get(name, 0) for name in COLUMNS}
                    n += 1
                rows.append((command, statistics.median(times), counts))
            vm.console.send("poweroff -f\n")
            vm.wait(60)
    print(f"| command | median of {options.rounds} | {' | '.join(COLUMNS)} |")
    print("| --- | --- |" + " --- |" * len(COLUMNS))
    for command, seconds, counts in rows:
        print(f"| `{command}` | {seconds * 1000:.0f} ms | {' | '.join(f'{counts[name]:,}' for name in COLUMNS)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
