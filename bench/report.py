"""Turning results into a chart (PNG, matplotlib) and a Markdown table for the README."""

from __future__ import annotations

import statistics
from pathlib import Path

from .measure import Figure

TITLES = {
    "io_exit": ("port I/O exit round trip", "us"),
    "mmio_exit": ("MMIO exit round trip", "us"),
    "start_first_byte": ("VM start to first UART byte", "ms"),
    "start_exit": ("VM start to exit (hello guest)", "ms"),
    "memory_overhead": ("VMX memory beyond touched guest RAM", "MiB"),
    "virtio_blk_seq_read": ("virtio-blk sequential 4 KiB reads", "IOPS"),
    "virtio_blk_rand_read": ("virtio-blk random 4 KiB reads", "IOPS"),
    "snapshot_512": ("snapshot and restore, 512 MiB VM", "s"),
    "snapshot_4096": ("snapshot and restore, 4 GiB VM", "s"),
}
COLOURS = {"worldswitch": "#1f77b4", "worldswitch QD1": "#1f77b4", "worldswitch QD32": "#aec7e8", "floor": "#7f7f7f",
           "qemu": "#ff7f0e", "host": "#2ca02c", "snapshot": "#1f77b4", "restore": "#aec7e8",
           "copy": "#2ca02c", "cold read": "#98df8a"}


def chart(figures: dict[str, dict[str, Figure]], path: Path, results: dict[str, object]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in TITLES if name in figures]
    columns = min(4, len(names))
    rows = (len(names) + columns - 1) // columns
    fig, grid = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):
        title, unit = TITLES[name]
        per_vmm = figures[name]
        labels = list(per_vmm)
        medians = [per_vmm[v].median for v in labels]
        lows = [per_vmm[v].median - per_vmm[v].spread[0] for v in labels]
        highs = [per_vmm[v].spread[1] - per_vmm[v].median for v in labels]
        ax.bar(labels, medians, yerr=[lows, highs], capsize=4, color=[COLOURS.get(v, "#999999") for v in labels])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelsize=8)
        for i, value in enumerate(medians):
            ax.annotate(f"{value:.1f}", (i, value), ha="center", va="bottom", fontsize=7)
    host = results["host"]  # type: ignore[index]
    fig.suptitle(f"worldswitch benchmarks, {results['date']} - {host['kind']} host, {host['cpu']}", fontsize=9)  # type: ignore[index]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


UNSANDBOXED = "worldswitch --no-sandbox"


