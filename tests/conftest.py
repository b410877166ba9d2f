"""Test tiers: pure unit tests run anywhere; tests marked `kvm` run on the real /dev/kvm.

worldswitch needs KVM, so a missing or unusable /dev/kvm makes the `kvm` tests fail, loudly. On a
machine without KVM, WORLDSWITCH_SKIP_KVM_TESTS=1 skips them instead (CI never sets it)."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.journal"]  # a retry on the nested host resumes where the last attempt stopped


def _kvm_problem() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as error:
        return f"/dev/kvm unusable: {error.strerror}"
    os.close(fd)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problem = _kvm_problem()
    if problem is None or not os.environ.get("WORLDSWITCH_SKIP_KVM_TESTS"):
        return
    skip = pytest.mark.skip(reason=f"{problem} (WORLDSWITCH_SKIP_KVM_TESTS is set)")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


# --- fixtures of the virtio tests (test_virtio.py, test_virtio_packed.py) ---------------------------


@pytest.fixture
def memory():
    """16 MiB of guest memory without a VM: virtio devices only need the accessor."""
    from worldswitch.memory.guest import GuestMemory

    mem = GuestMemory([(0, 16 << 20)])
    yield mem
    mem.close()


@pytest.fixture
def image(tmp_path):
    """A 4 MiB disk image whose every sector holds bytes 0..255 twice."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (4 << 20 >> 8))
    return path


FLAT32_RAM = 2 << 20  # 1 MiB and above too: GRUB unpacks its core there


@pytest.fixture
def flat32():
    """A vCPU in 32-bit protected mode without paging, flat segments (as SeaBIOS and GRUB run), and
    FLAT32_RAM of guest memory: (vcpu, memory)."""
    from worldswitch.driver import structs as s
    from worldswitch.driver.kvm import Kvm
    from worldswitch.memory.guest import GuestMemory

    kvm = Kvm.open()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.create_irqchip()
    memory = GuestMemory([(0, FLAT32_RAM)])
    memory.register(vm)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    sregs = vcpu.get_sregs()
    code = s.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x8, type=0xB, present=1, db=1, s=1, g=1)
    data = s.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1, db=1, s=1, g=1)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = data
    sregs.cr0 = 0x11  # PE, ET
    sregs.cr4 = sregs.efer = 0
    vcpu.set_sregs(sregs)
    yield vcpu, memory
    vcpu.close()
    vm.close()
    kvm.close()
    memory.close()
