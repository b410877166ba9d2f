"""Suspend to disk: a machine's complete state in a self-describing directory, and back.

    DIR/manifest.json   format and version, when, by which worldswitch, the machine description,
                        the memory layout, and a SHA-256 for every other file
    DIR/vcpus.json      per vCPU: registers, special registers, FPU/XSAVE, XCRs, MSRs, LAPIC,
                        events, debug registers, MP state, CPUID
    DIR/vm.json         PICs, IOAPIC, PIT, kvmclock
    DIR/devices.json    every device's state (UART, i8042, ACPI PM, test device, each virtio
                        function: PCI configuration, BARs, MSI-X, status, queues and their indices)
    DIR/memory.bin      guest RAM as a sparse file: pages that are zero are holes; its content digest
                        (SHA-256 over the non-zero 2 MiB chunks and their addresses) is in the manifest
    DIR/manifest.sha256 the SHA-256 of manifest.json's bytes: every byte a restore reads is covered

A restore trusts nothing it has not checked: the manifest's digest, then every field's type, then each
file's digest, then that the manifest and the state files agree (vCPUs, memory). Files are plain files
in the directory, never links. A VMX killed while writing leaves `.NAME.partial-PID`; the next snapshot
to NAME removes it once that process is gone.

Writing is atomic: everything goes into a temporary directory next to DIR, is flushed to disk, and
is renamed to DIR last; a crash leaves a temporary directory, never a DIR that restores wrongly.
Restoring checks the format version, every checksum and every size before it changes anything.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import os
import queue
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import WorldswitchError
from ..memory.guest import PAGE_SIZE, GuestMemory
from ..record import asdict, record
from ..state import decode, to_json
from ..version import __version__
from .x86.cpu_state import VcpuState, VmState, restore_vcpu, restore_vm, save_vcpu, save_vm, saveable_msrs

if TYPE_CHECKING:  # only for the types: a snapshot is taken of a machine, never the other way round
    from .machine import Vmm

FORMAT = "worldswitch-snapshot"
VERSION = 8  # 2: manifest.sha256 covers the manifest; 3: every state typed (worldswitch/state.py);
# 4: the machine description keyed by its option names (append, disk, net); 5: firmware machines (CMOS, IDE CD-ROM);
# 6: the machine description says whether the program runs under the in-guest monitor; 7: and whether each network
# offers offloads; 8: the in-guest monitor's handoff page (in guest memory, which an AP started after a restore
# reads) has 20 words, flag_traps the last (boot/monitor.py)
FILES = ("vcpus.json", "vm.json", "devices.json")  # checked by SHA-256; memory.bin by its own digest
MANIFEST_DIGEST = "manifest.sha256"

CHUNK = 2 << 20  # memory is scanned and copied in 2 MiB pieces
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_CHUNK = bytes(CHUNK)

Progress = Callable[[str, int, int], None]  # (phase, done, total)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class SnapshotError(WorldswitchError):
    """A snapshot that cannot be written, or cannot be trusted to restore."""


@record(frozen=True)
class SnapshotInfo:
    path: str
    memory_bytes: int  # guest RAM described
    stored_bytes: int  # non-zero pages actually written
    seconds: float


# --- guest memory ------------------------------------------------------------------------------


def _resident(memory: GuestMemory, region_index: int) -> bytes:
    """One byte per page of a region, bit 0 set where the page is backed (never-touched pages
    are zero and need no reading)."""
    region = memory.regions[region_index]
    vector = (ctypes.c_ubyte * (region.size // PAGE_SIZE))()
    if _libc.mincore(region.host_addr, region.size, vector) != 0:
        return b"\x01" * (region.size // PAGE_SIZE)  # cannot tell: read everything
    return bytes(vector)


class _Hasher:
    """SHA-256 over (address, chunk) pairs in order, on its own thread: hashlib releases the GIL,
    so hashing one chunk overlaps reading or writing the next."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="snapshot-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            address, data = item
            self._digest.update(address.to_bytes(8, "little"))
            self._digest.update(data)

    def add(self, address: int, data: bytes) -> None:
        self._queue.put((address, data))

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._digest.hexdigest()


