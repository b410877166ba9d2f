/*
 * start.S: entry from the VMM, trap stubs, and the drop to ring 3.
 *
 * The VMM enters _start in 64-bit ring 0 with RDI = argument string, RSI = RAM size,
 * RDX = vCPU count and a stack (boot/program.py).
 */
    .file "start.S" /* a fixed name: gcc would record its temporary file, making builds differ */
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    movq %rdi, ws_args(%rip)
    movq %rsi, ws_ram_size(%rip)
    movq %rdx, ws_vcpus(%rip)
    .globl runtime_start
runtime_start:                           /* pvh.S joins here */
    call runtime_init
    movq ws_args(%rip), %rdi
    call main
    movl %eax, %edi
    call ws_exit

    .text
    .altmacro
    .include "frame.inc"
    trap_stubs trap_stub_, trap_common

trap_common:
    push_registers
    movq %rsp, %rdi
    cld
    call trap_dispatch
    pop_registers
    addq $16, %rsp /* vector and error code */
    iretq

/* The address of every stub, for the IDT. */
    .section .rodata
    .align 8
    .globl trap_stubs
trap_stubs:
    trap_stub_table trap_stub_

/* void enter_user(int (*fn)(u64), u64 arg, int flags): iretq to user_trampoline (ws.h USER_*). */
    .text
    .globl enter_user
enter_user:
    movq %rdi, %r12 /* fn */
    movq %rsi, %r13 /* arg */
    leaq user_stack_top(%rip), %rax
    pushq $0x1b /* SS: ring-3 data */
    pushq %rax /* RSP */
    /* IOPL 3: ring 3 may use every port (SDM vol. 1, 19.5.1: CPL <= IOPL, no bitmap consulted).
     * Hosts that force the hardware IOPL to 0 in guest user mode (PVM) consult the TSS I/O bitmap
     * instead, which the VMM also grants (boot/longmode.py build_tss); see docs/hosts.md. */
    movq $0x3002, %rax
    testl $1, %edx /* USER_INTERRUPTS */
    jz 1f
    orq $0x200, %rax /* IF */
1:  testl $2, %edx /* USER_IOPL0 */
    jz 2f
    andq $~0x3000, %rax
2:  pushq %rax /* RFLAGS */
    pushq $0x23 /* CS: ring-3 code */
    leaq user_trampoline(%rip), %rax
    pushq %rax /* RIP */
    movq $0x1b, %rax
    movw %ax, %ds
    movw %ax, %es
    iretq

user_trampoline:
    movq %r13, %rdi
    call *%r12
    movl %eax, %edi
    call ws_exit

    .bss
    .align 16
user_stack:
    .skip 16384
user_stack_top:
