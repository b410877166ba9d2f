"""Real Linux workloads: Debian's kernel with a busybox shell, driven through the Python API, and
Linux's own virtio drivers (virtio_blk, virtio_net, virtio_rng, virtio_console, packed rings) against
worldswitch's devices; SMP, snapshots of a booted Linux, and `--reboot`.

They need guest kernel code to run natively (VT-x or AMD-V; in CI the nested AMD-V host,
`tests/hosts/amdv`). On a PVM host every boot takes a quarter of an hour, so there they are marked
`slow` and deselected (`pytest -m slow` runs them)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import termios
import threading
import time
import tty
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from worldswitch.boot.initramfs import InitramfsSpec, build_initramfs, resolve_modules
from worldswitch.devices.virtio import VIRTIO_F_RING_PACKED
from worldswitch.devices.virtio.net import VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4
from worldswitch.vmm.host import detect_host_kind
from worldswitch.vmm.result import StopReason
from worldswitch.vmx.api import Machine
from worldswitch.vmx.debian import DebianLinux, fetch_debian

pytestmark = [pytest.mark.kvm, *([pytest.mark.slow] if detect_host_kind().kernel_code_emulated else [])]

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "debian"
MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "virtio_console"]
PROMPT = "ws-shell# "
EMULATED_CPU = detect_host_kind().cpu_emulated
BOOT_TIMEOUT = 300 if EMULATED_CPU else 120  # to the prompt: a second on hardware, a minute or two on TCG
COMMAND_TIMEOUT = 120
# QEMU's TCG, under the nested test host, now and then derails a nested guest's CPU (docs/hosts.md): there,
# and only there, a boot that does not reach its prompt is tried once more, and the first end is reported.
BOOT_ATTEMPTS = 2 if EMULATED_CPU else 1


@pytest.fixture(scope="module")
def debian() -> DebianLinux:
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available: not a Debian-based host")
    return fetch_debian(CACHE)


@pytest.fixture(scope="module")
def initrd(debian: DebianLinux, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox (mke2fs, ip, ping, nc, md5sum ...) and the virtio drivers as modules; a shell on the console."""
    spec = InitramfsSpec(debian.busybox, resolve_modules(MODULES, debian.modules), marker="WORLDSWITCH-INIT-MARKER",
                         shell=True, commands=[f"export PS1='{PROMPT}'"])
    path = tmp_path_factory.mktemp("linux") / "initrd.img"
    path.write_bytes(build_initramfs(spec))
    return path


class Shell:
    """Commands typed into the guest's busybox shell on the serial console, with their output and status."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.count = 0

    def expect(self, pattern: str, timeout: float) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:  # in slices, to notice at once a machine that has ended
            try:
                return self.vm.console.expect(pattern, timeout=min(5.0, max(0.0, deadline - time.monotonic())))
            except TimeoutError as error:
                ended = self.vm.vmm.result
                if ended is not None:
                    raise TimeoutError(f"the machine ended ({ended.message}) before {pattern!r}; console: "
                                       f"{self.vm.console.text[-1500:]!r}") from None
                if time.monotonic() < deadline:
                    continue
                # say where the guest is, not only what it printed last
                places = [f"vCPU {n}: rip {r['rip']:#x} cr2 {r['cr2']:#x} ring {r['cpl']}"
                          for n, r in enumerate(self.vm.registers())]
                raise TimeoutError(f"{error}; {'; '.join(places)}") from None

    def wait_for_prompt(self, timeout: float = BOOT_TIMEOUT) -> None:
        self.expect(re.escape(PROMPT), timeout)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> str:
        """`command`'s output (what the console showed after the echoed command line); its status must be 0."""
        self.count += 1
        # The markers around the output are computed by the shell, so that the echoed command line (which
        # the shell's line editor may wrap anywhere) cannot match them.
        self.vm.console.send(f"echo ws-start-$(({self.count}*1)); {command}; echo ws-done-$(({self.count}*1)):$?\n")
        start = self.expect(rf"ws-start-{self.count}\r?\n", timeout)
        match = self.expect(rf"ws-done-{self.count}:(\d+)\r?\n", timeout)
        output = bytes(self.vm.console.data[start.end() : match.start()]).decode(errors="replace")
        status = int(match.group(1))
        if check:
            assert status == 0, f"{command!r} ended with status {status}: {output[-2000:]}"
        self.wait_for_prompt(timeout)
        return output.replace("\r", "")

    def power_off(self) -> None:
        self.vm.console.send("poweroff -f\n")
        result = self.vm.wait(COMMAND_TIMEOUT)
        assert result is not None and result.reason is StopReason.POWER_OFF, result


