"""A test host with hardware virtualization, by nesting: QEMU's software CPU (TCG) emulating an x86
CPU with virtualization extensions, Debian's cloud kernel loading KVM's module for them, and the
current checkout shared into it, so that worldswitch runs on a real VT-x/AMD-V `/dev/kvm`.

What runs where:
- *L0* is this machine. It builds the L1 system once (Debian packages, `apt-get download` and
  `dpkg-deb -x`, into an ext4 image under `.cache/hosts/`), shares the checkout with virtiofsd, and
  runs `qemu-system-x86_64 -accel tcg`.
- *L1* is the nested host: Debian's kernel with a busybox initramfs that loads the modules (KVM, virtio,
  overlayfs, virtiofs), mounts the image read-only under a tmpfs overlay, mounts the checkout at the
  same path as here, and runs `tests/hosts/l1-init` from it, which runs the command.
- *L2* is whatever worldswitch runs on L1's `/dev/kvm`.

The command's standard output and error travel on L1's second and third serial ports straight to this
process's, the kernel's console goes to a log file, and the command's exit status comes back on the
fourth port. Only apt-get downloads (Debian packages); nothing is installed on this machine except
what the host side needs itself (QEMU, whose package also carries virtiofsd).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.host_defects import BREAKPOINTS_IGNORED, XSETBV_UNSEEN  # noqa: E402
from tests.journal_file import Entry, failed, read  # noqa: E402
from worldswitch.boot.initramfs import (CpioEntry, InitramfsSpec, build_initramfs, cpio_newc,  # noqa: E402
                                        resolve_modules)
from worldswitch.errors import WorldswitchError  # noqa: E402
from worldswitch.vmx.debian import DebianLinux, fetch_debian  # noqa: E402

CACHE = REPO / ".cache" / "hosts"
QEMU = "qemu-system-x86_64"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")  # QEMU 7.2's, in Debian's qemu-system-common
TMP_DISK_GIB = 32  # sparse: the host's disk holds only what L1 writes to /tmp
LAYOUT_VERSION = 2  # bump when the image's layout or the stage-1 init changes, to rebuild caches

# L1's user space, as Debian packages (their dependencies are added): Python, worldswitch's own
# dependencies (a jailed VMX imports every VMM module before its chroot, capstone's user among them)
# and the tests', the C toolchain and iasl some tests use, the tools the Linux workload tests use on L1
# (ip, mkfs), and QEMU itself, the peer the benchmarks compare against inside the same nested host.
PACKAGES = (
    "dash", "coreutils", "python3", "python-is-python3", "python3-pytest", "python3-pytest-timeout", "python3-hypothesis",
    "python3-lz4", "python3-zstandard", "python3-capstone", "libseccomp2", "busybox-static", "gcc", "libc6-dev",
    "binutils", "acpica-tools",
    "iproute2", "iputils-ping", "e2fsprogs", "procps", "util-linux", "apt", "qemu-system-x86", "qemu-utils",
    "seabios", "grub-pc-bin", "grub-common", "xorriso",  # booting through firmware: SeaBIOS, GRUB disks and ISOs
)

# Loaded by L1's initramfs, in this order with their dependencies: the root disk and the shared checkout,
# then what worldswitch and its tests need (KVM, taps, veth pairs).
STAGE1_MODULES = ("virtio_pci", "virtio_blk", "overlay", "virtiofs")
HOST_MODULES = ("tun", "veth")


class HostError(WorldswitchError):
    """The nested host could not be built or started (not a failure of the command run inside)."""


@dataclass(frozen=True)
class Flavour:
    """What differs between nested hosts: QEMU's CPU model and the KVM module L1 loads."""
    name: str
    cpu: str
    kvm_module: str


# QEMU's EPYC model less what TCG (QEMU 7.2) does not implement, which QEMU would drop with a warning
# each; nrip-save among them, so kvm_amd decodes the instructions it intercepts itself.
AMDV = Flavour("amdv", "EPYC,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec",
               "kvm_amd")


