"""SIGINT, SIGTERM and SIGHUP for the VMX process.

Python's default turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to
be, which may be inside a `with lock:` of the VMM and leave the lock held. While a VM session runs,
these signals are only noted here (no locks, no allocation beyond a list append) and the session's
wait loop turns them into an orderly stop. Outside a session they interrupt as usual.
"""

from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    def __init__(self) -> None:
        self.received: list[int] = []
        self.in_session = False
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        """From the main thread: take over the signals until restore(). A signal ignored when the
        process started stays ignored (`nohup worldswitch run ... &` survives the logout)."""
        for signum in HANDLED:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.in_session:
            raise KeyboardInterrupt  # main() reports "interrupted" in one line
        self.received.append(signum)

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None
