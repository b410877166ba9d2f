"""With WORLDSWITCH_DEBUG set, a call the filter forbids traps (SIGSYS) instead of killing outright,
and this handler names it: the system call, the thread, the Python stack that made it. Then the
process ends as the kill would have ended it (status 128 + SIGSYS).

Python's own signal handlers run later, on the main thread, and do not see siginfo; the call's number
is only in siginfo (si_syscall), so the handler is installed with sigaction(SA_SIGINFO) through
ctypes. Running Python inside a signal handler is not async-signal-safe in general; it is acceptable
here because the process ends right after and only on the debugging path.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
from typing import Any

EXIT_SIGSYS = 128 + signal.SIGSYS
SA_SIGINFO = 0x4


class SigsysInfo(ctypes.Structure):
    """The start of siginfo_t as the kernel fills it for SIGSYS (asm-generic/siginfo.h, _sigsys)."""
    _fields_ = [("signo", ctypes.c_int), ("errno", ctypes.c_int), ("code", ctypes.c_int), ("pad", ctypes.c_int),
                ("call_addr", ctypes.c_void_p), ("syscall", ctypes.c_int), ("arch", ctypes.c_uint)]


HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(SigsysInfo), ctypes.c_void_p)


class Sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86-64."""
    _fields_ = [("handler", HANDLER), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


_installed: list[Any] = []  # the callback must outlive every thread that may trap


def install(name_of: Any) -> None:
    """Name a trapped call on stderr and end the process; `name_of(number)` gives the call's name."""
    def on_sigsys(signo: int, info: Any, context: Any) -> None:
        number = info.contents.syscall
        line = (f"worldswitch: the sandbox stopped a forbidden system call: {name_of(number)} ({number}) "
                f"in thread {threading.current_thread().name}\n")
        os.write(2, line.encode())
        sys.stderr.flush()
        faulthandler.dump_traceback(all_threads=False)
        os._exit(EXIT_SIGSYS)

    handler = HANDLER(on_sigsys)
    action = Sigaction(handler=handler, flags=SA_SIGINFO)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sigaction(signal.SIGSYS, ctypes.byref(action), None) != 0:
        raise OSError(ctypes.get_errno(), "sigaction(SIGSYS)")
    _installed.append(handler)
