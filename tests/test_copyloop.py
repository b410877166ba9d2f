"""A boot loader's byte-copy loop run by the VMM (vmm/x86/copyloop.py) leaves what the CPU leaves: each
loop runs twice on /dev/kvm from the same state, once by KVM to its end and once served from its head
(where the handoff's hardware breakpoint stops it) and run on from there, and the two are compared
register by register and byte by byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldswitch.boot.bootparams import BOOT_FLAG, HDRS_MAGIC, setup_header
from worldswitch.boot.firmware import low_copy
from worldswitch.boot.linux import SETUP_HEADER_SIZE, loader_entry
from worldswitch.driver import structs as s
from worldswitch.driver.constants import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, ExitReason
from worldswitch.driver.exits import IoOut, decode_exit
from worldswitch.driver.kvm import Vcpu
from worldswitch.memory.guest import GuestMemory
from worldswitch.vmm.x86 import copyloop
from worldswitch.vmm.x86.copyloop import (FLAG_CF, FLAG_DF, FLAG_OF, FLAG_SF, SIBLING_SPAN, CopyLoop, find_around,
                                          find_in_image, find_sibling, recognize, serve, serve_rep_movs)

from .helpers import finish_exit
from .host_defects import breakpoints_ignored

GRUB_UP = bytes.fromhex("39f97410a4ebf9")  # GRUB 2.06's memmove upward: cmp %edi,%ecx; je +16; movsb; jmp back
# and downward: sub $1,%ecx; jb +8; mov (%esi,%ecx,1),%dl; mov %dl,(%eax,%ecx,1); jmp back
GRUB_DOWN = bytes.fromhex("83e901 7208 8a140e 881408 ebf3".replace(" ", ""))
SEABIOS_FILL = bytes.fromhex("85c9 7406 49 881408 ebf6".replace(" ", ""))  # test %ecx; je; dec; mov %dl,(%eax,%ecx)
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
HEAD = 0x1000
OUT_DONE = bytes.fromhex("e610")  # out %al, $0x10: the run ends in an exit there
RAM = 2 << 20  # the flat32 fixture's (conftest.py)
GRUB_KERNEL = Path("/usr/lib/grub/i386-pc/kernel.img")  # grub-pc-bin: the loops as Debian ships them
DEBIAN_BOOT = Path(__file__).resolve().parent.parent / ".cache/debian/root/boot"  # what fetch_debian unpacked


def up(walker: str, end: str, done: int = HEAD + 4 + 0x10) -> CopyLoop:
    return CopyLoop("up", HEAD, done, walker=walker, end=end)


def down(counter: str, source: str, target: str, byte: str, done: int = HEAD + 13) -> CopyLoop:
    return CopyLoop("down", HEAD, done, counter=counter, source=source, target=target, byte=byte)


def test_the_loops_are_recognized_by_their_bytes_and_nothing_like_them_is() -> None:
    assert recognize(GRUB_UP, HEAD) == up("rdi", "rcx")
    assert recognize(bytes.fromhex("3bcf7410a4ebf9"), HEAD) == up("rdi", "rcx")  # cmp %edi,%ecx the other way
    assert recognize(bytes.fromhex("39f27410a4ebf9"), HEAD) == up("rsi", "rdx")  # cmp %esi,%edx
    assert recognize(bytes.fromhex("39f974f0a4ebf9"), HEAD) == up("rdi", "rcx", HEAD + 4 - 0x10)  # a backward je
    for other in ("39fe7410a4ebf9",  # ESI against EDI: both walk, they never meet
                  "39c87410a4ebf9",  # ECX against EAX: neither walks
                  "39397410a4ebf9",  # a memory operand
                  "39f97410a5ebf9",  # movsd
                  "39f97410a4ebf8"):  # a jump elsewhere
        assert recognize(bytes.fromhex(other), HEAD) is None, other
    assert recognize(GRUB_UP[:6], HEAD) is None
    assert recognize(GRUB_DOWN, HEAD) == down("rcx", "rsi", "rax", "rdx")
    # base and index the other way round, BL carrying the bytes, EDX counting
    assert recognize(bytes.fromhex("83ea01 7208 8a1c32 881c17 ebf3".replace(" ", "")), HEAD) == \
        down("rdx", "rsi", "rdi", "rbx")
    for other in ("83e901 7208 8a0c0e 880c08 ebf3",  # CL carries the bytes: it is the count's own low byte
                  "83e901 7208 8a340e 883408 ebf3",  # DH: a high byte
                  "83e901 7208 8a140e 881608 ebf3",  # (%esi) without the count
                  "83e901 7208 8a144e 881408 ebf3",  # scale 2
                  "83e901 7208 8a140e 881c08 ebf3",  # loaded into DL, stored from BL
                  "83e902 7208 8a140e 881408 ebf3",  # sub $2
                  "83c101 7208 8a140e 881408 ebf3",  # add $1
                  "83e901 7308 8a140e 881408 ebf3"):  # jae
        assert recognize(bytes.fromhex(other.replace(" ", "")), HEAD) is None, other


def fill(counter: str, target: str, byte: str, done: int = HEAD + 10) -> CopyLoop:
    return CopyLoop("fill", HEAD, done, counter=counter, target=target, byte=byte)


def test_a_fill_loop_is_recognized_by_its_bytes() -> None:
    assert recognize(SEABIOS_FILL, HEAD) == fill("rcx", "rax", "rdx")
    assert recognize(bytes.fromhex("85d2 7406 4a 880c13 ebf6".replace(" ", "")), HEAD) == fill("rdx", "rbx", "rcx")
    for other in ("85ca 7406 49 881408 ebf6",  # test %ecx,%edx
                  "85c9 7406 4a 881408 ebf6",  # dec %edx
                  "85c9 7406 49 880c08 ebf6",  # CL stored: the count's own byte
                  "85c9 7406 49 891408 ebf6",  # a dword store
                  "85c9 7406 49 881408 ebf5"):  # a jump elsewhere
        assert recognize(bytes.fromhex(other.replace(" ", "")), HEAD) is None, other


def test_debians_seabios_has_the_fill_loop() -> None:
    if not SEABIOS.exists():
        pytest.skip("seabios is not installed")
    assert SEABIOS_FILL in SEABIOS.read_bytes()
    # the handoff watches it from the reset on: in the ROM's copy below 1 MiB, where POST runs it
    base, low = low_copy(SEABIOS.read_bytes())
    assert find_in_image(base, low) == [CopyLoop("fill", base + low.index(SEABIOS_FILL), base + low.index(SEABIOS_FILL) + 10,
                                                 counter="rcx", target="rax", byte="rdx")]


def test_every_loop_in_an_image_is_found_at_its_address() -> None:
    # each loop after bytes that begin like one (CMP, SUB, TEST opcodes) and are not
    image = bytes.fromhex("39c0 83 85c0") + GRUB_UP + bytes.fromhex("90 83e901") + GRUB_DOWN + b"\x85" + SEABIOS_FILL + b"\x39"
    base = 0xE0000
    found = find_in_image(base, image)
    assert [(loop.kind, loop.head - base) for loop in found] == [
        ("up", image.index(GRUB_UP)), ("down", image.index(GRUB_DOWN)), ("fill", image.index(SEABIOS_FILL))]
    assert found[0] == recognize(GRUB_UP, base + image.index(GRUB_UP))
    assert find_in_image(base, image[:-2]) == found[:2]  # a loop cut off by the end of the image is none
    assert find_in_image(base, bytes(4096)) == []


def test_debians_grub_has_both_loops_in_its_memmove() -> None:
    if not GRUB_KERNEL.exists():
        pytest.skip("grub-pc-bin is not installed")
    image = GRUB_KERNEL.read_bytes()
    assert image.count(GRUB_UP) == 1 and image.count(GRUB_DOWN) == 1
    assert image.index(GRUB_DOWN) - image.index(GRUB_UP) == len(GRUB_UP)  # side by side, as find_sibling expects


def test_a_sample_anywhere_in_the_loop_finds_its_head(memory: GuestMemory) -> None:
    memory.write(HEAD, GRUB_UP)
    for address in (HEAD, HEAD + 2, HEAD + 4, HEAD + 5):
        assert find_around(memory, address) == up("rdi", "rcx")
    assert find_around(memory, HEAD + 1) is None and find_around(memory, HEAD + 7) is None
    memory.write(HEAD, GRUB_DOWN)
    for address in (HEAD, HEAD + 3, HEAD + 5, HEAD + 8, HEAD + 11):
        assert find_around(memory, address) == down("rcx", "rsi", "rax", "rdx")
    assert find_around(memory, HEAD + 4) is None and find_around(memory, HEAD + 13) is None
    memory.write(HEAD, SEABIOS_FILL + bytes(3))
    for address in (HEAD, HEAD + 2, HEAD + 4, HEAD + 5, HEAD + 8):
        assert find_around(memory, address) == fill("rcx", "rax", "rdx")
    assert find_around(memory, 2) is None  # near address 0: no head below it


def test_a_memmoves_other_loop_is_found_beside_the_one_caught(memory: GuestMemory) -> None:
    """GRUB's two loops as its memmove has them (the down loop's head at the up loop's end), so that
    catching either arms both; nothing is found where the other is missing, for a fill, or where the
    window around the loop leaves RAM."""
    memory.write(HEAD, GRUB_UP + GRUB_DOWN)
    grub_up = up("rdi", "rcx")
    grub_down = down("rcx", "rsi", "rax", "rdx")._replace(head=HEAD + 7, done=HEAD + 7 + 13)
    assert find_around(memory, HEAD + 7 + 5) == grub_down
    assert find_sibling(memory, grub_down) == grub_up
    assert find_sibling(memory, grub_up) == grub_down
    memory.write(HEAD + 7 + SIBLING_SPAN, GRUB_UP)  # an up loop at the window's far end; the near one first
    assert find_sibling(memory, grub_down) == grub_up
    memory.write(HEAD, bytes(7))  # the up loop gone: the far one is still in the window
    far = HEAD + 7 + SIBLING_SPAN
    assert find_sibling(memory, grub_down) == grub_up._replace(head=far, done=far + 4 + 0x10)
    memory.write(HEAD + 7 + SIBLING_SPAN, bytes(7))
    assert find_sibling(memory, grub_down) is None
    memory.write(HEAD, SEABIOS_FILL + bytes(3))
    assert find_sibling(memory, fill("rcx", "rax", "rdx")) is None
    top = (16 << 20) - 16  # the fixture's RAM ends 16 bytes after this loop
    memory.write(top - 7, GRUB_UP + GRUB_DOWN[:9])
    assert find_sibling(memory, grub_up._replace(head=top - 7, done=top - 7 + 4 + 0x10)) is None



def _prepare(memory: GuestMemory, code: bytes) -> None:
    memory.fill(0, RAM)
    memory.write(HEAD, code)
    loop = recognize(code, HEAD)
    assert loop is not None
    memory.write(loop.done, OUT_DONE)
    memory.write(0x10000, bytes((i * 7 + 3) & 0xFF for i in range(0x8000)))  # what is copied from


def _registers(vcpu: Vcpu, **values: int) -> None:
    vcpu.set_regs(s.kvm_regs(**{"rip": HEAD, "rsp": 0x8000, "rflags": 2, **values}))


def _ends_at_done(vcpu: Vcpu) -> None:
    assert vcpu.run() == ExitReason.IO
    assert decode_exit(ExitReason.IO, vcpu.kvm_run, vcpu.run_mmap) == IoOut(0x10, 1, 1, b"\x00")
    finish_exit(vcpu)  # else the next run, if it starts at the OUT, skips it on AMD-V


def _go_on_as_kvm_did(vcpu: Vcpu, memory: GuestMemory, regs: s.kvm_regs, ran: s.kvm_regs, expected: bytes) -> None:
    """The served state entered and run to the end: the registers and RAM KVM's own run left."""
    vcpu.set_regs(regs)
    _ends_at_done(vcpu)
    served = vcpu.get_regs()
    assert {name: getattr(served, name) & 0xFFFFFFFF for name in SUMMARY} == \
        {name: getattr(ran, name) & 0xFFFFFFFF for name in SUMMARY}
    assert memory.read(0, RAM) == expected


