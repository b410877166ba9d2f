"""The VMX's sandbox, after Firecracker's jailer: once the machine is built (KVM fds, guest memory,
images, taps, the console and the control socket all open), the process gives up what it no longer
needs, in this order:

1. with `--jail DIR --uid U --gid G` (root only): chroot into DIR and become U:G;
2. every capability (bounding, ambient, permitted, effective, inheritable sets);
3. no_new_privs: nothing it could still execute would gain privileges;
4. the seccomp process filter on every thread (`seccomp_filter.py`);
5. each guest-facing thread then stacks the no-paths filter on itself (`confine_thread`).

The library API (`worldswitch.Machine`) never sandboxes the process it runs in: a sandbox is for a
process that is a VMX and nothing else, which `worldswitch run` and `restore` are.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
from pathlib import Path
from typing import Any

from ..record import record
from . import libseccomp, privileges, seccomp_filter, sigsys
from .libseccomp import SandboxError

__all__ = ["Sandbox", "SandboxError", "SandboxSettings", "confine_thread", "describe_process"]

# Standard modules a confined thread (a vCPU, a virtio worker, the console or control I/O) may load
# on first use, on an error path, and could no longer open then: a guest-facing thread may not open
# files at all. Our own code on those threads imports at module level only (tests/test_layering.py).
# Not `traceback`: nothing of ours on those threads formats one, and CPython's own display of an
# uncaught exception opens the source file whatever is imported; importing it (with textwrap) cost
# about 3 ms of every sandboxed start. A jail imports it: the CLI's WORLDSWITCH_DEBUG report uses it.
THREAD_IMPORTS = ("encodings.utf_8", "encodings.latin_1", "faulthandler", "queue")

# In a jail not even the main and control-command threads can open a module later (the files are not
# there): they need what snapshots and reports use, and every module of the parts that run a machine.
JAIL_IMPORTS = ("hashlib", "json", "shutil", "datetime", "traceback")
JAIL_PACKAGES = ("worldswitch.driver", "worldswitch.vmm", "worldswitch.devices", "worldswitch.boot")

M_ARENA_MAX = -8  # glibc's malloc.h


def _malloc_in_one_arena() -> None:
    """glibc's malloc reads /proc/sys/vm/overcommit_memory the first time it shrinks the heap of a
    thread's own arena (arena.c, check_may_shrink_heap). A guest-facing thread may open no path, so
    one that frees enough was killed for it: the monitor's firmware handoff, which decompresses a
    kernel on the vCPU's thread, was. With one arena, every thread's memory comes from the main
    one, which shrinks through brk, and no thread heap exists to shrink. It must come before the
    first thread (one that has an arena keeps it), hence here; Python's GIL leaves little for more
    arenas to win. Without glibc (no mallopt) there is nothing to do."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, 1)


def _import_what_runs_later(jailed: bool) -> None:
    names = list(THREAD_IMPORTS)
    if jailed:
        import pkgutil  # only a jail walks the packages; every other start would pay for its import

        names += JAIL_IMPORTS
        for package in JAIL_PACKAGES:
            names += [module.name for module in
                      pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")]
    for name in names:
        importlib.import_module(name)


@record(frozen=True)
class SandboxSettings:
    enabled: bool = True
    jail: str | None = None
    uid: int | None = None
    gid: int | None = None
    off_reason: str = "--no-sandbox"  # why, when not enabled


class Sandbox:
    """A sandbox checked when made (before set-up, so a bad --jail costs nothing) and applied once."""

    def __init__(self, settings: SandboxSettings, debug: bool = False) -> None:
        self.settings = settings
        self.debug = debug
        self.applied = False
        if settings.jail is None and (settings.uid is not None or settings.gid is not None):
            raise SandboxError("--uid and --gid go with --jail DIR")
        if not settings.enabled:
            if settings.jail is not None:
                raise SandboxError("--jail is part of the sandbox; it cannot go with --no-sandbox")
            return
        if settings.jail is not None:
            privileges.check_jail(settings.jail, settings.uid, settings.gid)
        _malloc_in_one_arena()
        self.binding = seccomp_filter.binding_name()
        # built now, while files can still be opened (libseccomp may read its tables on first use)
        self._process_rules = seccomp_filter.process_filter(debug)
        self._thread_rules = seccomp_filter.guest_facing_filter(debug)

    def apply(self) -> None:
        """Give up the privileges; the process's threads, running and future, all stay confined."""
        global _thread_rules
        if not self.settings.enabled or self.applied:
            return
        _import_what_runs_later(self.settings.jail is not None)
        if self.debug:
            sigsys.install(_syscall_name)
        settings = self.settings
        if settings.jail is not None:
            assert settings.uid is not None and settings.gid is not None
            # glibc loads libgcc_s on a thread's first pthread_exit (to unwind it); inside the jail
            # it is not there, and the process would abort as its first thread ends.
            ctypes.CDLL("libgcc_s.so.1")
            privileges.enter_jail(settings.jail, settings.uid, settings.gid)
        privileges.drop_capabilities()
        privileges.set_no_new_privs()
        try:
            self._process_rules.load()
        except OSError as error:
            raise SandboxError(f"cannot load the seccomp filter: {error.strerror or error}") from None
        _thread_rules = self._thread_rules
        self.applied = True

    def describe(self) -> str:
        """One line for the session's report and --stats."""
        if not self.settings.enabled:
            return f"sandbox: none ({self.settings.off_reason})"
        parts = [f"seccomp allow-list of {len(seccomp_filter.PROCESS_CALLS) + len(seccomp_filter.CONDITIONAL_CALLS)} calls ({self.binding}), "
                 f"guest-facing threads without path calls", "no capabilities", "no_new_privs"]
        if self.settings.jail is not None:
            parts.append(f"jail {self.settings.jail} as {self.settings.uid}:{self.settings.gid}")
        return "sandbox: " + "; ".join(parts)


_thread_rules: libseccomp.Filter | None = None
_local = threading.local()


def confine_thread() -> None:
    """A guest-facing thread calls this before each unit of work: once the sandbox is applied, its
    first call stacks the no-paths filter on the thread; every later call costs one attribute read."""
    rules = _thread_rules
    if rules is None or getattr(_local, "confined", False):
        return
    rules.load()
    _local.confined = True


def _syscall_name(number: int) -> str:
    return libseccomp.syscall_name(number) or "an unknown call"


def describe_process(pid: int | str = "self") -> dict[str, Any]:
    """What confines a process, as its /proc status says (for `worldswitch info` and tests)."""
    fields: dict[str, Any] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Seccomp", "Seccomp_filters", "NoNewPrivs", "CapEff", "CapBnd", "Uid"):
                fields[key] = value.split()[0] if key == "Uid" else value.strip()
    except OSError:
        pass
    return fields


def available() -> str | None:
    """Why this host cannot sandbox a VMX, or None if it can (the reason, not an exception: `info` asks)."""
    try:
        seccomp_filter.binding_name()
    except SandboxError as error:
        return str(error)
    return None if os.path.exists("/proc/self/status") else "no /proc"