def _nonzero_runs(chunk: bytes) -> list[tuple[int, int]]:
    """(start, end) offsets of the runs of non-zero pages in a chunk."""
    if chunk.find(ZERO_PAGE) < 0:
        return [(0, len(chunk))]  # not even an unaligned zero page: the common case of used RAM
    runs: list[tuple[int, int]] = []
    run_start = -1
    for page in range(0, len(chunk), PAGE_SIZE):
        zero = chunk[page : page + PAGE_SIZE] == ZERO_PAGE
        if zero and run_start >= 0:
            runs.append((run_start, page))
            run_start = -1
        elif not zero and run_start < 0:
            run_start = page
    if run_start >= 0:
        runs.append((run_start, len(chunk)))
    return runs


def write_memory(memory: GuestMemory, path: Path, progress: Progress | None) -> tuple[str, int]:
    """Non-zero pages at their offsets in a sparse file; returns (digest, bytes stored). The digest
    covers every 2 MiB chunk that is not all zero, with its guest-physical address."""
    hasher = _Hasher()
    stored = 0
    total = memory.size
    done = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, sum(region.size for region in memory.regions))
        file_offset = 0
        for index, region in enumerate(memory.regions):
            resident = _resident(memory, index)
            view = memory.view(region.guest_phys_addr, region.size)
            for chunk_start in range(0, region.size, CHUNK):
                chunk_end = min(chunk_start + CHUNK, region.size)
                first_page, last_page = chunk_start // PAGE_SIZE, chunk_end // PAGE_SIZE
                if any(byte & 1 for byte in resident[first_page:last_page]):
                    chunk = bytes(view[chunk_start:chunk_end])
                    if chunk != ZERO_CHUNK[: len(chunk)]:
                        hasher.add(region.guest_phys_addr + chunk_start, chunk)
                        for run_start, run_end in _nonzero_runs(chunk):
                            os.pwrite(fd, memoryview(chunk)[run_start:run_end], file_offset + chunk_start + run_start)
                            stored += run_end - run_start
                done += chunk_end - chunk_start
                if progress is not None:
                    progress("memory", done, total)
            file_offset += region.size
        os.fsync(fd)
    finally:
        os.close(fd)
        digest = hasher.hexdigest()
    return digest, stored


def _data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    ranges = []
    position = start
    while position < end:
        try:
            data_start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:
            break  # nothing but holes to the end of the file
        if data_start >= end:
            break
        data_end = min(os.lseek(fd, data_start, os.SEEK_HOLE), end)
        ranges.append((data_start, data_end))
        position = data_end
    return ranges


def read_memory(memory: GuestMemory, path: Path, expected_digest: str, progress: Progress | None) -> None:
    """Load memory.bin's data ranges into fresh (zero) guest memory, verifying the digest: every
    2 MiB chunk that holds data is hashed as it lands, in the order write_memory hashed them."""
    expected_size = sum(region.size for region in memory.regions)
    if path.stat().st_size != expected_size:
        raise SnapshotError(f"memory.bin is {path.stat().st_size} bytes; the machine has {expected_size} of RAM")
    hasher = _Hasher()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            file_offset = 0
            for region in memory.regions:
                view = memory.view(region.guest_phys_addr, region.size)
                pieces: dict[int, list[tuple[int, int]]] = {}  # chunk start -> its data pieces
                for first, last in _data_ranges(fd, file_offset, file_offset + region.size):
                    low, high = first - file_offset, last - file_offset
                    while low < high:
                        chunk_start = low // CHUNK * CHUNK
                        piece_end = min(high, chunk_start + CHUNK)
                        pieces.setdefault(chunk_start, []).append((low, piece_end))
                        low = piece_end
                for chunk_start, parts in sorted(pieces.items()):
                    chunk_end = min(chunk_start + CHUNK, region.size)
                    for low, high in parts:
                        if os.preadv(fd, [view[low:high]], file_offset + low) != high - low:
                            raise SnapshotError("memory.bin ends early")
                    chunk = bytes(view[chunk_start:chunk_end])
                    if chunk != ZERO_CHUNK[: len(chunk)]:
                        hasher.add(region.guest_phys_addr + chunk_start, chunk)
                    if progress is not None:
                        progress("memory", file_offset + chunk_end, expected_size)
                file_offset += region.size
        finally:
            os.close(fd)
    finally:
        digest = hasher.hexdigest()
    if digest != expected_digest:
        raise SnapshotError("guest memory does not match its checksum: the snapshot is corrupt")


# --- files -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as out:
        json.dump(data, out, indent=1)
        out.flush()
        os.fsync(out.fileno())


