"""How a machine ended: one StopReason, the process exit status it maps to, and a one-line message."""

from __future__ import annotations

from enum import Enum

from ..record import field, record


class StopReason(Enum):
    GUEST_EXIT = "guest-exit"  # the guest wrote its exit status to the debug-exit port
    GUEST_DONE = "guest-done"  # a worldswitch guest program reported DONE
    GUEST_ABORT = "guest-abort"  # a worldswitch guest program reported a failed assertion
    POWER_OFF = "power-off"  # ACPI S5 or a KVM shutdown event
    RESET = "reset"  # i8042 reset line, KVM reset event (and no --reboot)
    TRIPLE_FAULT = "triple-fault"  # KVM_EXIT_SHUTDOWN
    GUEST_CRASH = "guest-crash"  # KVM_SYSTEM_EVENT_CRASH (pvpanic-style)
    EMULATION_FAILURE = "emulation-failure"  # KVM_EXIT_INTERNAL_ERROR
    ENTRY_FAILURE = "entry-failure"  # KVM_EXIT_FAIL_ENTRY
    TIMEOUT = "timeout"  # the --timeout expired
    STOPPED = "stopped"  # the user or the API stopped the machine
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM reached the VMX
    VMX_ERROR = "vmx-error"  # a bug or host failure inside the VMX


# Exit statuses of the `worldswitch run` process, by reason (GUEST_EXIT passes the guest's own).
EXIT_STATUS = {
    StopReason.GUEST_DONE: 0,
    StopReason.POWER_OFF: 0,
    StopReason.RESET: 0,
    StopReason.STOPPED: 0,
    StopReason.GUEST_ABORT: 1,
    StopReason.TRIPLE_FAULT: 3,
    StopReason.GUEST_CRASH: 3,
    StopReason.EMULATION_FAILURE: 4,
    StopReason.ENTRY_FAILURE: 4,
    StopReason.VMX_ERROR: 70,
    StopReason.TIMEOUT: 124,
    StopReason.INTERRUPTED: 130,
}


@record(frozen=True)
class MachineResult:
    reason: StopReason
    message: str
    exit_status: int
    value: int = 0  # the guest's exit value or DONE result
    details: dict[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, reason: StopReason, message: str, value: int = 0, **details: object) -> "MachineResult":
        status = value & 0xFF if reason is StopReason.GUEST_EXIT else EXIT_STATUS[reason]
        return cls(reason, message, status, value, dict(details))

    @property
    def ok(self) -> bool:
        return self.exit_status == 0
