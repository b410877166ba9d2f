"""The `worldswitch` command's first module: it runs before the CLI's imports.

Python turns Ctrl-C into a KeyboardInterrupt from its first bytecode on, so one pressed while the
CLI's modules are still importing (the first ~0.1 s) would print a traceback from deep inside the
import system. Until main() installs the VMX's own handlers, Ctrl-C ends the process the way it
ends any program that has not started its work yet: at once and quietly. (The interpreter's own
start-up, before this module, stays Python's.)
"""

from __future__ import annotations

import signal


def main() -> int:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    from .cli import main as cli_main

    return cli_main(whole_process=True)