def take(machine: Vmm, path: str | Path, progress: Progress | None = None) -> SnapshotInfo:
    """Suspend to disk: quiesce the machine, write it to the new directory `path`, and let it go on
    running if it was."""
    with machine.quiesced():
        return save(machine, path, asdict(machine.config) if machine.config is not None else {}, progress)


def save(machine: Vmm, path: str | Path, config: dict[str, Any], progress: Progress | None = None) -> SnapshotInfo:
    """Write `machine` (paused, devices quiesced by the caller) to the directory `path`."""
    started = time.monotonic()
    target = Path(path)
    if target.exists():
        raise SnapshotError(f"{target} already exists; a snapshot never overwrites")
    if not target.parent.is_dir():
        raise SnapshotError(f"{target.parent} is not a directory")
    _remove_stale_partials(target)
    temporary = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        msrs = saveable_msrs(machine.kvm, machine.runners[0].vcpu)
        _write_json(temporary / "vcpus.json", [save_vcpu(r.vcpu, msrs).as_json() for r in machine.runners])
        _write_json(temporary / "vm.json", save_vm(machine.vm, machine.paused_clock).as_json())
        _write_json(temporary / "devices.json", to_json(machine.device_states()))
        digest, stored = write_memory(machine.memory, temporary / "memory.bin", progress)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "worldswitch": __version__,
            "host": machine.host.driver if machine.host is not None else "unknown",
            "machine": config,
            "vcpus": len(machine.runners),
            "memory": [[region.guest_phys_addr, region.size] for region in machine.memory.regions],
            "memory_digest": digest,
            "stored_bytes": stored,
            "disks": [_disk_fingerprint(disk["path"]) for disk in config.get("disk", [])],
            "files": {name: _sha256(temporary / name) for name in FILES},
        }
        _write_json(temporary / "manifest.json", manifest)
        (temporary / MANIFEST_DIGEST).write_text(_sha256(temporary / "manifest.json") + "\n")
        directory = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        os.rename(temporary, target)  # the moment the snapshot exists, it is complete
        parent = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(parent)
        finally:
            os.close(parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return SnapshotInfo(str(target), machine.memory.size, stored, time.monotonic() - started)


def _remove_stale_partials(target: Path) -> None:
    """What a VMX killed while writing `target` left behind, once that VMX is gone."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[1]
        if not pid.isdigit() or partial.is_symlink() or not partial.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process is alive: perhaps writing it right now
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            continue  # alive, and someone else's


def _disk_fingerprint(path: str) -> dict[str, Any]:
    """Enough to notice that a disk image changed after the snapshot (its content is not copied)."""
    try:
        status = os.stat(path)
    except OSError:
        return {"path": path, "size": None, "mtime_ns": None}
    return {"path": path, "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def changed_disks(manifest: dict[str, Any]) -> list[str]:
    """Disk images written since the snapshot was taken: the guest's cached view of them may
    disagree with what is on disk now, as after restoring any VM whose disks went on being used."""
    return [disk["path"] for disk in manifest.get("disks", []) if _disk_fingerprint(disk["path"]) != disk]


@record
class Snapshot:
    path: Path
    manifest: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["machine"]


def _plain_file(directory: Path, name: str) -> Path:
    """directory/name, which must be a regular file there: never a link to somewhere else."""
    file = directory / name
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise SnapshotError(f"{directory} is missing {name}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"{name} in {directory} is not a plain file (a link, or a device): refused")
    return file


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _exact(value: Any, kind: type) -> bool:
    """isinstance without bool passing for int, or float for anything else."""
    return type(value) is kind


def check_manifest(manifest: Any) -> None:
    """Every field the restore uses, of exactly the type it must have."""
    def fail(what: str) -> None:
        raise SnapshotError(f"the snapshot's manifest is malformed: {what}")

    if not isinstance(manifest, dict):
        fail("not a JSON object")
    if not _exact(manifest.get("vcpus"), int) or not 1 <= manifest["vcpus"] <= 1024:
        fail("vcpus is not a whole number of vCPUs")
    memory = manifest.get("memory")
    if not isinstance(memory, list) or not memory or not all(
            isinstance(r, list) and len(r) == 2 and all(_exact(x, int) and x >= 0 for x in r) for r in memory):
        fail("memory is not a list of [address, size] pairs")
    for key in ("memory_digest",):
        if not _exact(manifest.get(key), str) or len(manifest[key]) != 64:
            fail(f"{key} is not a SHA-256")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES) or not all(_exact(v, str) for v in files.values()):
        fail(f"files must name exactly {', '.join(FILES)} with their digests")
    if not _exact(manifest.get("stored_bytes"), int):
        fail("stored_bytes is not a number of bytes")
    if not isinstance(manifest.get("machine"), dict):
        fail("machine is not a machine description")
    if not _exact(manifest["machine"].get("cpus"), int) or manifest["machine"]["cpus"] != manifest["vcpus"]:
        fail(f"the machine description's cpus disagrees with vcpus ({manifest['vcpus']})")
    disks = manifest.get("disks", [])
    if not isinstance(disks, list) or not all(isinstance(d, dict) and _exact(d.get("path"), str) for d in disks):
        fail("disks is not a list of disk fingerprints")


def open_snapshot(path: str | Path) -> Snapshot:
    """Read and check a snapshot's manifest and files; nothing is restored yet."""
    directory = Path(path)
    if not directory.is_dir():
        raise SnapshotError(f"{directory} is not a snapshot directory")
    try:
        manifest_path = _plain_file(directory, "manifest.json")
    except SnapshotError:
        raise SnapshotError(f"{directory} has no manifest.json: not a snapshot, or an unfinished one") from None
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, OSError) as error:
        raise SnapshotError(f"{manifest_path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{directory} is not a worldswitch snapshot")
    version = manifest.get("version")
    if not _exact(version, int) or version != VERSION:
        raise SnapshotError(f"{directory} is snapshot format version {version!r}; this worldswitch reads {VERSION}")
    try:
        recorded = _plain_file(directory, MANIFEST_DIGEST).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise SnapshotError(f"{directory}/{MANIFEST_DIGEST} is unreadable: {error}") from None
    if hashlib.sha256(raw).hexdigest() != recorded:
        raise SnapshotError("manifest.json does not match its checksum: the snapshot was changed or damaged")
    check_manifest(manifest)
    for name in FILES:
        if _sha256(_plain_file(directory, name)) != manifest["files"][name]:
            raise SnapshotError(f"{name} does not match its checksum: the snapshot was changed or damaged")
    _plain_file(directory, "memory.bin")
    return Snapshot(directory, manifest)


