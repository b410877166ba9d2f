"""What an in-guest monitor's traps cost on this host (issue 13, docs/monitor.md).

    python -m bench.gates [--rounds N]

The `gates` guest raises, from ring 3, an `int3`, a #GP (`hlt`) or a LAPIC timer interrupt, to a
handler in ring 3 itself (a gate to the user code segment: what a monitor that runs guest kernel code
deprivileged takes) or in ring 0 (what a kernel takes). Each run times N of them with `rdtsc`; KVM's
count of emulated instructions is read between the guest's SYNC and DONE. The table gives medians over
the runs, interleaved, in microseconds (through KVM's guest TSC frequency) and emulated instructions
per event. For the timer the time is what the spinning ring-3 loop lost to each interrupt.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from worldswitch.devices.ucall import Ucall, UcallCommand
from worldswitch.vmm.builder import build_for_boot
from worldswitch.vmm.config import MachineConfig
from worldswitch.vmm.result import StopReason
from worldswitch.vmx.info import gather

from .measure import tsc_khz

EVENTS = {"int3": 2000, "gp": 2000, "timer": 200}


@dataclass(frozen=True)
class GateRun:
    handled: int  # events the handler saw
    cycles: int  # TSC cycles per event, as the guest measured them
    ring: int  # the ring the handler ran in
    emulated: int | None  # instructions KVM emulated during the events; None where it does not count them
    kernel_code_emulated: bool  # the host's kind: is ring-0 code emulated here (PVM)?


def run_gates(args: str) -> GateRun:
    """One run of the gates guest with `args`."""
    machine = build_for_boot(MachineConfig(guest="gates", args=args), lambda _b: None)
    counts: list[int] = []

    def emulated(call: Ucall) -> None:
        if call.command in (UcallCommand.SYNC, UcallCommand.DONE):
            counts.append(machine.runners[0].stats().kvm.get("insn_emulation", -1))

    with machine:
        machine.outcome.listen_to_ucalls(emulated)
        machine.start()
        result = machine.wait(300)
    if result is None or result.reason is not StopReason.GUEST_DONE:
        raise RuntimeError(f"gates {args}: {result.message if result else 'did not finish within 300 s'}")
    done = result.details["ucall"]
    assert isinstance(done, Ucall)
    handled, cycles, ring, _ = done.args
    during = counts[1] - counts[0] if len(counts) == 2 and min(counts) >= 0 else None
    return GateRun(handled, cycles, ring, during, machine.host.kernel_code_emulated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant, interleaved (default 5)")
    options = parser.parse_args(argv)
    khz = tsc_khz()
    variants = [(event, ring) for event in EVENTS for ring in ("ring 3", "ring 0")]
    cycles: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    emulated: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    for _ in range(options.rounds):
        for event, ring in variants:
            args = f"{event} {EVENTS[event]}" + (" kernel" if ring == "ring 0" else "")
            run = run_gates(args)
            cycles[(event, ring)].append(run.cycles)
            emulated[(event, ring)].append(run.emulated / run.handled if run.emulated is not None else -1.0)
    host = gather(measure=False)
    print(f"host: {host.cpu_model} ({host.kind.driver}), guest TSC {khz} kHz, medians of {options.rounds} runs")
    print("| event | handler in | us per event | emulated instructions per event | ring 0 / ring 3 |")
    print("| --- | --- | --- | --- | --- |")
    for event in EVENTS:
        user = statistics.median(cycles[(event, "ring 3")])
        for ring in ("ring 3", "ring 0"):
            spent = statistics.median(cycles[(event, ring)])
            ratio = f"{spent / user:.2f}x" if ring == "ring 0" else ""
            print(f"| {event} | {ring} | {spent / khz * 1000:.1f} | {statistics.median(emulated[(event, ring)]):.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