def sandbox_rows(figures: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """What the VMX's sandbox (seccomp filters on every system call) costs per exit: the same
    worldswitch with and without it, interleaved in the same rounds."""
    kinds = [name for name in ("io_exit", "mmio_exit") if UNSANDBOXED in figures.get(name, {})]
    if not kinds:
        return []
    rows = ["", "| the sandbox's cost | sandboxed (default) | `--no-sandbox` | difference per exit | ratio |",
            "| --- | --- | --- | --- | --- |"]
    for name in kinds:
        title, unit = TITLES[name]
        on, off = figures[name]["worldswitch"], figures[name][UNSANDBOXED]
        rows.append(f"| {title} | {on['median']:.1f} {unit} ({on['p25']:.1f}-{on['p75']:.1f}) | {off['median']:.1f} {unit} "
                    f"({off['p25']:.1f}-{off['p75']:.1f}) | {on['median'] - off['median']:+.1f} {unit} | "
                    f"{on['median'] / off['median']:.3f}x |")
    return rows


def readme_table(results: dict[str, object]) -> str:
    figures = results["figures"]  # type: ignore[assignment]
    vmm_names = ["worldswitch", "floor", "qemu"]
    host = results["host"]  # type: ignore[assignment]
    rows = [
        f"Measured {results['date']} on a {host['kind'].upper()} host ({host['cpu']}, {host['cpus']} CPUs), "  # type: ignore[index]
        f"`python -m bench{' --quick' if results['quick'] else ''}`; median (interquartile range).",
        "",
        "| figure | worldswitch | C floor | QEMU | worldswitch / floor | worldswitch / QEMU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (title, unit) in TITLES.items():
        if name not in figures or name.startswith(("virtio_blk", "snapshot")):  # type: ignore[operator]
            continue
        per_vmm = figures[name]  # type: ignore[index]

        def cell(vmm: str) -> str:
            if vmm not in per_vmm:
                return "-"
            f = per_vmm[vmm]
            return f"{f['median']:.1f} {unit} ({f['p25']:.1f}-{f['p75']:.1f})"

        ws = per_vmm["worldswitch"]["median"]
        ratio_floor = f"{ws / per_vmm['floor']['median']:.2f}x" if "floor" in per_vmm else "-"
        ratio_qemu = f"{ws / per_vmm['qemu']['median']:.2f}x" if "qemu" in per_vmm else "-"
        rows.append(f"| {title} | {' | '.join(cell(v) for v in vmm_names)} | {ratio_floor} | {ratio_qemu} |")
    rows += sandbox_rows(figures)  # type: ignore[arg-type]
    disk = [name for name in ("virtio_blk_seq_read", "virtio_blk_rand_read") if name in figures]  # type: ignore[operator]
    if disk:
        columns = [k for k in ("worldswitch QD1", "worldswitch QD32", "worldswitch QD32 packed", "host")
                   if all(k in figures[name] for name in disk)]  # type: ignore[index]
        rows += ["", "| virtio-blk, 4 KiB reads | " + " | ".join(k.replace("host", "host pread (the limit)") for k in columns)
                 + " | best / host |", "| --- " * (len(columns) + 2) + "|"]
        for name in disk:
            per = figures[name]  # type: ignore[index]
            best = max(v["median"] for k, v in per.items() if k != "host")
            cells = " | ".join(f"{per[k]['median']:,.0f} IOPS ({per[k]['p25']:,.0f}-{per[k]['p75']:,.0f})"
                               for k in columns)
            rows.append(f"| {TITLES[name][0].split(' 4 KiB')[0].replace('virtio-blk ', '')} | {cells} | {best / per['host']['median']:.3f}x |")
    sizes = [name for name in ("snapshot_512", "snapshot_4096") if name in figures]  # type: ignore[operator]
    if sizes:
        rows += ["", "| VM RAM (stored) | pause | snapshot | cp + fsync of memory.bin (the limit) | snapshot / cp "
                 "| restore | cold read of memory.bin (the limit) | restore / read |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        details = results.get("snapshot_details", {})  # type: ignore[union-attr]
        for name in sizes:
            per = figures[name]  # type: ignore[index]
            detail = details.get(name, {})  # type: ignore[union-attr]

            def seconds(key: str) -> str:
                return f"{per[key]['median']:.2f} s ({per[key]['p25']:.2f}-{per[key]['p75']:.2f})"

            pause = figures[name.replace("snapshot", "pause")]["worldswitch"]  # type: ignore[index]
            rows.append(f"| {detail.get('memory_mib')} MiB ({detail.get('stored_mib')} MiB) | {pause['median']:.2f} ms "
                        f"| {seconds('snapshot')} | {seconds('copy')} | {per['snapshot']['median'] / per['copy']['median']:.2f}x "
                        f"| {seconds('restore')} | {seconds('cold read')} | {per['restore']['median'] / per['cold read']['median']:.2f}x |")
    return "\n".join(rows)


def update_readme(readme: Path, table: str, section: str = "bench") -> None:
    """`table` between the README's `<!-- SECTION:begin -->` and `<!-- SECTION:end -->`."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} section to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def seconds_row(title: str, worldswitch: list[float], qemu: list[float], digits: int = 2) -> str:
    """A table row of seconds: each VMM's median (min-max), and the ratio of the medians."""
    def figure(values: list[float]) -> str:
        return f"{statistics.median(values):.{digits}f} s ({min(values):.{digits}f}-{max(values):.{digits}f})"

    return f"| {title} | {figure(worldswitch)} | {figure(qemu)} | {statistics.median(worldswitch) / statistics.median(qemu):.2f}x |"
