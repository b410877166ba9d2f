"""Kicking a vCPU back to the VMX: the hosted interrupt path, driven from the host side.

To bring a vCPU thread out of the guest, the VMX sets kvm_run.immediate_exit and sends the vCPU
thread a signal. If the thread is inside KVM_RUN, the signal makes the kernel leave the guest and
KVM_RUN return EINTR; if it is in the VMX between two entries, immediate_exit makes the next
KVM_RUN return EINTR before entering the guest. Either way the request is seen exactly once, and
nothing polls.

The signal needs a handler (its default action would kill the process), and Python installs
handlers only from the main thread, so the first Vmm must be created there.
"""

from __future__ import annotations

import signal
import threading

from ..errors import ConfigError

KICK_SIGNAL = signal.SIGUSR1


def _ignore_kick(signum: int, frame: object) -> None:
    """The handler's existence is the point: it turns the signal into an EINTR for KVM_RUN."""


def install_kick_handler() -> None:
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError(
            "the first worldswitch machine must be created in the main thread "
            f"(it installs the {KICK_SIGNAL.name} handler that kicks vCPUs out of the guest)"
        )
    signal.signal(KICK_SIGNAL, _ignore_kick)


def kick_thread(thread_id: int) -> None:
    try:
        signal.pthread_kill(thread_id, KICK_SIGNAL)
    except ProcessLookupError:
        pass  # the vCPU thread has already ended
