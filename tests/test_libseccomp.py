"""The ctypes binding of libseccomp (worldswitch/sandbox/libseccomp.py), each filter loaded in a child
process (a filter cannot be taken off again): the kernel must answer as the rules say."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worldswitch.sandbox import libseccomp


def run_confined(body: str) -> subprocess.CompletedProcess[str]:
    program = "import errno, os\nfrom worldswitch.sandbox import libseccomp as l\n" + body
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)


def test_names_and_numbers_are_libseccomp_s() -> None:
    assert libseccomp.syscall_name(59) == "execve"  # x86-64
    assert libseccomp.syscall_name(0) == "read"
    assert libseccomp.syscall_name(100_000) is None
    major, minor, _ = (int(part) for part in libseccomp.version().split("."))
    assert (major, minor) >= (2, 4)


def test_an_unknown_call_is_refused_by_name() -> None:
    rules = libseccomp.Filter(libseccomp.ALLOW)
    with pytest.raises(ValueError, match="nosuchcall"):
        rules.add_rule(libseccomp.TRAP, "nosuchcall")


def test_an_argument_condition_selects_the_calls_it_names() -> None:
    """dup3 from fd 0 fails with EPERM, from fd 1 it does not: struct scmp_arg_cmp reached libseccomp
    intact. (os.dup2 with inheritable=False is dup3 on Linux.)"""
    done = run_confined(
        "rules = l.Filter(l.ALLOW)\n"
        "rules.add_rule(l.errno_action(errno.EPERM), 'dup3', l.Arg(0, l.EQ, 0))\n"
        "rules.set_attribute(l.ATTR_CTL_NNP, 1)\n"
        "rules.load()\n"
        "os.dup2(1, 20, inheritable=False)\n"
        "try:\n    os.dup2(0, 21, inheritable=False)\nexcept PermissionError:\n    print('refused')\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "refused\n"


def test_a_masked_condition_and_the_kill_action() -> None:
    """The process dies by SIGSYS on the masked match only (O_CREAT in openat's flags)."""
    done = run_confined(
        "rules = l.Filter(l.ALLOW)\n"
        "rules.add_rule(l.KILL_PROCESS, 'openat', l.Arg(2, l.MASKED_EQ, os.O_CREAT, os.O_CREAT))\n"
        "rules.set_attribute(l.ATTR_CTL_NNP, 1)\n"
        "rules.load()\n"
        "os.close(os.open('/dev/null', os.O_RDONLY))\n"
        "print('read', flush=True)\n"
        "os.open('/tmp/never-made-by-the-seccomp-test', os.O_WRONLY | os.O_CREAT)\n"
        "print('created')\n")
    assert done.stdout == "read\n"
    assert done.returncode == -31  # SIGSYS