SUMMARY = ("rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rflags")
DOWN_BL = bytes.fromhex("83ea01 7208 8a1c32 881c17 ebf3".replace(" ", ""))  # EDX counts, BL carries

# name: (code, registers, bytes copied). Upward: GRUB's copy (its target below its source), a copy onto
# its own source ahead of it (the first 5 bytes again and again), none at all, ESI walking to EDX, flags
# set beforehand. Downward: GRUB's (its target above its source), a copy onto its own source behind it
# (the last 3 bytes again and again, downwards), none at all, other registers.
CASES = {
    "up-grub": (GRUB_UP, dict(rsi=0x10000, rdi=0x4000, rcx=0x4000 + 3000), 3000),
    "up-onto-its-source": (GRUB_UP, dict(rsi=0x10000, rdi=0x10005, rcx=0x10005 + 700), 700),
    "up-nothing": (GRUB_UP, dict(rsi=0x10000, rdi=0x4000, rcx=0x4000), 0),
    "up-esi-to-edx": (bytes.fromhex("39f27410a4ebf9"), dict(rsi=0x10100, rdi=0x9000, rdx=0x10100 + 77), 77),
    "up-flags-before": (bytes.fromhex("3bcf7410a4ebf9"),
                        dict(rsi=0x10000, rdi=0x5000, rcx=0x5000 + 9, rflags=2 | FLAG_CF | FLAG_SF | FLAG_OF), 9),
    "down-grub": (GRUB_DOWN, dict(rsi=0x10000, rax=0x30000, rcx=2500, rdx=0x12345678), 2500),
    "down-onto-its-source": (GRUB_DOWN, dict(rsi=0x10003, rax=0x10000, rcx=600, rdx=0xAB), 600),
    "down-nothing": (GRUB_DOWN, dict(rsi=0x10000, rax=0x30000, rcx=0, rdx=0x77, rflags=2 | FLAG_OF), 0),
    "down-bl-edx": (DOWN_BL, dict(rsi=0x10010, rdi=0x20000, rdx=33, rbx=0xFFFF), 33),
    "fill-seabios": (SEABIOS_FILL, dict(rax=0x30000, rcx=4000, rdx=0x1234A5, rflags=2 | FLAG_CF | FLAG_SF), 4000),
    "fill-nothing": (SEABIOS_FILL, dict(rax=0x30000, rcx=0, rdx=0x5A, rflags=2 | FLAG_OF), 0),
}


