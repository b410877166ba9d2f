"""The Python API's console buffer, without a VM: bounded, searchable, panic-aware."""

from __future__ import annotations

import threading

import pytest

from worldswitch.vmx.api import ConsoleBuffer


def test_expect_moves_past_each_match_and_waits_for_output() -> None:
    console = ConsoleBuffer()
    console(b"login: ")
    assert console.expect("login:").group(0) == b"login:"
    threading.Timer(0.05, console, args=(b"# \n",)).start()
    assert console.expect(r"# ", timeout=5)
    with pytest.raises(TimeoutError):
        console.expect("login:", timeout=0.05)  # the first one was consumed


def test_only_the_newest_bytes_are_kept() -> None:
    echoed: list[bytes] = []
    console = ConsoleBuffer(echo=echoed.append, keep=16)
    console(b"0123456789")
    console.expect("789")
    console(b"abcdefghij")
    assert bytes(console.data) == b"456789abcdefghij" and console.dropped == 4
    assert console.expect("abc").end() == 9  # the cursor moved with the dropped bytes
    assert echoed == [b"0123456789", b"abcdefghij"]


def test_a_kernel_panic_line_is_reported_once() -> None:
    panics: list[str] = []
    console = ConsoleBuffer()
    console.on_panic = panics.append
    console(b"[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs on \"\" or unknown-block(0,0)")
    assert panics == []  # not until the line is complete
    console(b"\r\n")
    console(b"more output\n")
    assert panics == ['Kernel panic - not syncing: VFS: Unable to mount root fs on "" or unknown-block(0,0)']


def test_send_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        ConsoleBuffer().send("x")