def boot(make: Callable[[], Machine]) -> Shell:
    """A machine from `make`, started and at its shell prompt (BOOT_ATTEMPTS tries); close it when done."""
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        vm = make()
        try:
            vm.start()
            shell = Shell(vm)
            shell.wait_for_prompt()
            return shell
        except TimeoutError as error:
            vm.close()
            if attempt == BOOT_ATTEMPTS:
                raise
            print(f"\nboot {attempt} did not reach the prompt on this emulated CPU; once more. {error}", file=sys.stderr)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def booted(debian: DebianLinux, initrd: Path, **machine: object) -> Iterator[Shell]:
    shell = boot(lambda: Machine(kernel=str(debian.kernel), initrd=str(initrd), **machine))  # type: ignore[arg-type]
    with shell.vm:
        yield shell


# --- one machine with every device and two vCPUs, shared by the tests that only look ---------------------

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """This thread in the named network namespace for the block: taps and sockets made here live there."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{namespace}") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
        pytest.skip("a tap in a network namespace needs root, /dev/net/tun and iproute2")
    name = "ws-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"],
                        ["ip", "addr", "add", "10.0.2.1/24", "dev", "tap0"],
                        ["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "tap0", "up"]):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="module")
def linux(debian: DebianLinux, initrd: Path, netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    disk = tmp_path_factory.mktemp("disk") / "disk.img"
    disk.write_bytes(bytes(8 << 20))

    def make() -> Machine:
        vm = Machine(kernel=str(debian.kernel), initrd=str(initrd), cpus=2, disk=[str(disk)], net=["tap=tap0"],
                     rng=True, vconsole="pty")
        with inside(netns):
            vm.build()  # the tap is opened in the test's namespace
        return vm

    shell = boot(make)
    with shell.vm:
        yield shell


def test_debian_gives_a_busybox_shell_through_the_python_api(linux: Shell, debian: DebianLinux) -> None:
    assert "hello-42" in linux.run("echo hello-$((6*7))")
    assert linux.run("uname -r").split()[0] == debian.version
    assert "WORLDSWITCH-INIT-MARKER" in linux.vm.console.text


def test_two_vcpus_both_take_interrupts(linux: Shell) -> None:
    assert linux.run("nproc").split()[0] == "2"
    timer = re.search(r"LOC:\s+(\d+)\s+(\d+)", linux.run("cat /proc/interrupts"))
    assert timer is not None and int(timer.group(1)) > 0 and int(timer.group(2)) > 0, "both CPUs' local timers tick"


def test_virtio_rng_feeds_dev_hwrng(linux: Shell) -> None:
    assert "virtio_rng" in linux.run("cat /sys/class/misc/hw_random/rng_current")
    assert linux.run("dd if=/dev/hwrng bs=512 count=8 2>/dev/null | wc -c").split()[0] == "4096"
    first, second = (linux.run("dd if=/dev/hwrng bs=64 count=1 2>/dev/null | md5sum").split()[0] for _ in range(2))
    assert first != second


def test_virtio_console_hvc0_echoes(linux: Shell) -> None:
    backend = linux.vm.vmm.devices["virtio-console"].device.backend  # type: ignore[attr-defined]
    user = os.open(backend.name, os.O_RDWR | os.O_NOCTTY)  # where a user attaches: screen /dev/pts/N
    try:
        tty.setraw(user)
        # raw on the descriptor cat keeps open: hvc0's settings do not outlive its last close
        linux.run("((stty raw -echo; cat) < /dev/hvc0 > /dev/hvc0 &)")
        os.write(user, b"ping-over-hvc0\n")
        received = b""
        while b"ping-over-hvc0\n" not in received:
            ready, _, _ = __import__("select").select([user], [], [], COMMAND_TIMEOUT)
            assert ready, f"no echo from hvc0; got {received!r}"
            received += os.read(user, 4096)
        linux.run("echo from-the-guest > /dev/hvc0")
        while b"from-the-guest" not in received:
            ready, _, _ = __import__("select").select([user], [], [], COMMAND_TIMEOUT)
            assert ready, f"nothing from hvc0; got {received!r}"
            received += os.read(user, 4096)
    finally:
        termios.tcflush(user, termios.TCIOFLUSH)
        os.close(user)


def _receive_all(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_virtio_net_ping_and_tcp_both_ways(linux: Shell, netns: str) -> None:
    linux.run("ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up")
    assert "3 packets received" in linux.run("ping -c 3 -W 10 10.0.2.1")
    size = 512 * 1024
    with inside(netns):
        listener = socket.create_server(("10.0.2.1", 5001))
    with listener:
        listener.settimeout(COMMAND_TIMEOUT)
        # guest to host: the guest's md5sum against what arrived
        linux.run(f"dd if=/dev/urandom of=/tmp/out bs=1024 count={size // 1024} 2>/dev/null")
        guest_sum = linux.run("md5sum /tmp/out").split()[0]
        received: list[bytes] = []

        def take() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(COMMAND_TIMEOUT)  # accept() gives a blocking socket: a stalled stream holds it
                received.append(_receive_all(connection, size))

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        linux.run("nc -w 30 10.0.2.1 5001 < /tmp/out")
        taker.join(COMMAND_TIMEOUT)
        assert received and len(received[0]) == size and hashlib.md5(received[0]).hexdigest() == guest_sum
    # host to guest, in TCP segments of more than one frame: Linux's virtio_net takes the offloads
    device = linux.vm.vmm.devices["virtio-net0"].device  # type: ignore[attr-defined]
    assert device.has(VIRTIO_NET_F_GUEST_TSO4) and device.has(VIRTIO_NET_F_HOST_TSO4)
    received_before = device.rx_packets
    payload = os.urandom(size)
    linux.run("(nc -l -p 5002 > /tmp/in &) && sleep 1")
    with inside(netns):
        sender = socket.create_connection(("10.0.2.15", 5002), timeout=COMMAND_TIMEOUT)
    with sender:
        sender.sendall(payload)
    linux.run("for i in $(seq 60); do [ $(wc -c < /tmp/in) -ge %d ] && break; sleep 1; done" % size)
    assert linux.run("md5sum /tmp/in").split()[0] == hashlib.md5(payload).hexdigest()
    # a frame holds at most 1,448 bytes of it (362 frames); the host's stack, never short of data to
    # send here, makes segments of two frames or more (tcp_tso_autosize's floor)
    assert device.rx_packets - received_before < size // 1448, device.rx_packets - received_before


# --- machines of their own ----------------------------------------------------------------------------


def test_virtio_blk_keeps_an_ext4_filesystem_across_boots(debian: DebianLinux, initrd: Path, tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(64 << 20))
    with booted(debian, initrd, disk=[str(disk)]) as shell:
        shell.run("mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
        shell.run("seq 1 20000 > /mnt/numbers && dd if=/dev/urandom of=/mnt/random bs=4096 count=256 2>/dev/null")
        shell.run("cd /mnt && md5sum numbers random > sums && cd / && sync && umount /mnt")
        shell.power_off()
    # the host's e2fsck finds the filesystem the guest's driver wrote clean, and the file in it
    check = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    numbers = subprocess.run(["debugfs", "-R", "cat /numbers", str(disk)], capture_output=True, text=True).stdout
    assert numbers == "".join(f"{n}\n" for n in range(1, 20001))
    with booted(debian, initrd, disk=[str(disk)]) as shell:
        shell.run("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
        checked = shell.run("cd /mnt && md5sum -c sums")
        assert "numbers: OK" in checked and "random: OK" in checked
        shell.run("cd / && umount /mnt")
        shell.power_off()


def test_linux_takes_packed_virtqueues(debian: DebianLinux, initrd: Path, tmp_path: Path) -> None:
    disk = tmp_path / "packed.img"
    content = os.urandom(4 << 20)
    disk.write_bytes(content)
    with booted(debian, initrd, disk=[str(disk)], rng=True, packed_queues=True) as shell:
        for name in ("virtio-blk0", "virtio-rng"):
            assert shell.vm.vmm.devices[name].device.has(VIRTIO_F_RING_PACKED)  # type: ignore[attr-defined]
        assert shell.run("dd if=/dev/vda bs=4096 2>/dev/null | md5sum").split()[0] == hashlib.md5(content).hexdigest()
        shell.run("echo written-through-a-packed-ring | dd of=/dev/vda bs=512 seek=100 conv=notrunc,fsync 2>/dev/null")
        assert shell.run("dd if=/dev/hwrng bs=256 count=4 2>/dev/null | wc -c").split()[0] == "1024"
        shell.power_off()
    assert disk.read_bytes()[100 * 512 : 100 * 512 + 29] == b"written-through-a-packed-ring"


def test_a_booted_linux_snapshot_restores_at_its_prompt(debian: DebianLinux, initrd: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "at-the-prompt"
    with booted(debian, initrd) as shell:
        shell.run("echo before-the-snapshot > /tmp/note")
        shell.vm.snapshot(snapshot)
    with Machine.restore(snapshot) as vm:
        vm.start()
        restored = Shell(vm)
        restored.count = shell.count
        assert "before-the-snapshot" in restored.run("cat /tmp/note")
        assert "restored-5" in restored.run("echo restored-$((2+3))")
        assert "woke-7" in restored.run("sleep 1; echo woke-$((3+4))")  # its timer: the TSC deadline travelled
        restored.power_off()


@pytest.mark.skipif(EMULATED_CPU, reason="on QEMU's TCG its outcome cannot count (the second boot's L2 sometimes "
                    "runs at an L1 kernel address, docs/hosts.md issue 5), and three of the five L1 panics of "
                    "2026-12-01 came during it (issue 6); on hardware this test must pass")
def test_reboot_option_survives_a_guest_reboot(debian: DebianLinux, initrd: Path, tmp_path: Path) -> None:
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        try:
            output, errors = reboot_once(debian, initrd, tmp_path / f"vm{attempt}.sock")
            break
        except BootStalled as stall:
            if attempt == BOOT_ATTEMPTS:
                pytest.fail(str(stall))
            print(f"\nattempt {attempt} did not boot on this emulated CPU; once more. {stall}", file=sys.stderr)
    assert output.count(b"WORLDSWITCH-INIT-MARKER") == 2
    assert b"guest reset; starting it again (boot 2)" in errors


class BootStalled(Exception):
    pass


def reboot_once(debian: DebianLinux, initrd: Path, control: Path) -> tuple[bytes, bytes]:
    """`worldswitch run --reboot`: the shell, `reboot -f`, the shell again, `poweroff -f`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worldswitch", "run", "--kernel", str(debian.kernel), "--initrd", str(initrd),
         "--reboot", "--timeout", str(3 * BOOT_TIMEOUT), "--control", str(control)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    output = bytearray()
    errors: list[bytes] = []
    arrived = threading.Condition()

    def collect() -> None:
        assert process.stdout is not None
        for chunk in iter(lambda: process.stdout.read1(4096), b""):  # type: ignore[union-attr]
            with arrived:
                output.extend(chunk)
                arrived.notify_all()
        with arrived:
            arrived.notify_all()  # the end of the output: the VMX has gone

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True).start()  # type: ignore[union-attr]

    def prompts(count: int) -> None:
        with arrived:
            arrived.wait_for(lambda: output.count(PROMPT.encode()) >= count or not reader.is_alive(), BOOT_TIMEOUT)
            if output.count(PROMPT.encode()) >= count:
                return
        where = subprocess.run([sys.executable, "-m", "worldswitch", "ctl", str(control), "registers"],
                               capture_output=True, text=True, timeout=60)
        process.kill()
        process.wait()
        time.sleep(0.5)  # stderr read to its end
        raise BootStalled(f"no prompt {count} within {BOOT_TIMEOUT} s; the VMX said {b''.join(errors)[-1500:]!r}; "
                          f"vCPUs: {where.stdout or where.stderr}; the console ends with {bytes(output[-3000:])!r}")

    try:
        prompts(1)
        process.stdin.write(b"reboot -f\n")
        process.stdin.flush()
        prompts(2)
        process.stdin.write(b"poweroff -f\n")
        process.stdin.flush()
        assert process.wait(COMMAND_TIMEOUT) == 0
        reader.join(10)
    finally:
        process.kill()
    time.sleep(0.5)
    return bytes(output), b"".join(errors)
