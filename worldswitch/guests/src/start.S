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

/*
 * One stub per vector. The CPU pushes an error code for vectors 8, 10-14, 17, 21, 29, 30;
 * for the others the stub pushes a 0 so every frame looks alike (struct trap_frame).
 */
    .text
    .altmacro
    .macro trap_stub vector
    .align 16
trap_stub_\vector:
    .if (\vector == 8) || (\vector >= 10 && \vector <= 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
    .else
    pushq $0
    .endif
    pushq $\vector
    jmp trap_common
    .endm

    .set vector, 0
    .rept 256
    trap_stub %vector
    .set vector, vector + 1
    .endr

trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call trap_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp /* vector and error code */
    iretq

/* The address of every stub, for the IDT. */
    .macro stub_address vector
    .quad trap_stub_\vector
    .endm
    .section .rodata
    .align 8
    .globl trap_stubs
trap_stubs:
    .set vector, 0
    .rept 256
    stub_address %vector
    .set vector, vector + 1
    .endr

/* void enter_user(int (*fn)(u64), u64 arg, int interrupts): iretq to user_trampoline. */
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
    testl %edx, %edx
    jz 1f
    orq $0x200, %rax /* IF */
1:  pushq %rax /* RFLAGS */
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