@pytest.mark.kvm
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_served_loop_leaves_what_kvm_running_it_leaves(flat32: tuple[Vcpu, GuestMemory], case: str) -> None:
    vcpu, memory = flat32
    code, values, length = CASES[case]
    _prepare(memory, code)
    _registers(vcpu, **values)
    _ends_at_done(vcpu)  # KVM runs the loop, every byte
    ran = vcpu.get_regs()
    expected = memory.read(0, RAM)

    _prepare(memory, code)
    _registers(vcpu, **values)
    regs = vcpu.get_regs()  # at the loop's head, as the handoff's breakpoint there finds it
    loop = find_around(memory, regs.rip)
    assert regs.rip == HEAD and loop is not None
    copied = serve(loop, memory, regs, vcpu.get_sregs())
    assert copied is not None and copied.length == length
    assert copied.target == values["rdi" if loop.kind == "up" or loop.target == "rdi" else "rax"]
    _go_on_as_kvm_did(vcpu, memory, regs, ran, expected)


@pytest.mark.kvm
@pytest.mark.xfail(breakpoints_ignored(), strict=True,
                   reason="L0's QEMU never arms L2's breakpoints (before QEMU 9.1; docs/hosts.md, issue 13)")
def test_a_breakpoint_on_a_loops_head_stops_the_vcpu_before_its_first_byte(flat32: tuple[Vcpu, GuestMemory]) -> None:
    """How the handoff meets a copy loop: DR0 on its head (L0 in DR7) ends KVM_RUN there with
    KVM_EXIT_DEBUG, the loop not yet begun; with the breakpoint gone the loop runs to its end."""
    vcpu, memory = flat32
    code, values, length = CASES["up-grub"]
    _prepare(memory, code)
    _registers(vcpu, **values)
    before = memory.read(0, RAM)
    vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [HEAD, 0, 0, 0, 0, 0, 0, 1])  # DR0, L0
    assert vcpu.run() == ExitReason.DEBUG
    assert vcpu.get_regs().rip == HEAD and memory.read(0, RAM) == before
    vcpu.set_guest_debug(0)
    _ends_at_done(vcpu)
    assert memory.read(values["rdi"], length) == memory.read(values["rsi"], length)


@pytest.mark.kvm
def test_what_the_vmm_cannot_run_is_left_to_kvm(flat32: tuple[Vcpu, GuestMemory]) -> None:
    """DF set (the copy walks down), an end outside RAM, code that is no longer the loop, another
    mode: serve says so and changes nothing."""
    vcpu, memory = flat32
    _prepare(memory, GRUB_UP)
    loop = find_around(memory, HEAD)
    assert loop is not None
    sregs = vcpu.get_sregs()
    cases = [
        (s.kvm_regs(rip=HEAD, rsi=0x10000, rdi=0x4000, rcx=0x4000 + 16, rflags=2 | FLAG_DF), sregs),
        (s.kvm_regs(rip=HEAD, rsi=RAM - 8, rdi=0x4000, rcx=0x4000 + 16, rflags=2), sregs),  # the source leaves RAM
        (s.kvm_regs(rip=HEAD, rsi=0x10000, rdi=0xFFFFFFF0, rcx=0x20, rflags=2), sregs),  # wraps at 4 GiB
        (s.kvm_regs(rip=HEAD + 2, rsi=0x10000, rdi=0x4000, rcx=0x4010, rflags=2), sregs),  # not at the head
    ]
    real = vcpu.get_sregs()
    real.cr0 = 0x10  # real mode
    cases.append((s.kvm_regs(rip=HEAD, rsi=0x10000, rdi=0x4000, rcx=0x4010, rflags=2), real))
    before = memory.read(0, RAM)
    for regs, state in cases:
        kept = bytes(regs)
        assert serve(loop, memory, regs, state) is None
        assert bytes(regs) == kept
    memory.write(HEAD + 4, b"\xa5")  # movsd now
    assert serve(loop, memory, s.kvm_regs(rip=HEAD, rsi=0x10000, rdi=0x4000, rcx=0x4010, rflags=2), sregs) is None
    assert memory.read(0, RAM)[: HEAD + 4] == before[: HEAD + 4]


def _setup_header(version: int, relocatable: int, pref_address: int, flag: int = BOOT_FLAG) -> bytes:
    header = setup_header(boot_flag=flag, header=HDRS_MAGIC, version=version, relocatable_kernel=relocatable,
                          pref_address=pref_address)
    return bytes(header)


def test_where_a_boot_loader_enters_the_kernel_whose_header_it_read() -> None:
    """boot.rst, "pref_address": a relocatable kernel of protocol 2.10 or later is loaded there (GRUB,
    SYSLINUX); any other at 1 MiB, the protocol's load address. The handoff watches that address and
    1 MiB once it has seen the header go by, leaving two debug registers to GRUB's two copy loops."""
    assert SETUP_HEADER_SIZE == 0x26C - 0x1F1  # the header ends with kernel_info_offset at 0x268
    assert loader_entry(_setup_header(0x20F, 1, 0x1000000)) == 0x1000000
    assert loader_entry(_setup_header(0x20F, 1, 0x200000)) == 0x200000
    assert loader_entry(_setup_header(0x20F, 0, 0x1000000)) == 0x100000  # not relocatable
    assert loader_entry(_setup_header(0x209, 1, 0x1000000)) == 0x100000  # no pref_address before 2.10
    assert loader_entry(_setup_header(0x20F, 1, 0x1000000, flag=0)) is None  # no boot sector signature
    assert loader_entry(_setup_header(0x20F, 1, 0x1000000)[:-1]) is None  # cut short
    assert loader_entry(bytes(SETUP_HEADER_SIZE)) is None
    for kernel in DEBIAN_BOOT.glob("vmlinuz-*"):  # as GRUB reads it: the file's bytes from 0x1f1
        assert loader_entry(kernel.read_bytes()[0x1F1 : 0x1F1 + SETUP_HEADER_SIZE]) == 0x1000000


# (code at HEAD, registers, bytes moved): GRUB's relocator moves chunks with `std; rep movsb` from their
# ends and `cld; rep movsb` from their starts; forward and backward onto its own source; dwords.
REP_CASES = {
    "down-bytes": ("fdf3a4", dict(rsi=0x10000 + 4999, rdi=0x40000 + 4999, rcx=5000), 5000),
    "down-onto-its-source": ("fdf3a4", dict(rsi=0x10000 + 999, rdi=0x10007 + 999, rcx=1000), 1000),
    "up-bytes": ("fcf3a4", dict(rsi=0x10000, rdi=0x40000, rcx=3333), 3333),
    "up-onto-its-source": ("fcf3a4", dict(rsi=0x10000, rdi=0x10003, rcx=800), 800),
    "up-dwords": ("fcf3a5", dict(rsi=0x10000, rdi=0x40000, rcx=700), 2800),
    "down-dwords": ("fdf3a5", dict(rsi=0x10000 + 4 * 99, rdi=0x50000 + 4 * 99, rcx=100), 400),
    "none": ("fcf3a4", dict(rsi=0x10000, rdi=0x40000, rcx=0), 0),
}