def restore_device_states(machine: Vmm, states: dict[str, dict]) -> None:  # type: ignore[type-arg]
    for name, binding in machine.parts.states.items():
        if name not in states:
            raise SnapshotError(f"the snapshot has no state for device {name}: it was taken of another machine")
        try:
            binding.load(decode(binding.kind, states[name]))
        except (TypeError, ValueError) as error:
            raise SnapshotError(f"the saved state of {name} does not fit: {error}") from None


def restore(machine: Vmm, snapshot: Snapshot, progress: Progress | None = None) -> None:
    """Put a snapshot's state into a freshly built machine (same description, not started)."""
    manifest = snapshot.manifest
    layout = [[region.guest_phys_addr, region.size] for region in machine.memory.regions]
    if manifest["memory"] != layout:
        raise SnapshotError("the snapshot's memory layout differs from the machine's")
    if manifest["vcpus"] != len(machine.runners):
        raise SnapshotError(f"the snapshot has {manifest['vcpus']} vCPUs, the machine {len(machine.runners)}")
    try:
        saved = json.loads((snapshot.path / "vcpus.json").read_text())
        if not isinstance(saved, list) or len(saved) != manifest["vcpus"]:
            raise SnapshotError(f"vcpus.json holds {len(saved) if isinstance(saved, list) else 'no list of'} vCPUs; "
                                f"the manifest says {manifest['vcpus']}")
        vcpus = [VcpuState.from_json(data) for data in saved]
        vm_state = VmState.from_json(json.loads((snapshot.path / "vm.json").read_text()))
        devices = json.loads((snapshot.path / "devices.json").read_text())
    except (ValueError, KeyError, TypeError) as error:
        raise SnapshotError(f"the snapshot's state is malformed: {error}") from None
    read_memory(machine.memory, snapshot.path / "memory.bin", manifest["memory_digest"], progress)
    restore_vm(machine.vm, vm_state)
    for runner, state in zip(machine.runners, vcpus):
        restore_vcpu(runner.vcpu, state)
    restore_device_states(machine, devices)
    for path in changed_disks(manifest):
        machine.warn(f"disk {path} changed after the snapshot was taken; the guest may see it inconsistently")
