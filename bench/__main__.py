"""worldswitch's benchmarks, side by side in one run.

    python -m bench [--quick] [--out DIR] [--update-readme]

Compares worldswitch with the C floor (bench/floor.c, built on the fly) and QEMU (if installed)
on the same guest binaries: the exit round trip for port I/O and MMIO from ring 3, VM start, and
the VMX's resident memory beyond guest RAM; virtio-blk reads against the host's own pread; pause,
snapshot and restore against copying and reading the same bytes on this disk. Writes
DIR/results.json and DIR/results.png, prints one line per comparison, and with --update-readme
puts the table into README.md. As root it drops the page cache before each disk measurement.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
from pathlib import Path

from worldswitch.vmx.info import gather

from . import measure, snapshots, vmms
from .measure import Figure, exit_round_trip, memory_use, start_times, tsc_khz
from .report import chart, readme_table, update_readme

ROOT = Path(__file__).resolve().parent.parent


def line(what: str, figures: dict[str, Figure], unit: str, floor: str | None = "floor") -> str:
    """`mmio exit: worldswitch 33.1 us, floor 29.6 us (1.12x floor), qemu 41.0 us`"""
    ws = figures["worldswitch"]
    parts = [f"worldswitch {ws.median:.1f} {unit}"]
    if floor and floor in figures:
        base = figures[floor].median
        parts.append(f"{floor} {base:.1f} {unit} ({ws.median / base:.2f}x {floor})")
    for name, figure in figures.items():
        if name not in ("worldswitch", floor):
            parts.append(f"{name} {figure.median:.1f} {unit} (worldswitch/{name} {ws.median / figure.median:.2f}x)")
    return f"{what}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and exits: under two minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where to write results")
    parser.add_argument("--update-readme", action="store_true", help="put the results table into README.md")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out even if it is installed")
    options = parser.parse_args(argv)
    charting = importlib.util.find_spec("matplotlib") is not None  # say so now, not after minutes of measuring
    if not charting:
        print("bench: matplotlib is not installed (pip install -e '.[bench]'): writing results.json and the table, "
              "no chart", file=sys.stderr)

    rounds, exits, start_rounds = (5, 5000, 5) if options.quick else (9, 20000, 15)
    options.out.mkdir(parents=True, exist_ok=True)
    host = gather(measure=False)
    khz = tsc_khz()
    compared: list[vmms.Vmm] = [vmms.worldswitch(), vmms.build_floor(options.out), vmms.worldswitch(sandbox=False)]
    peer = None if options.no_qemu else vmms.qemu()
    if peer is not None:
        compared.append(peer)
    print(f"host: {host.cpu_model}, {host.kind.driver} ({host.kind.description.split(':')[0]}); "
          f"guest TSC {khz / 1000:.0f} MHz; {rounds} rounds of {exits} exits" +
          (f"; {vmms.qemu_version()}" if peer else "; QEMU not installed"), flush=True)

    results: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": host.cpu_model, "kind": host.kind.driver, "cpus": host.host_cpus, "tsc_khz": khz,
                 "python": platform.python_version(), "qemu": vmms.qemu_version() if peer else None},
        "quick": options.quick,
        "exits_per_run": exits,
        "figures": {},
    }
    figures: dict[str, dict[str, Figure]] = {}
    lines = []
    for kind in ("io", "mmio"):
        figures[f"{kind}_exit"] = exit_round_trip(compared, kind, exits, rounds, khz)
        lines.append(line(f"{'port I/O' if kind == 'io' else 'mmio'} exit", figures[f"{kind}_exit"], "us"))
        print(lines[-1], flush=True)

    starters = [v for v in compared if v.name not in ("floor", vmms.UNSANDBOXED)]
    figures["start_first_byte"], figures["start_exit"] = start_times(starters, start_rounds)
    lines.append(line("VM start to first UART byte", figures["start_first_byte"], "ms", floor=None))
    lines.append(line("VM start to exit", figures["start_exit"], "ms", floor=None))
    print("\n".join(lines[-2:]), flush=True)

    memory = {v.name: Figure(v.name, "MiB") for v in starters}
    details = {}
    for vmm in starters:
        use = memory_use(vmm)
        memory[vmm.name].samples.append(use.overhead_kib / 1024)
        details[vmm.name] = {"rss_kib": use.rss_kib, "guest_touched_kib": use.guest_kib}
    figures["memory_overhead"] = memory
    lines.append(line("VMX resident memory beyond touched guest RAM", memory, "MiB", floor=None))
    print(lines[-1], flush=True)

    disk = measure.prepare_disk(options.out / "disk.img")
    hostread = vmms.build_hostread(options.out)
    reads = 1000 if options.quick else 5000
    for pattern, key in (("seq", "virtio_blk_seq_read"), ("rand", "virtio_blk_rand_read")):
        figures[key] = measure.virtio_blk_reads(compared[0], hostread, disk, pattern, reads, 3 if options.quick else 5, khz)
        best = max((f for name, f in figures[key].items() if name != "host"), key=lambda f: f.median)
        lines.append(
            f"virtio-blk {pattern} 4 KiB reads: " + ", ".join(
                f"{name} {f.median:,.0f} IOPS ({f.median * 4096 / 2**20:,.1f} MiB/s)" for name, f in figures[key].items())
            + f" ({best.median / figures[key]['host'].median:.3f}x the host's direct pread at {best.vmm})"
        )
        print(lines[-1], flush=True)

    results["snapshot_details"] = {}
    for size in ((512,) if options.quick else (512, 4096)):
        per_size, detail = snapshots.snapshot_times(size, 1 if options.quick else 3, options.out / "snapshot-work")
        pause = {"worldswitch": per_size.pop("pause")}
        figures[f"snapshot_{size}"], figures[f"pause_{size}"] = per_size, pause
        results["snapshot_details"][f"snapshot_{size}"] = detail  # type: ignore[index]
        f = per_size
        lines.append(
            f"{size} MiB VM ({detail['stored_mib']} MiB in use): pause {pause['worldswitch'].median:.2f} ms; "
            f"snapshot {f['snapshot'].median:.2f} s, cp+fsync of the same bytes {f['copy'].median:.2f} s "
            f"({f['snapshot'].median / f['copy'].median:.2f}x); restore {f['restore'].median:.2f} s, "
            f"cold read {f['cold read'].median:.2f} s ({f['restore'].median / f['cold read'].median:.2f}x)"
            + ("" if detail["cold_cache"] else " [page cache not dropped: not root]"))
        print(lines[-1], flush=True)

    results["figures"] = {name: {vmm: figure.as_dict() for vmm, figure in per_vmm.items()} for name, per_vmm in figures.items()}
    results["memory_details"] = details
    results["lines"] = lines
    (options.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if charting:
        chart(figures, options.out / "results.png", results)
    table = readme_table(results)
    print(table)
    if options.update_readme:
        update_readme(ROOT / "README.md", table)
    print(f"wrote {options.out / 'results.json'}" + (f" and {options.out / 'results.png'}" if charting else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