@dataclass(frozen=True)
class HostImage:
    kernel: Path
    initramfs: Path
    root: Path  # ext4 image of L1's user space, used read-only


def _qemu_version() -> tuple[int, int]:
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", version)
    if found is None:
        raise HostError(f"{QEMU} --version did not say its version: {version[:80]!r}")
    return int(found.group(1)), int(found.group(2))


def _host_defects() -> dict[str, str]:
    """What L0's QEMU gets wrong that the tests in L1 must know (tests/host_defects.py): L2's XSETBV
    let past L1 (QEMU checks the SVM intercept from 8.2 on), L2's breakpoints never armed (from 9.1 on
    VMRUN arms them)."""
    version = _qemu_version()
    return {XSETBV_UNSEEN: "1" if version < (8, 2) else "", BREAKPOINTS_IGNORED: "1" if version < (9, 1) else ""}


# --- building L1 (once; cached) ----------------------------------------------------------------------


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise HostError(f"{' '.join(command[:3])} ... failed: {lines[-1] if lines else result.returncode}")
    return result


def _closure(packages: tuple[str, ...]) -> list[str]:
    """The packages and what they depend on (not recommends), as apt's resolver picks them for an empty
    system (its status file replaced by an empty one, so nothing counts as installed)."""
    command = ["apt-get", "-s", "-o", "Dir::State::status=/dev/null", "--no-install-recommends", "install", *packages]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:  # lists not fetched yet, in a fresh CI machine
        _run(["apt-get", "update", "-q"])
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise HostError(f"apt cannot resolve the nested host's packages: {result.stdout.strip().splitlines()[-1:]}")
    return sorted(line.split()[1] for line in result.stdout.splitlines() if line.startswith("Inst "))


def _download(names: list[str], debs: Path) -> list[Path]:
    debs.mkdir(parents=True, exist_ok=True)
    have = {deb.name.split("_", 1)[0]: deb for deb in debs.glob("*.deb")}
    missing = [name for name in names if name not in have]
    if missing:
        print(f"nested host: apt-get download of {len(missing)} packages", file=sys.stderr)
        _run(["apt-get", "download", *missing], cwd=debs)
        have = {deb.name.split("_", 1)[0]: deb for deb in debs.glob("*.deb")}
    return [have[name] for name in names if name in have]


def _merge_usr(root: Path) -> None:
    """What Debian's usrmerge does at install: /bin, /sbin, /lib, /lib64 become links into /usr (packages
    still ship files on both sides, and dpkg-deb -x does not merge them)."""
    for name in ("bin", "sbin", "lib", "lib64"):
        top, usr = root / name, root / "usr" / name
        usr.mkdir(parents=True, exist_ok=True)
        if top.is_dir() and not top.is_symlink():
            shutil.copytree(top, usr, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(top)
        top.unlink(missing_ok=True)
        top.symlink_to(f"usr/{name}")


def _configure(root: Path) -> None:
    """The files packages' maintainer scripts would have written, and a few a booted system needs."""
    etc = root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nkvm:x:107:\nnogroup:x:65534:\n")
    (etc / "hostname").write_text("nested\n")
    (etc / "hosts").write_text("127.0.0.1 localhost nested\n::1 localhost\n")
    for name in ("root", "tmp", "run", "proc", "sys", "dev", "var/tmp", "usr/local/busybox"):
        (root / name).mkdir(parents=True, exist_ok=True)
    gcc = root / "usr/bin/cc"  # an alternatives link normally
    if not gcc.exists():
        gcc.symlink_to("gcc")
    _run(["ldconfig", "-r", str(root)])
    # Debian compiles Python modules at install (py3compile); do it here once, not on the emulated CPU
    # at every start (the same bytecode: CPython 3.11 here and there).
    if sys.version_info[:2] == (3, 11):
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", str(root / "usr/lib/python3.11"),
                        str(root / "usr/lib/python3/dist-packages")], capture_output=True)


