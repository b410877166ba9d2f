"""The x86 CPU as KVM sees it: CPUID, vCPU set-up and long-mode entry, vCPU state for snapshots,
instruction decoding and the trap-and-emulate engine (what KVM leaves undone, finished here)."""
