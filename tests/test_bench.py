"""The benchmark harness works end to end (small runs; speed itself is measured by bench/, never
asserted in tests), and the guests' PVH entry boots them under QEMU."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bench import vmms
from bench.measure import memory_use, tsc_khz
from worldswitch.guests import builtin_path

pytestmark = pytest.mark.kvm
needs_qemu = pytest.mark.skipif(shutil.which(vmms.QEMU) is None, reason="QEMU is not installed (.ci/run installs it)")


def test_floor_and_worldswitch_report_guest_measured_exit_costs(tmp_path) -> None:
    khz = tsc_khz()
    assert khz > 100_000
    for vmm in (vmms.build_floor(tmp_path), vmms.worldswitch(), vmms.worldswitch(sandbox=False)):
        for kind in ("io", "mmio"):
            cycles = vmm.run_exits(200, kind)
            assert 100 < cycles < khz * 10  # more than nothing, less than 10 ms per exit


def test_start_time_and_memory_are_measurable() -> None:
    ws = vmms.worldswitch()
    first, end = ws.time_start()
    assert 0 < first <= end
    use = memory_use(ws, settle_s=1.0)
    assert use.guest_kib > 0 and use.overhead_kib > 0


def test_snapshot_figures_are_measurable(tmp_path) -> None:
    from bench.snapshots import snapshot_times

    figures, details = snapshot_times(64, 1, tmp_path, cold=False, log=lambda line: None)
    assert set(figures) == {"pause", "snapshot", "copy", "restore", "cold read"}
    assert all(figure.median > 0 for figure in figures.values())
    assert details["memory_mib"] == 64 and 30 <= details["stored_mib"] <= 34  # 32 MiB filled, plus the guest
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@needs_qemu
def test_the_same_guest_binaries_boot_in_qemu_through_pvh() -> None:
    qemu = vmms.qemu()
    assert qemu is not None
    result = subprocess.run(qemu.exits_command(builtin_path("hello"), "7 from qemu"), capture_output=True, timeout=120)
    assert b"Hello from a worldswitch guest: 64-bit long mode, ring 3" in result.stdout
    assert b"My arguments: 7 from qemu" in result.stdout
    assert result.returncode == (7 << 1) | 1  # isa-debug-exit's encoding
    assert qemu.run_exits(200, "mmio") > 100


def test_the_sandbox_cost_table_compares_the_same_rounds() -> None:
    from bench.report import sandbox_rows

    def figure(median: float) -> dict[str, float]:
        return {"median": median, "p25": median - 1, "p75": median + 1}

    rows = sandbox_rows({"io_exit": {"worldswitch": figure(44.0), vmms.UNSANDBOXED: figure(40.0)}})
    assert rows[-1] == "| port I/O exit round trip | 44.0 us (43.0-45.0) | 40.0 us (39.0-41.0) | +4.0 us | 1.100x |"
    assert sandbox_rows({"io_exit": {"worldswitch": figure(44.0)}}) == []


def test_the_disk_benchmark_takes_the_shells_prompt_only_after_the_marker() -> None:
    from bench.monitor_disk import MARKER, PROMPT, reached

    kernel = b"Linux version 6.1\r\n[    0.1] # a line of the kernel's\r\n"
    assert reached(kernel, b"Linux version") and not reached(kernel, PROMPT)
    assert not reached(kernel + MARKER + b"\r\n", PROMPT)
    assert reached(kernel + MARKER + b"\r\n/ # ", PROMPT)


def test_a_readme_section_is_replaced_and_a_row_gives_medians_and_their_ratio(tmp_path) -> None:
    from bench.report import seconds_row, update_readme

    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- firmware:begin -->\nold table\n<!-- firmware:end -->\ntail\n")
    update_readme(readme, "new table", "firmware")
    assert readme.read_text() == "head\n<!-- firmware:begin -->\nnew table\n<!-- firmware:end -->\ntail\n"
    with pytest.raises(SystemExit, match="no <!-- nested:begin -->"):
        update_readme(readme, "table", "nested")
    assert seconds_row("boot", [26.5, 26.8, 26.7], [10.1, 9.9, 10.0], digits=1) == \
        "| boot | 26.7 s (26.5-26.8) | 10.0 s (9.9-10.1) | 2.67x |"


def test_the_nested_table_has_a_column_for_each_vmm_and_each_worldswitch_over_qemu() -> None:
    from bench.nested import VMMS, Boot, Table, markdown

    rates = {"worldswitch": 8.0, "worldswitch-no-offloads": 2.0, "qemu": 4.0}
    table = Table([{vmm: Boot(vmm, 30.0 + number, 50.0, 60.0, rates[vmm] + number, rates[vmm]) for vmm in VMMS}
                   for number in range(3)])
    lines = markdown(table, "header").splitlines()
    assert lines[2] == ("| figure | worldswitch | worldswitch, offloads=off | QEMU | worldswitch / QEMU | "
                        "worldswitch, offloads=off / QEMU |")
    assert lines[3].count("---") == 6
    assert lines[4] == ("| boot to the init marker (lower is better) | 31.00 s (30.00-32.00) | 31.00 s (30.00-32.00) | "
                        "31.00 s (30.00-32.00) | 1.00x | 1.00x |")
    assert lines[7].endswith("| 9.00 MiB/s (8.00-10.00) | 3.00 MiB/s (2.00-4.00) | 5.00 MiB/s (4.00-6.00) | 1.80x | 0.60x |")
