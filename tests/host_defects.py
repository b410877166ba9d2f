"""Known defects of a test host that tests must work around, told to the tests through the environment
by the host that has them (tests/hosts/nested.py sets them in L1; docs/hosts.md describes each)."""

from __future__ import annotations

import os

# L0's QEMU runs L2's XSETBV without checking the SVM intercept (QEMU before 8.2; docs/hosts.md,
# issue 11): KVM in L1 never learns L2's XCR0 and answers CPUID leaf 0xD for XCR0 at reset.
XSETBV_UNSEEN = "WORLDSWITCH_TEST_XSETBV_UNSEEN"


def xsetbv_unseen() -> bool:
    return bool(os.environ.get(XSETBV_UNSEEN))
