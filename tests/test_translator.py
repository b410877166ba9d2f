"""The binary translator (boot/translator.py) on small functions: which sites it takes, what the
code cache holds (decoded back, instruction by instruction), and where it must leave the kernel's
code alone. The whole of it runs on a real kernel in tests/test_monitor.py."""

from __future__ import annotations

import struct

from worldswitch.boot.decoding import decode, new_decoder
from worldswitch.boot.flag_sites import CodeRange
from worldswitch.boot.monitor import CODE_CACHE, CODE_CACHE_SIZE, PV_BASE, PV_FUNCTIONS
from worldswitch.boot.translator import CacheLayout, KernelSites, Translation, translate

BASE = 0xFFFF_FFFF_8100_0000
LOAD_GS_INDEX = BASE + 0x1000  # asm_load_gs_index, whose calls go to the monitor's load_gs_index
LAYOUT = CacheLayout(CODE_CACHE, CODE_CACHE_SIZE, *(PV_BASE + PV_FUNCTIONS[name] for name in
                                                     ("irq_disable", "irq_enable", "save_fl", "write_msr", "write_cr3", "invlpg",
                                                      "read_cr2")),
                     {LOAD_GS_INDEX: PV_BASE + PV_FUNCTIONS["load_gs_index"]})
NOTHING = KernelSites([], set(), set(), set(), set())
INT3 = 0xCC
# local_irq_save's shape: push %rbx; pushf; pop %rbx; cli; then mov $1, %eax; ret
SAVE = bytes.fromhex("53 9c 5b fa b8 01 00 00 00 c3")


def run(functions: list[bytes], sites: KernelSites = NOTHING) -> tuple[bytearray, Translation, list[int]]:
    """The functions laid out one after another from BASE, translated; and where each begins."""
    image, starts = bytearray(), []
    for code in functions:
        starts.append(BASE + len(image))
        image += code
    ranges = [CodeRange(start, start - BASE, len(code)) for start, code in zip(starts, functions)]
    return image, translate(image, ranges, sites, LAYOUT), starts


def listing(code: bytes, address: int) -> list[str]:
    return [f"{mnemonic} {operands}".strip() for _, _, mnemonic, operands in decode(new_decoder(), code, address)[0]]


def test_a_save_and_disable_becomes_one_window_whose_copy_calls_the_pv_functions() -> None:
    image, translation, _ = run([SAVE])
    assert (translation.sites, translation.windows, sum(translation.left.values())) == (2, 1, 0)
    # the window: from the PUSHF to the MOV, whole instructions (the PUSH before it stays)
    assert image[0] == SAVE[0] and image[1] == 0xE9 and BASE + 6 + struct.unpack_from("<i", image, 2)[0] == CODE_CACHE
    assert image[6:9] == bytes([INT3]) * 3 and image[9:] == SAVE[9:]
    assert listing(translation.cache, CODE_CACHE) == [
        # PUSHF: the real flags, with the virtual IF (save_fl's RAX) for the real one; RAX and the flags kept
        "pushfq", "push rax", "pushfq", f"call {LAYOUT.save_fl:#x}", "and qword ptr [rsp + 0x10], 0x40dd7",
        "or qword ptr [rsp + 0x10], rax", "popfq", "pop rax",
        "pop rbx",
        "push rax", f"call {LAYOUT.irq_disable:#x}", "pop rax",  # CLI
        "mov eax, 1",
        f"jmp {BASE + 9:#x}",
    ]


def test_an_sti_keeps_the_flags_and_a_short_jcc_is_reached_from_the_copy() -> None:
    # local_irq_restore's: test $0x200, %edi; je 1f; sti; 1: ret
    restore = bytes.fromhex("f7 c7 00 02 00 00 74 01 fb c3")
    _, translation, _ = run([restore])
    assert translation.sites == 1
    assert listing(translation.cache, CODE_CACHE) == [
        "test edi, 0x200", f"je {BASE + 9:#x}",  # the same target, now a rel32
        "push rax", "pushfq", f"call {LAYOUT.irq_enable:#x}", "popfq", "pop rax",
        f"jmp {BASE + 9:#x}",
    ]


def test_a_rip_relative_operand_names_the_same_memory_from_the_cache() -> None:
    # mov 0x100(%rip), %rax; cli; ret
    code = bytes.fromhex("48 8b 05 00 01 00 00 fa c3")
    _, translation, _ = run([code])
    assert translation.sites == 1
    copied = listing(translation.cache, CODE_CACHE)[0]
    assert copied == f"mov rax, qword ptr [rip - {(CODE_CACHE + 7) - (BASE + 7 + 0x100):#x}]"  # the cache is above


def test_no_window_covers_a_branch_target_or_a_kept_site_after_its_first_instruction() -> None:
    # cli; mov $2, %ebx; mov $3, %ecx; ret, and another function that jumps to the first MOV
    code = bytes.fromhex("fa bb 02 00 00 00 b9 03 00 00 00 c3")
    jumper = bytes.fromhex("e9") + struct.pack("<i", (BASE + 1) - (BASE + len(code) + 5))
    image, translation, _ = run([code, jumper])
    assert translation.sites == 0 and translation.left["a branch target inside"] == 1
    assert image[: len(code)] == code
    # the same, with the MOV an exception-table entry's instruction instead
    image, translation, _ = run([code], KernelSites([(BASE + 1, BASE + 2)], set(), set(), set(), set()))
    assert translation.sites == 0 and translation.left["code the kernel rewrites or finds by address"] == 1
    assert image == code


def test_sti_before_hlt_keeps_its_trap_for_the_interrupt_shadow() -> None:
    code = bytes.fromhex("b8 01 00 00 00 fb f4 c3")  # mov $1, %eax; sti; hlt; ret (safe_halt's)
    image, translation, _ = run([code])
    assert translation.sites == 0 and translation.left["an STI whose interrupt shadow counts"] == 1
    assert image == code


def test_a_function_that_jumps_indirectly_is_left_as_it_is() -> None:
    code = SAVE[:-1] + bytes.fromhex("ff e0")  # ... jmp *%rax: a jump table's, whose targets no decoder knows
    image, translation, _ = run([code])
    assert translation.sites == 0 and image == code


def test_a_return_thunk_jump_moves_to_the_cache_for_the_kernel_to_rewrite_there() -> None:
    thunk = bytes.fromhex("c3 cc cc cc cc")  # __x86_return_thunk
    tail = bytes.fromhex("fb e9") + struct.pack("<i", -(len(thunk) + 6))  # sti; jmp __x86_return_thunk
    _, translation, (thunk_at, tail_at) = run([thunk, tail], KernelSites([], set(), set(), set(), {BASE + len(thunk) + 1}))
    assert translation.sites == 1 and list(translation.moved_returns) == [tail_at + 1]
    copy = translation.moved_returns[tail_at + 1]
    at = copy - CODE_CACHE
    assert translation.cache[at] == 0xE9 and copy + 5 + struct.unpack_from("<i", translation.cache, at + 1)[0] == thunk_at


def test_a_lock_prefix_may_move_where_the_kernel_finds_neither_of_its_bytes() -> None:
    # pushf; pop %rax; lock incl (%rdi); cli; ret: the LOCK falls on the JMP's displacement
    code = bytes.fromhex("9c 58 f0 ff 07 fa c3")
    image, translation, _ = run([code], KernelSites([], set(), set(), {BASE + 2}, set()))
    assert translation.sites == 2 and image[0] == 0xE9 and image[2] not in (0xF0, 0x3E)
    assert "lock inc dword ptr [rdi]" in listing(translation.cache, CODE_CACHE)


def test_a_wrmsr_with_the_kernels_unchecked_entry_and_a_cr3_load_call_the_pv_functions_keeping_every_register() -> None:
    # wrmsr; ret, whose exception-table entry (EX_TYPE_WRMSR) only warns; mov %r9, %cr3 (the register's number in REX.R)
    wrmsr = bytes.fromhex("0f 30 b8 01 00 00 00 c3")
    cr3 = bytes.fromhex("41 0f 22 d9 b8 01 00 00 00 c3")
    image, translation, (_, cr3_at) = run([wrmsr, cr3], KernelSites([], set(), {BASE}, set(), set()))
    assert translation.sites == 2
    saved = ["pushfq", "push rax", "push rcx", "push rdx", "push rsi", "push rdi", "push r8", "push r9", "push r10",
             "push r11"]
    restored = ["pop r11", "pop r10", "pop r9", "pop r8", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax", "popfq"]
    copies = listing(translation.cache, CODE_CACHE)
    assert copies[: len(saved) + 3] == [*saved, "mov edi, ecx", "mov esi, eax", f"call {LAYOUT.write_msr:#x}"]
    second = copies.index(f"jmp {BASE + 7:#x}") + 1
    assert copies[len(saved) + 3 : second] == [*restored, "mov eax, 1", f"jmp {BASE + 7:#x}"]
    assert copies[second : second + len(saved) + 2] == [*saved, "mov rdi, r9", f"call {LAYOUT.write_cr3:#x}"]
    # a WRMSR without that entry (one whose refusal the kernel handles: wrmsr_safe) stays
    image, translation, _ = run([wrmsr])
    assert translation.sites == 0 and image == wrmsr


def test_a_cr2_read_calls_read_cr2_and_keeps_every_other_register_and_the_flags() -> None:
    # exc_page_fault's first lines: push %r12; mov %cr2, %r12 (the register in REX.B); then mov $1, %eax; ret
    to_r12 = bytes.fromhex("41 54 41 0f 20 d4 b8 01 00 00 00 c3")
    # exc_nmi's: mov %cr2, %rax; cmp %rax, %rdi; ret
    to_rax = bytes.fromhex("0f 20 d0 48 39 c7 c3")
    image, translation, (_, rax_at) = run([to_r12, to_rax])
    assert translation.sites == 2 and sum(translation.left.values()) == 0
    copies = listing(translation.cache, CODE_CACHE)
    # read_cr2 changes RAX alone (pv_ops.mmu.read_cr2's contract): RAX is kept around it for R12
    first = copies.index(f"jmp {BASE + 11:#x}") + 1
    assert copies[:first] == ["push rax", f"call {LAYOUT.read_cr2:#x}", "mov r12, rax", "pop rax", "mov eax, 1",
                              f"jmp {BASE + 11:#x}"]  # the window: from the read to the RET (the PUSH before stays)
    assert image[:2] == to_r12[:2] and image[2] == 0xE9
    assert copies[first:] == [f"call {LAYOUT.read_cr2:#x}", "cmp rdi, rax", f"jmp {rax_at + 6:#x}"]
    # a write of CR2 or a read of CR0 is no such site
    _, translation, _ = run([bytes.fromhex("0f 22 d0 c3"), bytes.fromhex("0f 20 c0 c3")])
    assert translation.sites == 0


def test_an_invlpg_passes_its_operands_address_and_a_per_cpu_operand_still_names_its_variable() -> None:
    # mov %gs:0x7f000000(%rip), %ax: a per-CPU variable, an offset from GS that the address wraps to
    # (here 8); the 0x66 and GS prefixes make Capstone give the displacement's size as 2. invlpg (%rdi); ret
    per_cpu = bytes.fromhex("65 66 8b 05 00 00 00 7f 0f 01 3f c3")
    # invlpg (%r8,%rcx,1): REX.B, which the LEA keeps, with W for a 64-bit address; ret
    high = bytes.fromhex("41 0f 01 3c 08 c3")
    _, translation, (_, high_at) = run([per_cpu, high])
    assert translation.sites == 2
    copies = listing(translation.cache, CODE_CACHE)
    assert (BASE + 8 + 0x7F00_0000) % (1 << 64) == 8
    assert copies[0] == f"mov ax, word ptr gs:[rip + {8 - (CODE_CACHE + 8) + (1 << 64):#x}]"  # 8, from the cache
    saved = ["pushfq", "push rax", "push rcx", "push rdx", "push rsi", "push rdi", "push r8", "push r9", "push r10",
             "push r11"]
    assert copies[1:14] == [*saved, "lea rdi, [rdi]", f"call {LAYOUT.invlpg:#x}", "pop r11"]
    second = copies.index(f"jmp {BASE + 11:#x}") + 1
    assert copies[second : second + 12] == [*saved, "lea rdi, [r8 + rcx]", f"call {LAYOUT.invlpg:#x}"]
    assert copies[-1] == f"jmp {high_at + 5:#x}"


def test_calls_of_asm_load_gs_index_go_to_the_monitors_load_gs_index_in_place_and_in_a_copy() -> None:
    def call(at: int) -> bytes:
        return bytes([0xE8]) + struct.pack("<i", LOAD_GS_INDEX - (at + 5))

    # mov $0x2b, %edi; cli; call asm_load_gs_index; ret (__switch_to's), and a call alone
    inlined = bytes.fromhex("bf 2b 00 00 00 fa") + call(BASE + 6) + bytes.fromhex("c3")
    alone = call(BASE + len(inlined)) + bytes.fromhex("c3")
    image, translation, (_, alone_at) = run([inlined, alone])
    monitors = PV_BASE + PV_FUNCTIONS["load_gs_index"]
    assert translation.calls == 2 and translation.sites == 1
    assert alone_at + 5 + struct.unpack_from("<i", image, alone_at - BASE + 1)[0] == monitors
    assert listing(translation.cache, CODE_CACHE)[-2] == f"call {monitors:#x}"  # the CLI's window took the call in