def build(flavour: Flavour) -> HostImage:
    """The kernel, stage-1 initramfs and root image of `flavour`'s L1, built unless cached."""
    linux = fetch_debian(REPO / ".cache" / "debian")
    packages = _closure(PACKAGES)
    key = hashlib.sha256(repr((LAYOUT_VERSION, linux.version, packages, STAGE1_MODULES, HOST_MODULES,
                               flavour.kvm_module)).encode()).hexdigest()[:12]
    where = CACHE / f"{flavour.name}-{key}"
    image = HostImage(linux.kernel, where / "initramfs.cpio", where / "root.ext4")
    if (where / "ready").exists():
        return image
    started = time.monotonic()
    print(f"nested host: building {where} (once)", file=sys.stderr)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    debs = _download(packages, CACHE / "debs")
    with tempfile.TemporaryDirectory(dir=where) as scratch:
        root = Path(scratch) / "root"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        _merge_usr(root)
        _configure(root)
        size_mib = int(_run(["du", "-sm", str(root)]).stdout.split()[0]) * 5 // 4 + 64
        _run(["mkfs.ext4", "-q", "-F", "-L", "nested-root", "-d", str(root), str(image.root), f"{size_mib}M"])
    image.initramfs.write_bytes(_stage1(linux, flavour))
    (where / "ready").write_text(f"built in {time.monotonic() - started:.0f} s\n")
    print(f"nested host: built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return image


STAGE1 = r"""
# stage 1 of L1: the modules are loaded; mount the root image under a tmpfs overlay and the checkout
mkdir -p /lower /upper /newroot
mount -o ro /dev/vda /lower || { echo 'nested host: no root disk'; poweroff -f; }
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work /newroot
checkout=$(cat /nested/checkout)
mkdir -p "/newroot$checkout"
mount -t virtiofs checkout "/newroot$checkout" || { echo 'nested host: the checkout is not shared'; poweroff -f; }
mkdir -p /newroot/nested && cp /nested/* /newroot/nested/
exec switch_root /newroot /bin/sh "$checkout/tests/hosts/l1-init"
"""


def _stage1(linux: DebianLinux, flavour: Flavour) -> bytes:
    wanted = [*STAGE1_MODULES, "irqbypass", "kvm", flavour.kvm_module, *HOST_MODULES]
    spec = InitramfsSpec(linux.busybox, resolve_modules(wanted, linux.modules), marker="nested host: stage 1",
                         commands=STAGE1.strip().splitlines())
    return build_initramfs(spec, compress=False)


def _run_archive(flavour: Flavour, command: str, environment: dict[str, str]) -> bytes:
    """The per-run part of L1's initramfs (appended to the cached one): what to run, and where."""
    files = {"checkout": str(REPO), "command": command, "kvm_module": flavour.kvm_module,
             "environment": "".join(f"export {name}={shlex.quote(value)}\n" for name, value in environment.items())}
    entries = [CpioEntry("nested", 0o040755)]
    entries += [CpioEntry(f"nested/{name}", 0o100644, text.encode()) for name, text in files.items()]
    return cpio_newc(entries)


# --- running a command in L1 ---------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    cpus: int = 2
    memory_mib: int = 6144
    timeout: float = 3600.0
    # with a progress file (the test journal): this long without it growing, L1 counts as lost (125)
    stuck_after: float = 1200.0


EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_HOST_FAILED = 125  # the nested host itself failed: no status came back
EXIT_TESTS_FAILED = 1  # pytest's status when tests failed
MIN_ATTEMPT_S = 120  # an attempt needs L1's boot (about 10 s) and time for the tests it resumes


def run(flavour: Flavour, command: str, resources: Resources = Resources(),
        environment: dict[str, str] | None = None, progress: Path | None = None) -> int:
    """Run `command` (a shell command line) in L1 at the checkout's root; its status, or 124/125.
    `progress` is a file that grows while the command gets on (the test journal): a stall that L1's
    kernel reports ends only when it grows, and once it holds anything, `resources.stuck_after`
    seconds without growth end the attempt."""
    if os.geteuid() != 0:
        raise HostError("the nested host needs root here (virtiofsd shares the checkout from a new namespace)")
    for tool in (QEMU, str(VIRTIOFSD)):
        if shutil.which(tool) is None:
            raise HostError(f"{tool} is missing: apt-get install qemu-system-x86")
    image = build(flavour)
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    console = logs / f"{flavour.name}-{stamp}.console.log"
    monitor = logs / f"{flavour.name}-{stamp}.monitor"
    with tempfile.TemporaryDirectory(prefix=f"nested-{flavour.name}-") as scratch_name:
        scratch = Path(scratch_name)
        initramfs = scratch / "initramfs.cpio"
        initramfs.write_bytes(image.initramfs.read_bytes() + _run_archive(flavour, command, environment or {}))
        status_file = scratch / "status"
        # L1's /tmp: a sparse ext4 image, not RAM (a whole suite's tmp_path files outgrow a tmpfs)
        tmp_disk = scratch / "tmp.img"
        with tmp_disk.open("wb") as sparse:
            sparse.truncate(TMP_DISK_GIB << 30)
        _run(["mkfs.ext4", "-q", "-F", "-L", "nested-tmp", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(tmp_disk)])
        socket_path = scratch / "virtiofsd.sock"
        relays = [Relay(scratch / "stdout", sys.stdout.fileno()), Relay(scratch / "stderr", sys.stderr.fileno())]
        host_log = logs / f"{flavour.name}-{stamp}.host.log"  # QEMU's and virtiofsd's own messages
        with host_log.open("a") as log:
            virtiofsd = subprocess.Popen(
                [str(VIRTIOFSD), f"--socket-path={socket_path}", "-o", f"source={REPO}", "-o", "cache=auto",
                 "-o", "log_level=err"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            _wait_for_socket(socket_path, virtiofsd)
            qemu = [
                QEMU, "-accel", "tcg,thread=multi", "-cpu", flavour.cpu, "-smp", str(resources.cpus),
                "-m", f"{resources.memory_mib}M", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
                "-object", f"memory-backend-memfd,id=ram,size={resources.memory_mib}M,share=on",
                "-machine", "q35,memory-backend=ram",
                "-kernel", str(image.kernel), "-initrd", str(initramfs),
                # sysrq: a stuck L1 is asked for its blocked tasks and CPUs' stacks (keys from QEMU's monitor);
                # unknown_nmi_panic: an L1 whose CPUs stopped is sent an NMI, and its kernel then prints where
                # the CPU was and what it was doing, and ends (docs/hosts.md, issue 8)
                "-append", "console=ttyS0 panic=-1 nokaslr sysrq_always_enabled unknown_nmi_panic",
                # QEMU's monitor, to look into a host that seems stuck (info registers -a, ...)
                "-monitor", f"unix:{monitor},server=on,wait=off",
                "-drive", f"file={image.root},if=virtio,format=raw,readonly=on",
                "-drive", f"file={tmp_disk},if=virtio,format=raw,cache=unsafe",  # /dev/vdb: L1's /tmp, thrown away
                "-chardev", f"socket,id=checkout,path={socket_path}",
                "-device", "vhost-user-fs-pci,chardev=checkout,tag=checkout",
                # ttyS0: L1's kernel console; ttyS1 and ttyS2: the command's standard output and error
                # (through FIFOs, copied to ours as they come); ttyS3: its exit status
                "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
                "-chardev", f"file,id=out,path={relays[0].fifo}", "-serial", "chardev:out",
                "-chardev", f"file,id=err,path={relays[1].fifo}", "-serial", "chardev:err",
                "-chardev", f"file,id=status,path={status_file}", "-serial", "chardev:status",
            ]
            return _supervise(qemu, resources, status_file, console, host_log, monitor, progress)
        finally:
            for relay in relays:
                relay.finish()
            virtiofsd.terminate()
            try:
                virtiofsd.wait(10)
            except subprocess.TimeoutExpired:
                virtiofsd.kill()


class Relay:
    """Copies what QEMU writes into a FIFO to one of our descriptors, as it comes. QEMU could open
    /dev/stdout itself, but as a new open file, whose offset in a redirected file is not ours."""

    def __init__(self, fifo: Path, target: int) -> None:
        self.fifo = fifo
        os.mkfifo(fifo)
        self._target = target
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with open(self.fifo, "rb", buffering=0) as source:  # returns once QEMU opens it
            while chunk := source.read(65536):
                os.write(self._target, chunk)

    def finish(self, wait: float = 5.0) -> None:
        # Where QEMU never opened it (it failed first), let the copier's open return. Without blocking:
        # a copier that has just seen QEMU's end leaves no reader, and a blocking open would wait forever
        deadline = time.monotonic() + wait
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
                break
            except OSError:  # ENXIO: no reader, not yet or not any more
                time.sleep(0.01)
        self._thread.join(max(0.0, deadline - time.monotonic()))


def _wait_for_socket(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise HostError("virtiofsd did not start (it needs root and user namespaces)")
        time.sleep(0.02)


# L1 prints a heartbeat every 5 s (l1-init); this long without one, its CPUs are stuck. The longest gap
# seen in L1s that went on (2026-12-05, Linux workloads with two vCPUs, a second TCG thread busy): 11 s.
HEARTBEAT_LOST_S = 90
SYSRQ_WAIT_S = 10  # for L1's kernel to print what sysrq asked (a few KiB at 115,200 baud)
SYSRQ_LINES = 250  # of it, shown
NMI_WAIT_S = 20  # for L1's kernel to report the NMI sent to a silent L1, and panic (unknown_nmi_panic)
PANIC_LINES = 60  # of L1's console, shown when it ended without the command's status: the panic's report

# L1's kernel reports a CPU that stopped scheduling (docs/hosts.md, issue 10), in Linux's own words
# (kernel/rcu/tree_stall.h, kernel/watchdog.c). The other CPU can go on printing the heartbeat.
STALL_REPORT = re.compile(rb"rcu: INFO: \S+ (?:self-)?detected stalls?|rcu: \S+ kthread starved for"
                          rb"|watchdog: BUG: soft lockup|watchdog: Watchdog detected hard LOCKUP")


class StallWatch:
    """Tells when L1's kernel has been reporting stalls for `limit` seconds with no test finishing.

    One report alone proves nothing: under TCG on a loaded machine a CPU can miss the RCU deadline
    (21 s) and recover. Linux repeats its report while a stall lasts (RCU about every 63 s, the soft
    lockup watchdog about every 26 s), so reports less than `gap` seconds apart are one episode, and
    a test finishing (the journal grew) ends it. An episode `limit` seconds long is an L1 that is
    stuck: pytest's own timeout cannot help then, since its alarm is a timer on the stuck CPU."""

    def __init__(self, limit: float = 300.0, gap: float = 180.0) -> None:
        self.limit = limit
        self.gap = gap
        self.first: float | None = None  # the episode's first report
        self.last = 0.0  # its latest report
        self._partial = b""  # a line the console has not finished

    def console(self, text: bytes, now: float) -> None:
        lines = (self._partial + text).split(b"\n")
        self._partial = lines.pop()[-4096:]
        if any(STALL_REPORT.search(line) for line in lines):
            if self.first is None or now - self.last > self.gap:
                self.first = now
            self.last = now

    def progressed(self) -> None:
        self.first = None

    def stuck(self, now: float) -> bool:
        return self.first is not None and now - self.last <= self.gap and now - self.first >= self.limit


class JournalWatch:
    """Tells when the test journal, once it holds anything (the command is pytest), has not grown for
    `limit` seconds: no test has finished. pytest's own --timeout should have ended a test long before."""

    def __init__(self, limit: float, size: int, now: float) -> None:
        self.limit = limit
        self.size = size
        self.since = now  # when it last grew (or the watch began)

    def grown(self, size: int, now: float) -> bool:
        if size == self.size:
            return False
        self.size, self.since = size, now
        return True

    def stuck(self, now: float) -> bool:
        return self.size > 0 and now - self.since > self.limit


def _supervise(qemu: list[str], resources: Resources, status_file: Path, console: Path, host_log: Path,
               monitor: Path, progress: Path | None) -> int:
    with host_log.open("a") as log:
        process = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True)
    timeout = resources.timeout
    started = last_beat = time.monotonic()
    size = 0
    stalls = StallWatch()
    journal = JournalWatch(resources.stuck_after, _size(progress), started)
    console_read = 0
    nudged = 0.0  # when L1, silent, was sent an NMI
    try:
        while process.poll() is None:
            time.sleep(1)
            now = time.monotonic()
            grown = _size(status_file)
            if grown != size:
                size, last_beat = grown, now
            if journal.grown(_size(progress), now):
                stalls.progressed()
            if _size(console) > console_read:
                with console.open("rb") as text:
                    text.seek(console_read)
                    new = text.read()
                console_read += len(new)
                stalls.console(new, now)
            if now - started > timeout:
                print(f"nested host: no end after {timeout:.0f} s; stopped it. Its console: {console}", file=sys.stderr)
                return _stop(process, monitor, console, EXIT_TIMEOUT)
            if size and now - last_beat > HEARTBEAT_LOST_S and not nudged:
                # issue 8: L1's CPUs stopped (one spinning with interrupts off, the other halted). A key press
                # and an NMI never woke one (2026-11-30 to 12-05); the NMI reaches a CPU whatever its IF,
                # and L1's kernel (unknown_nmi_panic) reports where it was and panics, which ends QEMU
                print(f"nested host: no heartbeat from L1 for {HEARTBEAT_LOST_S} s; its CPUs: "
                      f"{_cpu_places(monitor)}; CPU 0's LAPIC: {_lapic(monitor)}. Sending it an NMI for its "
                      "kernel's report", file=sys.stderr, flush=True)
                _ask(monitor, "nmi")
                nudged = now
            elif nudged and now - nudged > NMI_WAIT_S:
                print(f"nested host: L1 stopped responding (no heartbeat for {now - last_beat:.0f} s, no panic "
                      f"{NMI_WAIT_S} s after an NMI); stopped it. Where its CPUs were: {_cpu_places(monitor)}. "
                      f"Its console: {console}", file=sys.stderr)
                return _stop(process, monitor, console, EXIT_HOST_FAILED, lines=PANIC_LINES)
            if journal.stuck(now):
                # CI at c33a17e: L1 went on beating and reported no stall, and no test ended for 2,852 s,
                # though pytest's own --timeout was 900 s
                print(f"nested host: no test has finished for {resources.stuck_after:.0f} s; stopping L1. Where its "
                      f"CPUs were: {_cpu_places(monitor)}. Its blocked tasks and CPUs' stacks (sysrq w, l):",
                      file=sys.stderr, flush=True)
                asked = _size(console)
                for key in "wl":
                    _ask(monitor, f"sendkey alt-sysrq-{key}")
                time.sleep(SYSRQ_WAIT_S)
                _tail(console, SYSRQ_LINES, start=asked)
                print(f"nested host: its console: {console}", file=sys.stderr)
                return _stop(process, monitor, console, EXIT_HOST_FAILED, lines=0)
            if stalls.stuck(now):
                print(f"nested host: L1's kernel has reported stalled CPUs for {stalls.limit:.0f} s with no test "
                      f"finishing; stopped it. Where its CPUs were: {_cpu_places(monitor)}. Its console: {console}",
                      file=sys.stderr)
                return _stop(process, monitor, console, EXIT_HOST_FAILED)
    except KeyboardInterrupt:
        _stop(process, monitor, console, 130)
        raise
    status = status_file.read_text().split() if status_file.exists() else []
    if not status or not status[-1].isdigit():
        print(f"nested host: ended (QEMU status {process.returncode}) without the command's status; "
              f"its console: {console}", file=sys.stderr)
        _tail(console, PANIC_LINES)
        _tail(host_log, 5)
        return EXIT_HOST_FAILED
    return int(status[-1])


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except FileNotFoundError:
        return 0


def _stop(process: subprocess.Popen, monitor: Path, console: Path, status: int, lines: int = 10) -> int:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _tail(console, lines)
    return status


def _ask(monitor: Path, command: str) -> bytes:
    """QEMU's monitor's answer to one command ("" when it does not answer)."""
    try:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(5)
            connection.connect(str(monitor))
            connection.sendall(command.encode() + b"\n")
            answer = b""
            while answer.count(b"(qemu)") < 2:  # the greeting's prompt, then the one after the answer
                chunk = connection.recv(1 << 16)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return b""
    return answer


def _cpu_places(monitor: Path) -> str:
    """Each L1 CPU's RIP and privilege level, from QEMU's monitor (for a report on a stuck host)."""
    places = re.findall(rb"RIP=([0-9a-f]+) RFL=([0-9a-f]+) .*?CPL=(\d)", _ask(monitor, "info registers -a"))
    return ", ".join(f"CPU{n} rip {rip.decode()} rflags {rfl.decode()} ring {cpl.decode()}"
                     for n, (rip, rfl, cpl) in enumerate(places)) or "unknown"


def _lapic(monitor: Path) -> str:
    """CPU 0's local APIC as QEMU has it: the interrupts it requests and has in service, and its timer."""
    answer = _ask(monitor, "info lapic").decode(errors="replace")
    lines = [" ".join(line.split()) for line in answer.splitlines()
             if line.split(None, 1)[:1] in (["IRR"], ["ISR"], ["LVTT"], ["Timer"])]  # LVTTHMR is not the timer
    return "; ".join(lines) or "unknown"


def _tail(log: Path, lines: int = 30, start: int = 0) -> None:
    """The last `lines` lines of `log` (of what follows byte `start`), on our standard error."""
    if log.exists() and lines:
        with log.open("rb") as text:
            text.seek(start)
            for line in text.read().decode(errors="replace").splitlines()[-lines:]:
                print(f"  | {line}", file=sys.stderr)


def next_attempt(status: int, journal: Path, reran: bool) -> str | None:
    """Why the command runs again after an attempt that ended with `status`, or None if it does not.
    L1 crashing or stopping (status 125) always earns another attempt, which resumes. Failed tests
    (pytest's status 1, with failures in the journal) earn one: TCG can spoil L1 without crashing it,
    and every Linux boot in that L1 then fails (docs/hosts.md, issue 5); the tests that failed run in a
    fresh L1, whose run decides, and a real failure fails there again."""
    if status == EXIT_HOST_FAILED:
        return "it failed, not the command; running the command again"
    if status == EXIT_TESTS_FAILED and not reran and failed(read(journal)):
        return "tests failed; running them once more in a fresh L1"
    return None


def unfinished(status: int, entries: dict[str, Entry], report_chars: int = 1500) -> list[str]:
    """What a run that did not end well leaves in its journal, for the log: how many tests finished, how
    long they took (the slowest named), and each failure's report (its end). A run that L1's death or
    --timeout ended never reaches pytest's summary, and without this a test that failed before it
    leaves no trace of why."""
    if status in (0, EXIT_TESTS_FAILED) or not entries:  # pytest's own summary has said it all
        return []
    failures = failed(entries)
    slowest = sorted(entries, key=lambda test: entries[test].seconds, reverse=True)[:5]
    lines = [f"nested host: the journal holds {len(entries)} finished tests, {len(failures)} of them failed"
             + (": " + ", ".join(failures) if failures else ""),
             f"nested host: they took {sum(entry.seconds for entry in entries.values()):.0f} s; the slowest: "
             + ", ".join(f"{test} {entries[test].seconds:.0f} s" for test in slowest)]
    for test in failures:
        lines.append(f"--- {test}, as its attempt reported it (the end):")
        lines.extend(f"  | {line}" for line in entries[test].report[-report_chars:].splitlines())
    return lines


def main(flavour: Flavour, argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"tests/hosts/{flavour.name}",
        description=f"Run a shell command in a nested {flavour.name} KVM host (QEMU TCG, -cpu {flavour.cpu}) "
                    "at the root of this checkout, shared live; exits with the command's status.")
    parser.add_argument("--cpus", type=int, default=Resources.cpus, help="L1's CPUs (default %(default)s)")
    parser.add_argument("--memory", type=int, default=Resources.memory_mib, metavar="MIB",
                        help="L1's memory in MiB (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=Resources.timeout, metavar="SECONDS",
                        help="stop after this long, all attempts together, and exit with 124 (default %(default)s)")
    parser.add_argument("--stuck-after", type=float, default=Resources.stuck_after, metavar="SECONDS",
                        help="when the command keeps a test journal (pytest) and no test has finished for this "
                             "long, count L1 as lost (status 125); keep it above pytest's own --timeout "
                             "(default %(default)s)")
    parser.add_argument("--retries", type=int, default=0, metavar="N",
                        help="when the nested host itself fails (L1 crashed or stopped responding: status 125), "
                             "run the command again, at most N times; when pytest reports failed tests, run "
                             "those once more in a fresh L1. A pytest run resumes after the tests that had "
                             "passed (tests/journal.py; docs/hosts.md has the QEMU TCG faults that make this "
                             "needed)")
    parser.add_argument("--build", action="store_true", help="only build (or find) the cached L1 image")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the shell command (default: worldswitch info)")
    options = parser.parse_args(argv)
    try:
        if options.build:
            image = build(flavour)
            print(image.root.parent)
            return 0
        command = " ".join(options.command) or "worldswitch info"
        deadline = time.monotonic() + options.timeout

        def resources() -> Resources:  # each attempt has what is left of the time
            return Resources(options.cpus, options.memory, max(1.0, deadline - time.monotonic()), options.stuck_after)

        # the attempts share a test journal (tests/journal.py): a pytest run resumes after the tests
        # that passed in earlier attempts; what failed there runs again
        journals = CACHE / "journals"
        journals.mkdir(parents=True, exist_ok=True)
        journal = journals / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        environment = {"WORLDSWITCH_TEST_JOURNAL": str(journal), **_host_defects()}
        status = EXIT_HOST_FAILED
        try:
            status = run(flavour, command, resources(), environment, journal)
            reran = False  # the tests that failed have had their run in a fresh L1
            for attempt in range(options.retries):
                why = next_attempt(status, journal, reran)
                if why is None:
                    break
                if deadline - time.monotonic() < MIN_ATTEMPT_S:
                    print(f"nested host: {why.split(';')[0]}, but too little of --timeout is left for "
                          "another attempt", file=sys.stderr, flush=True)
                    break
                reran = reran or status != EXIT_HOST_FAILED
                print(f"nested host: {why} ({attempt + 2} of {options.retries + 1}; pytest resumes after the "
                      "tests that passed)", file=sys.stderr, flush=True)
                status = run(flavour, command, resources(), environment, journal)
        finally:
            for line in unfinished(status, read(journal)):
                print(line, file=sys.stderr, flush=True)
            journal.unlink(missing_ok=True)
        return status
    except (WorldswitchError, OSError) as error:
        print(f"tests/hosts/{flavour.name}: {error}", file=sys.stderr)
        return EXIT_HOST_FAILED
    except KeyboardInterrupt:
        return 130
