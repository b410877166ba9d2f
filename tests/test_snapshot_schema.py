"""Every state a snapshot stores is a typed dataclass (worldswitch/state.py); their layout is part of
the snapshot format, so a change to any of them must come with a new format version. The
fingerprint below is of the layouts as they are at the version beside it."""

from __future__ import annotations

import hashlib

from worldswitch.devices.acpi_pm import AcpiPmState
from worldswitch.devices.cmos import CmosState
from worldswitch.devices.i8042 import I8042State
from worldswitch.devices.ide import IdeState
from worldswitch.devices.serial import SerialState
from worldswitch.devices.testdev import SequenceState
from worldswitch.devices.virtio.console import ConsoleState
from worldswitch.devices.virtio.device import NoDeviceState
from worldswitch.devices.virtio.net import NetState
from worldswitch.devices.virtio.packed import PackedQueueState
from worldswitch.devices.virtio.pci import QueueSetupState, VirtioPciState
from worldswitch.devices.virtio.queue import SplitQueueState
from worldswitch.state import decode, schema, to_json
from worldswitch.vmm import snapshot
from worldswitch.vmm.config import DiskConfig, MachineConfig, NetConfig
from worldswitch.vmm.x86.cpu_state import VcpuState, VmState

STATES = (AcpiPmState, ConsoleState, I8042State, NetState, NoDeviceState, PackedQueueState, QueueSetupState,
          SequenceState, SerialState, SplitQueueState, VcpuState, VirtioPciState, VmState,
          MachineConfig, DiskConfig, NetConfig, CmosState, IdeState)  # the machine's description is stored too

# snapshot format version -> fingerprint of every state's layout at that version
# (4 adds the machine description; 8 changed the monitor's handoff page in guest memory, not a state)
FINGERPRINTS = {3: "06e129d4569fed75", 4: "2410b4303a8f4ae4", 5: "e466b0fc8dc53bc4", 6: "e0b6101bd1ed5f3b",
                7: "1a6bd45f69d33498", 8: "1a6bd45f69d33498"}


def fingerprint() -> str:
    return hashlib.sha256("\n".join(schema(kind) for kind in STATES).encode()).hexdigest()[:16]


def test_a_state_layout_changes_only_with_the_format_version() -> None:
    assert FINGERPRINTS.get(snapshot.VERSION) == fingerprint(), (
        "a snapshot state's layout changed: bump snapshot.VERSION and record the new fingerprint here\n"
        + "\n".join(schema(kind) for kind in STATES))


def test_states_come_back_typed_and_what_does_not_fit_is_refused() -> None:
    state = VirtioPciState(config=b"\x01\x02", bars=[-1, 4096], msix_table=b"", msix_pending=[False], msix_control=0,
                           status=15, isr=0, generation=1, device_feature_select=0, driver_feature_select=1,
                           driver_features=1 << 32, queue_select=0, config_vector=0xFFFF, broken=None,
                           setups=[QueueSetupState(256, 0, True, 4096, 8192, 12288)],
                           queues=[PackedQueueState(3, True, 1, False, 0, [(4, 2)])], device=NetState(b"packet"))
    again = decode(VirtioPciState, to_json(state))
    assert again.setups == state.setups and again.queues == state.queues and again.config == b"\x01\x02"
    assert decode(NetState, again.device) == NetState(b"packet")
    assert decode(SplitQueueState | PackedQueueState, {"last_avail": 1, "used_idx": 2, "signalled_used": 2}) \
        == SplitQueueState(1, 2, 2)
    for bad in ({"last_avail": True, "used_idx": 2, "signalled_used": 2},  # a bool is not an index
                {"last_avail": 1, "used_idx": 2},  # a field missing
                {"last_avail": 1, "used_idx": 2, "signalled_used": 2, "extra": 0}):
        try:
            decode(SplitQueueState, bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was taken")
