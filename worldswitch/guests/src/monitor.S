/*
 * monitor.S: the monitor's entry from the VMM, its event stubs, and the few instructions that
 * need a fault fix-up or an exact order (docs/monitor.md).
 *
 * The VMM enters monitor_start in 64-bit ring 0 on its own GDT (boot/program.py's state). The
 * monitor installs its GDT, IDT and TSS and leaves for the program's entry in ring 3; from then
 * on it runs only in its event stubs: every exception and interrupt reaches it in ring 0 on the
 * TSS stack, through interrupt gates (interrupts stay off while it runs).
 */
    .file "monitor.S"
    .code64
    .section .text.start, "ax"
    .globl monitor_start
monitor_start:
    leaq monitor_stack_top(%rip), %rsp
    call monitor_init               /* tables built and loaded; returns the code selector */
    leaq 1f(%rip), %rcx
    pushq %rax
    pushq %rcx
    lretq                           /* CS = the monitor's own ring-0 code segment */
1:  movl $0x40, %eax
    movw %ax, %ss
    movw %ax, %ds
    movw %ax, %es
    subq $8 * 22, %rsp              /* a frame (struct frame) for the first entry into the guest */
    movq %rsp, %rdi
    call monitor_first_frame
    jmp event_return

/* One stub per vector (frame.inc), then struct trap_frame for monitor_event. */
    .text
    .altmacro
    .include "frame.inc"
    trap_stubs event_stub_, event_common

event_common:
    push_registers
    movq %rsp, %rdi
    cld
    call monitor_event
event_return:
    pop_registers
    addq $16, %rsp
    iretq

    .section .rodata
    .align 8
    .globl event_stubs
event_stubs:
    trap_stub_table event_stub_
    .globl error_code_vectors
error_code_vectors:
    error_code_table

/* int msr_read(u32 index, u64 *value), int msr_write(u32 index, u64 value): 0, or 1 if the CPU
 * refused with #GP (the event handler moves RIP from msr_*_at to msr_refused). */
    .text
    .globl msr_read, msr_write, msr_read_at, msr_write_at, msr_refused
msr_read:
    movl %edi, %ecx
msr_read_at:
    rdmsr
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    movq %rax, (%rsi)
    xorl %eax, %eax
    ret
msr_write:
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
msr_write_at:
    wrmsr
    xorl %eax, %eax
    ret
msr_refused:
    movl $1, %eax
    ret

/* int guest_copy(void *to, const void *from, u64 length): 0, or 1 if a page fault on guest memory
 * found nothing the guest's tables give (the event handler moves RIP from guest_copy_at to
 * guest_copy_failed; a fault the shadow can fill is retried where it happened). */
    .globl guest_copy, guest_copy_at, guest_copy_failed
guest_copy:
    movq %rdx, %rcx
guest_copy_at:
    rep movsb
    xorl %eax, %eax
    ret
guest_copy_failed:
    movl $1, %eax
    ret

/* void wait_for_interrupt(void): the guest halted with its virtual IF set. STI's one-instruction
 * shadow covers HLT, so an interrupt that is already waiting wakes it rather than being taken
 * before it; the interrupt's entry marks it pending (monitor_event, from ring 0). */
    .globl wait_for_interrupt
wait_for_interrupt:
    sti
    hlt
    cli
    ret

/* The real LSTAR. A SYSCALL from the guest reaches it in ring 3, where this supervisor-only page
 * cannot be fetched: the page fault is the monitor's signal (monitor_event), and nothing here runs. */
    .globl syscall_gate
    .balign 16
syscall_gate:
    ud2

/* void triple_fault(void): an event the guest's IDT cannot take, even as a double fault. The CPU
 * shuts down as it would have without the monitor: no IDT at all, and an exception in ring 0. */
    .globl triple_fault
triple_fault:
    lidt no_idt(%rip)
    ud2

/* void halt_forever(void): the guest halted with its virtual IF clear, as a CPU does. */
    .globl halt_forever
halt_forever:
    cli
1:  hlt
    jmp 1b

    .section .rodata
    .align 16
no_idt:
    .word 0
    .quad 0

    .bss
    .align 16
monitor_stack:
    .skip 16384
    .globl monitor_stack_top
monitor_stack_top:
