"""`worldswitch trace FILE`: what a recorded run's world switches were.

    - counts and median times by exit reason
    - the busiest ports and MMIO addresses, named after the device that owns them
    - a latency histogram per exit reason (round trip = time in KVM_RUN + time in the VMX)
    - the hosted interrupt path: each host event (kick), when the vCPU was back in the VMX and
      when the guest was entered again
    - KVM's own counters beside ours: exits the kernel finished without the VMX
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections import Counter, defaultdict

from ..vmm.stats import reason_name
from ..vmm.trace import FLAG_KICKED, FLAG_WRITE, Trace, TraceRecord

IO, MMIO = 2, 6
HISTOGRAM_BUCKETS_US = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


def _us(ns: float) -> str:
    return f"{ns / 1000:.1f} us" if ns < 10_000_000 else f"{ns / 1e6:.0f} ms"


def _owner(devices: list[dict], bus: str, address: int) -> str:
    for device in devices:
        if device["bus"] == bus and device["base"] <= address < device["base"] + device["length"]:
            return device["name"]
    return "unmapped"


def _bucket(ns: int) -> int:
    us = ns / 1000
    for i, bound in enumerate(HISTOGRAM_BUCKETS_US):
        if us < bound:
            return i
    return len(HISTOGRAM_BUCKETS_US)


def _bucket_label(i: int) -> str:
    low = 0 if i == 0 else HISTOGRAM_BUCKETS_US[i - 1]
    return f">={low} us" if i == len(HISTOGRAM_BUCKETS_US) else f"{low}-{HISTOGRAM_BUCKETS_US[i]} us"


def summarise(trace: Trace, top: int = 8, timeline: int = 20) -> str:
    records = trace.records
    devices = trace.trailer.get("devices", [])  # type: ignore[assignment]
    start = datetime.datetime.fromtimestamp(trace.wall_start).isoformat(sep=" ", timespec="seconds")
    span = (max(r.t_exit_ns for r in records) - min(r.t_exit_ns for r in records)) / 1e9 if records else 0.0
    vcpus = sorted({r.vcpu for r in records})
    lines = [f"{trace.path}: {len(records)} world switches on {len(vcpus)} vCPU(s) over {span:.3f} s, started {start}"]
    result = trace.trailer.get("result")
    if isinstance(result, dict):
        lines.append(f"the run ended: {result.get('message')}")
    dropped = trace.trailer.get("dropped")
    if isinstance(dropped, dict) and dropped:
        lines.append(f"trace limit reached: {sum(dropped.values())} later world switches were counted but not recorded")
    if trace.trailer.get("truncated"):
        lines.append("the file ends early (the VMX did not finish writing it); showing what is there")

    by_reason: dict[int, list[TraceRecord]] = defaultdict(list)
    for record in records:
        by_reason[record.reason].append(record)
    lines += ["", f"{'exit reason':<16}{'count':>10}{'in KVM_RUN (median)':>22}{'in VMX (median)':>18}{'round trip p50/p90/p99':>30}"]
    for reason, group in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        trips = sorted(r.guest_ns + r.vmx_ns for r in group)
        pct = [trips[min(len(trips) - 1, int(q * len(trips)))] for q in (0.5, 0.9, 0.99)]
        lines.append(
            f"{reason_name(reason):<16}{len(group):>10}{_us(statistics.median(r.guest_ns for r in group)):>22}"
            f"{_us(statistics.median(r.vmx_ns for r in group)):>18}{' / '.join(_us(p) for p in pct):>30}"
        )

    for reason, bus, title in ((IO, "port", "ports"), (MMIO, "mmio", "MMIO addresses")):
        group = by_reason.get(reason, [])
        if not group:
            continue
        counts = Counter((r.address, r.flags & FLAG_WRITE) for r in group)
        lines += ["", f"busiest {title}:"]
        for (address, write), count in counts.most_common(top):
            handled = [r.vmx_ns for r in group if r.address == address and (r.flags & FLAG_WRITE) == write]
            lines.append(
                f"  {address:#10x} {'write' if write else 'read ':<5} {count:>9}  {_owner(devices, bus, address):<22}"  # type: ignore[arg-type]
                f" VMX median {_us(statistics.median(handled))}"
            )

    lines += ["", "round-trip latency histogram (time in KVM_RUN + time in the VMX):"]
    for reason, group in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        buckets = Counter(_bucket(r.guest_ns + r.vmx_ns) for r in group)
        widest = max(buckets.values())
        lines.append(f"  {reason_name(reason)}:")
        for i in sorted(buckets):
            bar = "#" * max(1, round(40 * buckets[i] / widest))
            lines.append(f"    {_bucket_label(i):>14} {buckets[i]:>9} {bar}")

    kicks = [r for r in records if r.flags & FLAG_KICKED]
    if kicks:
        first_t = records[0].t_exit_ns if records else 0
        back = [r.address for r in kicks]
        reentry = [r.vmx_ns for r in kicks]
        lines += [
            "",
            f"hosted interrupt path: {len(kicks)} host events brought a vCPU back to the VMX; "
            f"back in the VMX after {_us(statistics.median(back))} (median, max {_us(max(back))}), "
            f"guest entered again {_us(statistics.median(reentry))} later (median; a pause parks it longer)",
            f"  {'time':>10}  vcpu  {'host event':>12} {'back in VMX':>12} {'re-entered':>12}",
        ]
        for r in kicks[:timeline]:
            event = (r.t_exit_ns - r.address - first_t) / 1e6
            lines.append(
                f"  {(r.t_exit_ns - first_t) / 1e6:>8.3f} ms  {r.vcpu:>4}  {event:>9.3f} ms {'+' + _us(r.address):>12} "
                f"{'+' + _us(r.vmx_ns):>12}"
            )
        if len(kicks) > timeline:
            lines.append(f"  ... {len(kicks) - timeline} more")

    stats = trace.trailer.get("stats")
    if isinstance(stats, dict):
        lines += ["", "KVM's own counters beside ours (the kernel also sees the exits it finished itself):"]
        for vcpu in stats.get("vcpus", []):
            kvm = vcpu.get("kvm") or {}
            if not kvm:
                continue
            ours = vcpu.get("world_switches", 0)
            lines.append(
                f"  vcpu{vcpu['vcpu']}: KVM counted {kvm.get('exits', 0)} exits, {ours} reached the VMX "
                f"({max(0, kvm.get('exits', 0) - ours)} handled in the kernel); "
                + ", ".join(f"{k} {v}" for k, v in kvm.items() if k != "exits" and v)
            )
    return "\n".join(lines)


def as_json(trace: Trace) -> str:
    by_reason: dict[str, int] = Counter(reason_name(r.reason) for r in trace.records)
    return json.dumps({
        "path": trace.path,
        "world_switches": len(trace.records),
        "by_reason": by_reason,
        "kicks": [{"vcpu": r.vcpu, "t_exit_ns": r.t_exit_ns, "latency_ns": r.address, "reentry_ns": r.vmx_ns}
                  for r in trace.records if r.flags & FLAG_KICKED],
        "trailer": trace.trailer,
    }, indent=2)
