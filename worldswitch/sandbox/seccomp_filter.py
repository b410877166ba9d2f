"""The VMX's system-call allow-lists, built with libseccomp (`libseccomp.py` binds it).

Two filters, stacked as the kernel allows (the strictest answer wins):
- the *process* filter, for every thread after set-up: what the VMX needs to run a guest, drive it
  through the control socket, snapshot it and power-cycle it (`--reboot` builds a new VM);
- the *guest-facing* filter, added by each thread that handles what a guest does (vCPUs, device
  workers, the console and control I/O threads): no path names at all, so nothing a guest or a
  client provokes there can open, create, rename or remove a file.
A call outside them is never obeyed: the process ends by SIGSYS, or with WORLDSWITCH_DEBUG set, the
call is named on stderr first (see `sigsys.py`).
"""

from __future__ import annotations

import errno
import os
import socket

from . import libseccomp
from .libseccomp import ALLOW, ATTR_CTL_NNP, ATTR_CTL_TSYNC, EQ, MASKED_EQ, Arg, Filter


def binding_name() -> str:
    """What builds the filters, for reports: libseccomp and its version (SandboxError without it)."""
    return f"libseccomp {libseccomp.version()}"


# What every VMX thread may do after set-up, by purpose. Names are x86-64 Linux system calls.
MEMORY = ("mmap", "munmap", "mprotect", "mremap", "madvise", "mincore", "brk")
THREADS = ("futex", "set_robust_list", "rseq", "exit", "exit_group", "gettid", "getpid", "sched_yield",
           "sched_getaffinity", "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday",
           "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "getrandom")
FILE_DESCRIPTORS = ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
                    "pwritev2", "lseek", "close", "fstat", "newfstatat", "statx", "fcntl", "dup", "dup3",
                    "fdatasync", "fsync", "fallocate", "ftruncate", "poll", "ppoll", "select", "pselect6",
                    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "eventfd2", "pipe2")
# The control socket's clients (the listening socket exists before the filter; no new sockets).
CONTROL = ("accept4", "recvfrom", "recvmsg", "sendto", "sendmsg", "getsockname", "getpeername", "shutdown",
           "getsockopt")
# Snapshots (into a new directory, renamed into place) and --reboot (a new VM from the same files).
PATHS = ("openat", "mkdir", "rename", "unlink", "unlinkat", "rmdir", "getdents64", "readlink", "getcwd", "access", "faccessat2")
# A thread stacking the guest-facing filter on itself (a filter can only take rights away).
SECCOMP = ("seccomp",)
PROCESS_CALLS = MEMORY + THREADS + FILE_DESCRIPTORS + CONTROL + PATHS + SECCOMP
# Allowed only with the arguments process_filter() names.
CONDITIONAL_CALLS = ("ioctl", "clone", "tgkill", "socketpair")

# The system calls that name a path: what a guest-facing thread may never make.
PATH_CALLS = ("open", "openat", "openat2", "creat", "mkdir", "mkdirat", "mknod", "mknodat", "rename", "renameat",
              "renameat2", "unlink", "unlinkat", "rmdir", "link", "linkat", "symlink", "symlinkat", "truncate",
              "chmod", "fchmodat", "chown", "lchown", "fchownat", "utimensat", "execve", "execveat")

# ioctl types the VMX uses after set-up: KVM's (0xAE) and the terminal's and tun's ('T'): a guest-facing
# thread's ioctl on another kind of device is refused.
IOCTL_TYPES = (0xAE, 0x54)
IOCTL_TYPE_MASK = 0xFF00
CLONE_THREAD = 0x00010000  # a thread, never a new process


def _action(debug: bool) -> int:
    return libseccomp.TRAP if debug else libseccomp.KILL_PROCESS


def process_filter(debug: bool) -> Filter:
    """Everything not allowed here ends the process (or traps, with `debug`)."""
    rules = Filter(_action(debug))
    for name in PROCESS_CALLS:
        rules.add_rule(ALLOW, name)
    for kind in IOCTL_TYPES:
        rules.add_rule(ALLOW, "ioctl", Arg(1, MASKED_EQ, IOCTL_TYPE_MASK, kind << 8))
    rules.add_rule(ALLOW, "clone", Arg(0, MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    # clone3 passes its flags in memory, where a filter cannot look: answer ENOSYS, and glibc falls
    # back to clone, whose flags it can check.
    rules.add_rule(libseccomp.errno_action(errno.ENOSYS), "clone3")
    # Signals only to this process's own threads (kicking a vCPU out of KVM_RUN).
    rules.add_rule(ALLOW, "tgkill", Arg(0, EQ, os.getpid()))
    # Unix-domain socket pairs only (no network): nothing in the VMX makes one today, but a denied
    # socket(AF_UNIX) is not a threat worth a crash; every other family is.
    rules.add_rule(ALLOW, "socketpair", Arg(0, EQ, socket.AF_UNIX))
    rules.set_attribute(ATTR_CTL_TSYNC, 1)  # every thread at once, those running included
    return rules


def guest_facing_filter(debug: bool) -> Filter:
    """Stacked on the process filter by a thread that handles guest or client input."""
    rules = Filter(ALLOW)
    action = _action(debug)
    for name in PATH_CALLS:
        rules.add_rule(action, name)
    rules.set_attribute(ATTR_CTL_NNP, 0)  # already set for the process; prctl is not allowed
    return rules