@pytest.mark.kvm
@pytest.mark.parametrize("case", sorted(REP_CASES))
def test_a_rep_movs_finished_by_the_vmm_leaves_what_kvm_leaves(flat32: tuple[Vcpu, GuestMemory], case: str) -> None:
    """From its first iteration (the REP MOVS after CLD or STD), as the sampling finds one in progress:
    ECX, ESI and EDI are wherever the last iteration left them."""
    vcpu, memory = flat32
    code, values, length = REP_CASES[case]
    program = bytes.fromhex(code) + OUT_DONE

    def prepare() -> None:
        memory.fill(0, RAM)
        memory.write(HEAD, program)
        memory.write(0x10000, bytes((i * 7 + 3) & 0xFF for i in range(0x8000)))
        _registers(vcpu, **values)

    prepare()
    _ends_at_done(vcpu)
    ran = vcpu.get_regs()
    expected = memory.read(0, RAM)

    prepare()
    regs = vcpu.get_regs()
    regs.rip = HEAD + 1  # past the CLD or STD
    regs.rflags |= FLAG_DF if code.startswith("fd") else 0
    copied = serve_rep_movs(memory, regs, vcpu.get_sregs())
    assert copied is not None and copied.length == length
    _go_on_as_kvm_did(vcpu, memory, regs, ran, expected)


@pytest.mark.kvm
def test_a_rep_movs_the_vmm_cannot_finish_is_left_to_kvm(flat32: tuple[Vcpu, GuestMemory]) -> None:
    vcpu, memory = flat32
    memory.write(HEAD, bytes.fromhex("f3a5"))
    sregs = vcpu.get_sregs()
    for regs in (s.kvm_regs(rip=HEAD, rsi=0x10000, rdi=0x10004, rcx=8, rflags=2),  # overlapping dwords
                 s.kvm_regs(rip=HEAD, rsi=RAM - 8, rdi=0x4000, rcx=16, rflags=2),  # the source leaves RAM
                 s.kvm_regs(rip=HEAD, rsi=0x10, rdi=0x4000, rcx=16, rflags=2 | FLAG_DF),  # walks below 0
                 s.kvm_regs(rip=HEAD + 1, rsi=0x10000, rdi=0x4000, rcx=16, rflags=2)):  # not a REP MOVS there
        kept = bytes(regs)
        assert serve_rep_movs(memory, regs, sregs) is None and bytes(regs) == kept
    memory.write(HEAD, bytes.fromhex("f3a6"))  # rep cmpsb
    assert serve_rep_movs(memory, s.kvm_regs(rip=HEAD, rsi=0x10000, rdi=0x4000, rcx=16, rflags=2), sregs) is None


@pytest.mark.parametrize("chunk", [1 << 20, 16])
def test_copies_and_fills_match_a_byte_loop_in_pieces_of_any_size(memory: GuestMemory, chunk: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_bytes against the loop it stands for, one byte at a time, for every kind of overlap and
    both directions; with pieces of 16 bytes too, as a guest's copy of gigabytes is made."""
    monkeypatch.setattr(copyloop, "CHUNK", chunk)
    base = 0x1000
    initial = bytes((i * 37 + 11) & 0xFF for i in range(1024))
    for upward in (True, False):
        for length in (1, 15, 16, 17, 200):
            for lag in (-300, -200, -17, -16, -5, -1, 0, 1, 5, 16, 17, 199, 200, 300):
                source, target = base + 400, base + 400 + lag
                memory.write(base, initial)
                expected = bytearray(initial)
                order = range(length) if upward else reversed(range(length))
                for i in order:  # the loop itself
                    expected[target - base + i] = expected[source - base + i]
                assert copyloop.copy_bytes(memory, source, target, length, upward)
                assert memory.read(base, len(initial)) == bytes(expected), (upward, length, lag)
    memory.write(base, initial)
    assert copyloop.fill_bytes(memory, base + 3, 100, 0xC3)
    assert memory.read(base, 110) == initial[:3] + b"\xc3" * 100 + initial[103:110]
    assert not copyloop.fill_bytes(memory, (16 << 20) - 8, 16, 0) and not copyloop.copy_bytes(memory, 0, (16 << 20) - 8, 16, True)
