"""What the in-guest monitor (`--monitor`, issue 13, docs/monitor.md) changes on this host.

    python -m bench.monitor [--rounds N]

Each workload runs without and with the monitor, interleaved, N times; the table gives medians:
- `loop`: the probe guest's counted loop in ring 0 (dec/jnz, 1,000,000 iterations), timed by the VMX
  between the guest's SYNC and DONE;
- `int3`, `gp`, `timer`: the gates guest's events from ring 3 to the program's ring-0 handler (a
  kernel's path), timed per event by the guest's own `rdtsc`;
- `deadline`: the probe guest's WRMSRs of the TSC deadline in ring 0 (what a kernel writes at each
  timer interrupt), timed by the VMX between SYNC and DONE;
- `cr3`: the paging guest's CR3 loads in ring 0, each followed by reads in 8 pages (a context
  switch and its first steps), timed by the VMX between SYNC and DONE; `cr3 two` alternates between
  two address spaces (two PML4s sharing their lower tables), as a switch between processes does.
KVM's count of emulated instructions is read at the same SYNC and DONE. Where ring 0 is emulated
(PVM), the monitor runs the program's kernel code natively in ring 3 and traps only what it must,
behind a ring-0 trampoline of a few instructions; what its body must still do in ring 0 (a CR3
load, for one) costs more.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from worldswitch.devices.ucall import Ucall, UcallCommand
from worldswitch.vmm.builder import build_for_boot
from worldswitch.vmm.config import MachineConfig
from worldswitch.vmm.result import StopReason
from worldswitch.vmx.info import gather

from .measure import tsc_khz

LOOP = 1_000_000
EVENTS = 200
WORKLOADS = {"loop": ("probe", f"ring0 {LOOP}"), "int3": ("gates", f"int3 {EVENTS} kernel"),
             "gp": ("gates", f"gp {EVENTS} kernel"), "timer": ("gates", f"timer {EVENTS} kernel"),
             "deadline": ("probe", f"deadline {EVENTS}"), "cr3": ("paging", f"switch {EVENTS}"),
             "cr3 two": ("paging", f"switch {EVENTS} 8 two")}
PER_UNIT = {"deadline": "write", "cr3": "load", "cr3 two": "load"}  # timed by the VMX between SYNC and DONE


@dataclass(frozen=True)
class Sample:
    wall_ns: int  # between the guest's SYNC and DONE
    emulated: int  # instructions KVM emulated in that time
    done: tuple[int, ...]  # the DONE's arguments
    monitor: dict[str, int]  # the monitor's traps, if it ran


def measure(guest: str, args: str, monitor: bool) -> Sample:
    machine = build_for_boot(MachineConfig(guest=guest, args=args, monitor=monitor), lambda _b: None)
    marks: list[tuple[int, int]] = []

    def mark(call: Ucall) -> None:
        if call.command in (UcallCommand.SYNC, UcallCommand.DONE):
            marks.append((time.perf_counter_ns(), machine.runners[0].stats().kvm.get("insn_emulation", 0)))

    with machine:
        machine.outcome.listen_to_ucalls(mark)
        machine.start()
        result = machine.wait(300)
        traps = machine.stats().monitor
    if result is None or result.reason is not StopReason.GUEST_DONE or len(marks) != 2:
        raise RuntimeError(f"{guest} {args}: {result.message if result else 'did not finish within 300 s'}")
    call = result.details["ucall"]
    assert isinstance(call, Ucall)
    (t0, e0), (t1, e1) = marks
    return Sample(t1 - t0, e1 - e0, tuple(call.args), traps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant, interleaved (default 5)")
    options = parser.parse_args(argv)
    khz = tsc_khz()
    samples: dict[tuple[str, bool], list[Sample]] = {(w, m): [] for w in WORKLOADS for m in (False, True)}
    for _ in range(options.rounds):
        for (workload, monitor), runs in samples.items():
            runs.append(measure(*WORKLOADS[workload], monitor))
    host = gather(measure=False)
    print(f"host: {host.cpu_model} ({host.kind.driver}), guest TSC {khz} kHz, medians of {options.rounds} runs")
    print("| workload | monitor | time | emulated instructions per unit | monitor traps per unit | without / with |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workload in WORKLOADS:
        unit = LOOP if workload == "loop" else EVENTS
        times = {}
        for monitor in (False, True):
            runs = samples[(workload, monitor)]
            if workload == "loop":
                spent = statistics.median(r.wall_ns for r in runs) / 1e6
                shown = f"{spent:.1f} ms"
            elif workload in PER_UNIT:
                spent = statistics.median(r.wall_ns for r in runs) / unit / 1e3
                shown = f"{spent:.1f} us per {PER_UNIT[workload]}"
            else:
                spent = statistics.median(r.done[1] for r in runs) / khz * 1000
                shown = f"{spent:.1f} us per event"
            times[monitor] = spent
            emulated = statistics.median(r.emulated for r in runs) / unit
            traps = statistics.median(r.monitor.get("events", 0) for r in runs) / unit if monitor else 0.0
            ratio = f"{times[False] / spent:.2f}x" if monitor else ""
            print(f"| {workload} | {'with' if monitor else 'without'} | {shown} | {emulated:.3f} | {traps:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
