"""Known defects of a test host that tests must work around, told to the tests through the environment
by the host that has them (tests/hosts/nested.py sets them in L1; docs/hosts.md describes each)."""

from __future__ import annotations

import os

# L0's QEMU runs L2's XSETBV without checking the SVM intercept (QEMU before 8.2; docs/hosts.md,
# issue 11): KVM in L1 never learns L2's XCR0 and answers CPUID leaf 0xD for XCR0 at reset.
XSETBV_UNSEEN = "WORLDSWITCH_TEST_XSETBV_UNSEEN"


def xsetbv_unseen() -> bool:
    return bool(os.environ.get(XSETBV_UNSEEN))


# L0's QEMU loads L2's DR7 from the VMCB without arming its own breakpoints for it (QEMU before 9.1;
# docs/hosts.md, issue 13): a hardware breakpoint that KVM in L1 sets for its guest never fires.
BREAKPOINTS_IGNORED = "WORLDSWITCH_TEST_BREAKPOINTS_IGNORED"


def breakpoints_ignored() -> bool:
    return bool(os.environ.get(BREAKPOINTS_IGNORED))
