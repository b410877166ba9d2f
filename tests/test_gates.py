"""The facts an in-guest monitor stands on (issue 13, docs/monitor.md), checked on this host with the
`gates` guest: an exception or interrupt from ring 3 reaches a handler in ring 3 itself, and on a host
that emulates kernel code (PVM) that handler runs natively, where a ring-0 one is emulated.

KVM's own count of emulated instructions is read between the guest's SYNC (the rounds begin) and its
DONE (they are over), so the ring-0 set-up before them does not count."""

from __future__ import annotations

import pytest

from bench.gates import run_gates

pytestmark = pytest.mark.kvm

ROUNDS = {"int3": 1000, "gp": 1000, "timer": 100}


@pytest.mark.parametrize("event", sorted(ROUNDS))
def test_a_gate_to_the_user_code_segment_runs_its_handler_natively_in_ring_3(event: str) -> None:
    rounds = ROUNDS[event]
    run = run_gates(f"{event} {rounds}")
    assert (run.handled, run.ring) == (rounds, 3)
    if run.emulated is not None:  # KVM may decode the faulting `hlt` (or the EOI store) once per round; no handler code
        assert run.emulated <= 2 * rounds, f"{run.emulated} instructions emulated in {rounds} rounds"


@pytest.mark.parametrize("event", sorted(ROUNDS))
def test_a_handler_in_ring_0_is_what_a_kernel_code_emulating_host_emulates(event: str) -> None:
    rounds = ROUNDS[event]
    run = run_gates(f"{event} {rounds} kernel")
    assert (run.handled, run.ring) == (rounds, 0)
    if run.emulated is None or not run.kernel_code_emulated:
        pytest.skip("this host runs ring-0 code natively: nothing is emulated either way")
    assert run.emulated >= 20 * rounds, f"only {run.emulated} instructions emulated in {rounds} rounds"
